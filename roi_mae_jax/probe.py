r"""Task `probe`: a linear probe (ADHD vs control) on the frozen pretrained encoder.

    python -m roi_mae_jax.main --config=configs/probe.py --workdir=runs/probe \
        --config.checkpoint=runs/demo
    python -m roi_mae_jax.main --config=configs/probe.py --workdir=runs/probe_adhd200 \
        --config.checkpoint=runs/pretrain_adhd200 --config.data.shards=runs/adhd200_4mm \
        --config.pool=region

Every window of every labelled subject goes through the encoder with no
masking; features are pooled (`mean` or `region`) and averaged per subject.
Logistic regression (standardised, C by inner CV) is scored under
subject-disjoint stratified k-fold, repeated over seeds, and leave-one-site-out,
by scikit-learn and by the JAX probe on the same splits. Writes to WORKDIR:
probe_results.json (scheme -> metric -> mean, std), probe_table.md,
probe_roc.png, probe_predictions.csv (out-of-fold probability per subject),
probe_features.npz.
"""

from __future__ import annotations

import os

import ml_collections
import numpy as np
from absl import logging

from roi_mae_jax import embeddings
from roi_mae_jax import errors
from roi_mae_jax import linear_probe
from roi_mae_jax import outputs
from roi_mae_jax import plots
from roi_mae_jax import pretrained as pretrained_lib
from roi_mae_jax import splits as splits_lib
from roi_mae_jax import train
from roi_mae_jax.data import shards

REQUIRED_KEYS = ("checkpoint", "pool", "folds", "repeats", "schemes")
OUTPUT_NAMES = ("probe_results.json", "probe_table.md", "probe_roc.png",
                "probe_predictions.csv", "probe_features.npz")
SCHEMES = ("kfold", "loso")
METRIC_NAMES = {"accuracy": "accuracy", "balanced_accuracy": "balanced acc.",
                "roc_auc": "ROC AUC", "sensitivity": "sensitivity", "specificity": "specificity"}


def data_source(pre: pretrained_lib.Pretrained, data: ml_collections.ConfigDict):
  """The probe's scans: prepared shards, or the pretraining run's synthetic data
  (with `data.synthetic_subjects` subjects when set)."""
  config = ml_collections.ConfigDict(pre.config.to_dict())
  config.data.shards = data.shards
  if data.get("synthetic_subjects"):
    config.data.synthetic.num_subjects = int(data.synthetic_subjects)
  return train.make_source(config, multiple_of=int(config.patches.size))


def make_splits(config, feats: embeddings.SubjectFeatures) -> list[splits_lib.Split]:
  schemes = [s.strip() for s in config.schemes.split(",") if s.strip()]
  unknown = set(schemes) - set(SCHEMES)
  if unknown or not schemes:
    raise errors.InputError(f"config.schemes must list {' and/or '.join(SCHEMES)}, "
                            f"got {config.schemes!r}")
  out = []
  if "kfold" in schemes:
    out += splits_lib.kfold_splits(feats.labels, int(config.folds), range(int(config.repeats)))
  if "loso" in schemes:
    out += splits_lib.leave_one_site_out(feats.sites, feats.labels)
  splits_lib.check_disjoint(out, feats.subjects)
  return out


def evaluate(config, feats: embeddings.SubjectFeatures, splits) -> tuple[dict, dict]:
  """(results, out-of-fold probabilities per (scheme, probe)) for every split."""
  probes = {"sklearn": linear_probe.sklearn_probe}
  if config.jax_probe:
    probes["jax"] = linear_probe.jax_probe
  per_split, oof = {}, {}
  x, y = feats.features, feats.labels
  for n, split in enumerate(splits, start=1):
    for name, fit in probes.items():
      probs, c = fit(x[split.train], y[split.train], x[split.test],
                     inner_folds=int(config.inner_folds), seed=int(config.seed))
      metrics = linear_probe.binary_metrics(y[split.test], probs)
      per_split.setdefault((split.scheme, name), []).append(dict(metrics, C=c,
                                                                  split=split.name))
      # Out-of-fold predictions: the first repeat of k-fold, every site of LOSO.
      if split.scheme == "loso" or split.name.startswith("seed0/"):
        store = oof.setdefault((split.scheme, name), np.full(len(y), np.nan))
        store[split.test] = probs
    logging.info("probe split %d/%d (%s %s): AUC %.3f", n, len(splits), split.scheme,
                 split.name, per_split[(split.scheme, "sklearn")][-1]["roc_auc"])
  results = {}
  for (scheme, name), values in per_split.items():
    key = scheme if name == "sklearn" else f"{scheme}_{name}"
    results[key] = linear_probe.summarise(values)
    results.setdefault("splits", {})[key] = values
  return results, oof


def markdown_table(results: dict, method: str = "sklearn") -> str:
  """Keys 'kfold', 'loso_jax', ...: scheme, then the method (`method` when none)."""
  header = "| scheme | method | " + " | ".join(METRIC_NAMES.values()) + " |"
  lines = [header, "|" + "---|" * (2 + len(METRIC_NAMES))]
  for key in sorted(k for k in results if k not in ("splits", "meta")):
    scheme, _, probe = key.partition("_")
    cells = [f"{results[key][m]['mean']:.3f} ± {results[key][m]['std']:.3f}"
             for m in METRIC_NAMES]
    lines.append(f"| {scheme} | {probe or method} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  paths = dict(zip(OUTPUT_NAMES, outputs.claim(workdir, OUTPUT_NAMES, config.overwrite)))
  pre = pretrained_lib.load_pretrained(config.checkpoint, config.checkpoint_step or None)
  logging.info("encoder from %s (step %d, %s, %d tokens per window)", config.checkpoint,
               pre.step, pre.config.model.size, pre.spec.num_tokens)
  source = data_source(pre, config.data)
  feats = embeddings.subject_features(pre, source, config.pool, labelled_only=True,
                                      batch_size=int(config.batch_size),
                                      max_windows=int(config.max_windows))
  logging.info("%d subjects (%d ADHD, %d control), %d features, %.1f windows per subject",
               len(feats.subjects), int((feats.labels == 1).sum()),
               int((feats.labels == 0).sum()), feats.features.shape[1], feats.windows.mean())
  splits = make_splits(config, feats)
  results, oof = evaluate(config, feats, splits)
  results["meta"] = {
      "checkpoint": os.path.abspath(config.checkpoint), "step": pre.step,
      "pool": config.pool, "features": int(feats.features.shape[1]),
      "subjects": len(feats.subjects), "adhd": int((feats.labels == 1).sum()),
      "control": int((feats.labels == 0).sum()), "sites": sorted(set(feats.sites)),
      "windows_per_subject": float(feats.windows.mean()), "folds": int(config.folds),
      "repeats": int(config.repeats), "mask_strategy": pre.config.mask.strategy}
  outputs.write_json(paths["probe_results.json"], results)
  with open(paths["probe_table.md"], "w", encoding="utf-8") as f:
    f.write(f"Linear probe, ADHD vs control: {len(feats.subjects)} subjects, "
            f"pool {config.pool}, encoder step {pre.step} "
            f"({pre.config.mask.strategy} masking)\n\n" + markdown_table(results))
  rows = []
  for (scheme, probe), probs in sorted(oof.items()):
    rows += [{"scheme": scheme, "probe": probe, "subject": s, "site": site, "label": int(l),
              "probability": round(float(p), 6)}
             for s, site, l, p in zip(feats.subjects, feats.sites, feats.labels, probs)
             if np.isfinite(p)]
  shards.write_table(paths["probe_predictions.csv"],
                     ("scheme", "probe", "subject", "site", "label", "probability"), rows)
  curves = {f"{scheme} ({probe})": (feats.labels[np.isfinite(p)], p[np.isfinite(p)])
            for (scheme, probe), p in sorted(oof.items())}
  plots.save(plots.roc_figure(curves, f"linear probe, pool {config.pool}"),
             paths["probe_roc.png"])
  np.savez_compressed(paths["probe_features.npz"], features=feats.features,
                      labels=feats.labels, subjects=np.array(feats.subjects),
                      sites=np.array(feats.sites))
  logging.info("probe results:\n%s", markdown_table(results))
