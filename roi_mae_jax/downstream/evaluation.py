"""Linear probes of several feature sets on the same subject-disjoint splits.

    sets = {"encoder": feats, "fc": fc_feats, "init": init_feats}   # same subjects, same order
    splits = splits_lib.from_config(config, feats)
    results = evaluate(sets, splits, reference="encoder")
    results["features"]["fc"]["kfold"]["balanced_accuracy"]["mean"]
    results["differences"]["fc"]["kfold"]["roc_auc"]      # encoder - fc: mean, 95% CI, p
    print(markdown_table(results))

    results, sets = probe_encoder(probe_config, pre, source)   # what task `probe` writes

Every feature set is fitted by the same standardised, class-balanced logistic
regression (C by inner CV) on the same splits, so the scores pair split by
split: differences against the reference use the corrected resampled t-test
of `downstream.stats` (k-fold training sets overlap).
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np
from absl import logging

import ml_collections

from roi_mae_jax import errors
from roi_mae_jax.downstream import features as features_lib
from roi_mae_jax.downstream import logistic
from roi_mae_jax.downstream import pairing
from roi_mae_jax.downstream import pretrained as pretrained_lib
from roi_mae_jax.downstream import readouts
from roi_mae_jax.downstream import splits as splits_lib
from roi_mae_jax.downstream import stats

METRIC_NAMES = {"balanced_accuracy": "balanced acc.", "roc_auc": "ROC AUC",
                "accuracy": "accuracy", "sensitivity": "sensitivity",
                "specificity": "specificity"}


def _check_same_subjects(sets: Mapping[str, features_lib.SubjectFeatures]) -> None:
  first_name, first = next(iter(sets.items()))
  for name, feats in sets.items():
    if feats.subjects != first.subjects or not np.array_equal(feats.labels, first.labels):
      raise errors.InputError(f"feature sets {first_name} and {name} hold different subjects")


def test_fraction(splits: Sequence[splits_lib.Split]) -> float:
  """Mean n_test / n of the splits (1/k for k-fold): the correction of the t-test."""
  return float(np.mean([len(s.test) / (len(s.test) + len(s.train)) for s in splits]))


def evaluate(sets: Mapping[str, features_lib.SubjectFeatures],
             splits: Sequence[splits_lib.Split], reference: str = "encoder",
             inner_folds: int = 3, seed: int = 0) -> dict:
  """Scores of every feature set on every split, summaries, differences to `reference`.

  Returns {"features": {set: {scheme: metric summaries}}, "splits": {set: {scheme:
  [per-split metrics]}}, "differences": {set: {scheme: {metric: reference - set}}},
  "oof": {set: {scheme: out-of-fold probabilities (first repeat of k-fold, every
  LOSO site)}}}.
  """
  _check_same_subjects(sets)
  per_split: dict[str, dict[str, list]] = {}
  oof: dict[str, dict[str, np.ndarray]] = {}
  for key, feats in sets.items():
    x, y = feats.features, feats.labels
    for split in splits:
      probs, c = logistic.sklearn_probe(x[split.train], y[split.train], x[split.test],
                                            inner_folds=inner_folds, seed=seed)
      scores = dict(logistic.binary_metrics(y[split.test], probs), C=c, split=split.name)
      per_split.setdefault(key, {}).setdefault(split.scheme, []).append(scores)
      if split.scheme == "loso" or split.name.startswith("seed0/"):
        store = oof.setdefault(key, {}).setdefault(split.scheme, np.full(len(y), np.nan))
        store[split.test] = probs
    logging.info("probe %s: %s", key, ", ".join(
        f"{scheme} balanced acc. {logistic.summarise(v)['balanced_accuracy']['mean']:.3f}"
        for scheme, v in per_split[key].items()))
  results = {"features": {k: {scheme: logistic.summarise(v) for scheme, v in by.items()}
                          for k, by in per_split.items()},
             "splits": per_split, "reference": reference, "oof": oof}
  results["differences"] = differences(per_split, reference, splits)
  return results


def feature_sets(config: ml_collections.ConfigDict, pre: pretrained_lib.Pretrained,
                 source) -> dict[str, features_lib.SubjectFeatures]:
  """"encoder" (the checkpoint with `config.pool` over `config.layers`), every read-out
  of `config.readouts`, every baseline of `config.baselines` (with `init`, the read-outs'
  twins on the initial parameters; see readouts.py), from one pass over the data."""
  return features_lib.extract(readouts.probe_extractors(config, pre), source)


def probe_encoder(config: ml_collections.ConfigDict, pre: pretrained_lib.Pretrained,
                  source) -> tuple[dict, dict[str, features_lib.SubjectFeatures]]:
  """The probe of a probe config (`configs/probe.py`): (results, feature sets).

  `results` is `evaluate`'s dict plus "meta" (what was probed, subject counts);
  it keeps "oof" (out-of-fold probabilities, arrays) for the caller to write.
  """
  sets = feature_sets(config, pre, source)
  feats = sets["encoder"]
  logging.info("%d subjects (%d ADHD, %d control), %d encoder features, %.1f windows per "
               "subject", len(feats.subjects), int((feats.labels == 1).sum()),
               int((feats.labels == 0).sum()), feats.features.shape[1], feats.windows.mean())
  splits = splits_lib.from_config(config, feats.subjects, feats.labels, feats.sites)
  results = evaluate(sets, splits, reference="encoder", inner_folds=int(config.inner_folds),
                     seed=int(config.seed))
  results["meta"] = {
      "checkpoint": os.path.abspath(config.checkpoint), "step": pre.step,
      "pool": config.pool, "stride": int(config.stride),
      "layers": str(config.get("layers", "")), "readouts": str(config.get("readouts", "")),
      "features": {k: int(v.features.shape[1]) for k, v in sets.items()},
      "subjects": len(feats.subjects), "adhd": int((feats.labels == 1).sum()),
      "control": int((feats.labels == 0).sum()), "sites": sorted(set(feats.sites)),
      "windows_per_subject": float(feats.windows.mean()), "folds": int(config.folds),
      "repeats": int(config.repeats), "mask_strategy": pre.config.mask.strategy,
      # what fixes the splits, so two probes' scores can be paired (pairing.py)
      "subjects_digest": pairing.subjects_digest(feats.subjects, feats.labels, feats.sites),
      "test_fraction": {scheme: test_fraction([s for s in splits if s.scheme == scheme])
                        for scheme in sorted({s.scheme for s in splits})},
      "synthetic_preset": "" if config.data.shards else config.data.get("synthetic_preset", "")}
  return results, sets


def differences(per_split: Mapping[str, Mapping[str, list]], reference: str,
                splits: Sequence[splits_lib.Split]) -> dict:
  """{set: {scheme: {metric: paired difference reference - set}}} over shared splits."""
  if reference not in per_split:
    return {}
  fractions = {scheme: test_fraction([s for s in splits if s.scheme == scheme])
               for scheme in {s.scheme for s in splits}}
  out = {}
  for name, by_scheme in per_split.items():
    if name == reference:
      continue
    for scheme, values in by_scheme.items():
      ours = {s["split"]: s for s in per_split[reference].get(scheme, [])}
      theirs = {s["split"]: s for s in values}
      out.setdefault(name, {})[scheme] = {
          m: stats.paired_difference(
              {k: v[m] for k, v in ours.items()}, {k: v[m] for k, v in theirs.items()},
              # leave-one-site-out splits share no test subjects: the plain paired test
              test_fraction=fractions[scheme] if scheme == "kfold" else 0.0)
          for m in ("balanced_accuracy", "roc_auc")}
  return out


def _cell(summary: dict) -> str:
  return f"{summary['mean']:.3f} ± {summary['std']:.3f}"


def _difference(d: dict) -> str:
  if not np.isfinite(d["mean"]):
    return "–"
  return f"{d['mean']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"


def markdown_table(results: dict, labels: Mapping[str, str] | None = None) -> str:
  """One row per feature set and scheme; the reference's differences to the others."""
  labels = labels or {}
  reference = results.get("reference", "encoder")
  paired = bool(results.get("differences"))
  names = list(METRIC_NAMES.values()) + ([f"{reference} - these: balanced acc. (95% CI)",
                                          "AUC (95% CI)"] if paired else [])
  lines = [f"| features | scheme | {' | '.join(names)} |", "|" + "---|" * (2 + len(names))]
  for key, by_scheme in results["features"].items():
    for scheme, summary in by_scheme.items():
      diff = results.get("differences", {}).get(key, {}).get(scheme)
      extra = ([] if not paired else
               [_difference(diff["balanced_accuracy"]), _difference(diff["roc_auc"])] if diff
               else ["(reference)" if key == reference else "–", "–"])
      cells = [_cell(summary[m]) for m in METRIC_NAMES]
      lines.append(f"| {labels.get(key, key)} | {scheme} | " + " | ".join(cells + extra) + " |")
  return "\n".join(lines) + "\n"
