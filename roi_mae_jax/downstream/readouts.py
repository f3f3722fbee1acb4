"""Which read-outs of a checkpoint a probe scores: names -> feature extractors.

    layers = parse_layers("1,2")                    # (1, 2); "" -> None (the output)
    names = readout_names("recon,encoder@1+2")      # checked, in order
    extractors = probe_extractors(config, pre)      # "encoder", read-outs, baselines, twins

A probe config (configs/probe.py) names its read-outs:

  pool, layers   the reference "encoder": `pool` over the time courses of the
                 encoder blocks `layers` ("" = the output; "0,1,2" or "all":
                 0 is the embedded tokens, each layer pooled alone)
  readouts       more read-outs of the same checkpoint, comma-separated:
                   encoder@K[+K...]   `pool` over those blocks' outputs
                   recon              reconstruction residuals by region
                                      (recon_features: power and correlation)
                   recon_power, recon_corr   one part of it
  baselines      region_stats, fc, init (features.BASELINES)

With `init` among the baselines every read-out gets a twin from the run's
initial parameters, named `init@K...` or `init_recon...`, so pretrained and
untrained weights are compared through the same read-out on the same splits.
"""

from __future__ import annotations

import re
from typing import Callable

import ml_collections

from roi_mae_jax import errors
from roi_mae_jax.config import validation
from roi_mae_jax.downstream import features as features_lib
from roi_mae_jax.downstream import pretrained as pretrained_lib
from roi_mae_jax.downstream import recon_features

RECON = {"recon": "power+corr", "recon_power": "power", "recon_corr": "corr"}
_LAYER_READOUT = validation.LAYER_READOUT


def parse_layers(text, depth: int | None = None) -> tuple[int, ...] | None:
  """'1,2' or '1+2' -> (1, 2); 'all' -> 0..depth; '' -> None (the encoder's output)."""
  text = str(text).strip()
  if not text:
    return None
  if text == "all":
    if depth is None:
      raise errors.InputError("layers 'all' needs the encoder's depth")
    return tuple(range(depth + 1))
  validation.refuse("layers", text, depth=depth)
  return tuple(int(k) for k in re.split(r"[,+]", text) if k.strip())


def readout_names(text: str) -> list[str]:
  """'recon,encoder@1' -> its names; a bad or repeated name is an InputError."""
  validation.refuse("readouts", text)
  return [n.strip() for n in str(text).split(",") if n.strip()]


def init_name(name: str) -> str:
  """The name of a read-out's twin on the initial parameters."""
  return "init" + name[len("encoder"):] if name.startswith("encoder") else f"init_{name}"


def _extractor(config, pre: pretrained_lib.Pretrained, name: str, readout: str) -> Callable:
  """The extractor of one read-out (`readout`: 'encoder', 'encoder@K', 'recon...')."""
  if readout in RECON:
    return recon_features.ReconstructionFeatures(
        pre, RECON[readout], rounds=int(config.get("recon_rounds", 2)),
        batch_size=max(1, int(config.batch_size) // 2), max_windows=int(config.max_windows),
        name=name)
  match = _LAYER_READOUT.match(readout)
  layers = (parse_layers(match.group(1), pre.depth) if match
            else parse_layers(config.get("layers", ""), pre.depth))
  return features_lib.EncoderFeatures(pre, config.pool, stride=int(config.stride),
                                      batch_size=int(config.batch_size),
                                      max_windows=int(config.max_windows), name=name,
                                      layers=layers)


def probe_extractors(config: ml_collections.ConfigDict,
                     pre: pretrained_lib.Pretrained) -> dict[str, Callable]:
  """name -> extractor: "encoder", each read-out, each baseline, and with `init` the
  twins of the read-outs (see the module docstring). Names are the feature sets'."""
  validation.check_loaded(config, depth=pre.depth)  # encoder blocks it has
  baselines = features_lib.baseline_names(config.baselines)
  names = readout_names(config.get("readouts", ""))
  out = {"encoder": _extractor(config, pre, "encoder", "encoder")}
  out.update({name: _extractor(config, pre, name, name) for name in names})
  init = pretrained_lib.random_init(pre) if "init" in baselines else None
  for baseline in baselines:
    if baseline == "init":
      out["init"] = _extractor(config, init, "init", "encoder")
    else:
      out[baseline] = features_lib.RegionSeriesFeatures(pre.patch_map.atlas, baseline)
  if init is not None:
    out.update({init_name(name): _extractor(config, init, init_name(name), name)
                for name in names})
  return out
