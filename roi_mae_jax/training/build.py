"""From a config to the model's parts: the one path pretraining, bench and the encoder loader share.

    parts = build.parts(config)                  # patch map -> token spec -> mask sampler
    parts.spec.num_tokens, parts.sampler.num_keep, parts.patch_map.regions
    model = build.new_model(config, parts.spec, build.parameter_keys(config)[0])
    graphdef, abstract = build.abstract_encoder(config, parts.spec)   # shapes only

`train_step.TrainSetup.from_config` adds the optimizer, shardings and the
jitted step on top of `parts`; `pretrained.load_pretrained` restores only the
parameters into `abstract_encoder`'s layout (no optimizer state, no sampler).
Every caller derives the initial parameters from `parameter_keys`, so a
randomly initialised encoder is the pretraining run's own step 0.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import ml_collections
from flax import nnx

from roi_mae_jax.brain import patches as patches_lib
from roi_mae_jax.devices import platforms
from roi_mae_jax.masking import samplers
from roi_mae_jax.model import mae as model_lib


@dataclasses.dataclass(frozen=True, eq=False)
class Parts:
  """The token layout of a config; the mask sampler is built on first use."""

  config: ml_collections.ConfigDict
  patch_map: patches_lib.PatchMap
  spec: model_lib.TokenSpec

  @functools.cached_property
  def sampler(self) -> samplers.MaskSampler:
    return samplers.sampler_from_config(self.config, self.patch_map)


def parts(config: ml_collections.ConfigDict) -> Parts:
  """Patch map (atlas on the grid) and token spec of `config`."""
  patch_map = patches_lib.patch_map_from_config(config)
  return Parts(config, patch_map, model_lib.spec_from_config(config, patch_map))


def parameter_keys(config: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
  """(key of the initial parameters, key of the training masks) of a run."""
  init_key, train_key = jax.random.split(jax.random.key(config.seed))
  return init_key, train_key


def new_model(config: ml_collections.ConfigDict, spec: model_lib.TokenSpec, key: jax.Array,
              target: platforms.Target | None = None) -> model_lib.MaskedAutoencoder:
  """The model of `config` compiled for `target` (None: this host, one device)."""
  return model_lib.MaskedAutoencoder(spec, config.model, rngs=nnx.Rngs(params=key),
                                     target=target)


def initial_params(config: ml_collections.ConfigDict, spec: model_lib.TokenSpec) -> dict:
  """The parameters a pretraining run of `config` starts from (step 0)."""
  model = new_model(config, spec, parameter_keys(config)[0])
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def abstract_encoder(config: ml_collections.ConfigDict, spec: model_lib.TokenSpec,
                     target: platforms.Target | None = None) -> tuple[nnx.GraphDef, dict]:
  """(graphdef, parameter shapes as a pure dict) without allocating parameters."""
  abstract_model = nnx.eval_shape(
      lambda: new_model(config, spec, parameter_keys(config)[0], target))
  graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
  return graphdef, nnx.to_pure_dict(abstract_params)
