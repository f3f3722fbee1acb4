r"""Task `probe`: a linear probe (ADHD vs control) on the frozen pretrained encoder.

    python -m roi_mae_jax.main --config=configs/probe.py --workdir=runs/probe \
        --config.checkpoint=runs/demo
    python -m roi_mae_jax.main --config=configs/probe.py --workdir=runs/probe_adhd200 \
        --config.checkpoint=runs/pretrain_adhd200 --config.data.shards=runs/adhd200_4mm \
        --config.pool=region
    python -m roi_mae_jax.main --config=configs/probe.py --workdir=runs/probe_readouts \
        --config.checkpoint=runs/demo --config.readouts=encoder@1,recon

Consecutive windows of every labelled scan go through the encoder with no
masking; the time course of its region embeddings is pooled per subject
(`pool`, see features.py: amplitude and correlation over time, or means),
from the encoder blocks of `layers` (default: its output). `readouts` adds
more read-outs of the checkpoint (other blocks, reconstruction residuals by
region; see readouts.py), each with an untrained twin beside `init`.
The classical baselines of `baselines` (region statistics and functional
connectivity of the data, the same encoder randomly initialised) are probed
on the same subjects and splits. Logistic regression (standardised, balanced,
C by inner CV) is scored under subject-disjoint stratified k-fold, repeated
over seeds, and leave-one-site-out. Writes to WORKDIR: probe_results.json
(feature set -> scheme -> metric -> mean, std; per-split scores; the
encoder's paired differences to each baseline), probe_table.md, probe_roc.png,
probe_predictions.csv (out-of-fold probability per subject and feature set),
probe_features.npz (the encoder's features).
"""

from __future__ import annotations


import ml_collections
import numpy as np
from absl import logging

from roi_mae_jax import outputs
from roi_mae_jax import plots
from roi_mae_jax.data import shards
from roi_mae_jax.data import sources
from roi_mae_jax.downstream import evaluation
from roi_mae_jax.downstream import pretrained as pretrained_lib

REQUIRED_KEYS = ("checkpoint", "pool", "folds", "repeats", "schemes")
OUTPUT_NAMES = ("probe_results.json", "probe_table.md", "probe_roc.png",
                "probe_predictions.csv", "probe_features.npz")


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  paths = dict(zip(OUTPUT_NAMES, outputs.claim(workdir, OUTPUT_NAMES, config.overwrite)))
  pre = pretrained_lib.load_pretrained(config.checkpoint, config.checkpoint_step or None)
  logging.info("encoder from %s (step %d, %s, %d tokens per window)", config.checkpoint,
               pre.step, pre.config.model.size, pre.spec.num_tokens)
  source = sources.downstream_source(pre.config, config.data)
  results, sets = evaluation.probe_encoder(config, pre, source)
  feats = sets["encoder"]
  oof = results.pop("oof")
  outputs.write_json(paths["probe_results.json"], results)
  table = evaluation.markdown_table(results, {"encoder": f"encoder ({config.pool})"})
  with open(paths["probe_table.md"], "w", encoding="utf-8") as f:
    f.write(f"Linear probe, ADHD vs control: {len(feats.subjects)} subjects, encoder step "
            f"{pre.step} ({pre.config.mask.strategy} masking), pool {config.pool}; baselines "
            "on the same splits\n\n" + table)
  rows = []
  for name, by_scheme in sorted(oof.items()):
    for scheme, probs in sorted(by_scheme.items()):
      rows += [{"features": name, "scheme": scheme, "subject": s, "site": site,
                "label": int(l), "probability": round(float(p), 6)}
               for s, site, l, p in zip(feats.subjects, feats.sites, feats.labels, probs)
               if np.isfinite(p)]
  shards.write_table(paths["probe_predictions.csv"],
                     ("features", "scheme", "subject", "site", "label", "probability"), rows)
  curves = {f"{name}, {scheme}": (feats.labels[np.isfinite(p)], p[np.isfinite(p)])
            for name, by_scheme in sorted(oof.items()) for scheme, p in sorted(by_scheme.items())
            if scheme == "kfold" or len(oof) == 1}
  plots.save(plots.roc_figure(curves, f"linear probes (encoder pool {config.pool}), k-fold"),
             paths["probe_roc.png"])
  np.savez_compressed(paths["probe_features.npz"], features=feats.features,
                      labels=feats.labels, subjects=np.array(feats.subjects),
                      sites=np.array(feats.sites))
  logging.info("probe results:\n%s", table)
