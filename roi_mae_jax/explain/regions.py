"""Integrated gradients of a clip classifier, aggregated to AAL3 regions (the library of
task `attribute`).

    result = explain(attribute_config, pre, source)     # configs/attribute.py settings
    result["regions"][0]["name"], result["groups"], result["maps"]["abs_all"]
    result["summary"]["completeness"]                   # sum of IG vs logit difference

The classifier is the frozen encoder + the subject pool (`pool`, features.py)
+ the linear probe refitted on every labelled subject, or, with
`config.classifier` (a finetune workdir), the classifier that run saved. For
each labelled subject, a clip of `max_windows` consecutive windows of each
scan is explained against the baseline (`temporal_mean`: each voxel's mean
over its window, so the fluctuations that amplitude and correlation features
read are what is attributed; or `zeros`: the mean of z-scored data), summed
over frames and windows, averaged over the subject's scans, then over subjects
per class. Regions are ranked by the class contrast of their mean signed IG.
"""

from __future__ import annotations

import os
import time

import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from roi_mae_jax import metrics
from roi_mae_jax.config import validation
from roi_mae_jax.downstream import classifier
from roi_mae_jax.downstream import features
from roi_mae_jax.downstream import logistic
from roi_mae_jax.downstream import pretrained as pretrained_lib
from roi_mae_jax.downstream import readouts
from roi_mae_jax.explain import integrated_gradients as ig
from roi_mae_jax.explain import reconstruction

BASELINES = ("zeros", "temporal_mean")
MAPS = ("abs_all", "signed_adhd", "signed_control", "abs_adhd", "abs_control")


def baseline_of(windows: np.ndarray, kind: str) -> np.ndarray:
  """The IG baseline `kind` (BASELINES) of `windows`."""
  validation.refuse("baseline", kind)
  if kind == "zeros":
    return np.zeros_like(windows)
  return np.broadcast_to(windows.mean(-1, keepdims=True), windows.shape).copy()


def subject_maps(config, pre, source, logit_fn, labels_by_subject: dict) -> tuple[dict, list]:
  """Per-class mean maps (X, Y, Z) and (sum of IG, logit difference) per clip."""
  by_subject: dict[str, list[np.ndarray]] = {}
  errors_ = []
  clips = features.window_clips(source, labels_by_subject, int(config.max_windows),
                                first_only=True)
  jobs = [(subject, clip) for subject, items in clips.items() for clip in items]
  started = time.time()
  for n, (subject, clip) in enumerate(jobs, start=1):
    clip = np.stack([source.window_at(i, s) for i, s in clip])[None]   # (1, K, X, Y, Z, T)
    attr, delta = ig.integrated_gradients(
        logit_fn, jnp.asarray(clip), jnp.asarray(baseline_of(clip, config.baseline)),
        steps=int(config.ig_steps), chunk=int(config.ig_chunk))
    errors_.append((float(np.asarray(attr).sum()), float(delta[0])))
    by_subject.setdefault(subject, []).append(np.asarray(attr)[0].sum(axis=(0, -1)))
    if n == len(jobs) or n % 10 == 0:
      rate = n / max(time.time() - started, 1e-9)
      logging.info("attribution %s %d/%d scans | %.2f scans/s | eta %s",
                   metrics.progress_bar(n, len(jobs)), n, len(jobs), rate,
                   metrics.duration((len(jobs) - n) / rate))
  signed = {s: np.mean(v, axis=0) for s, v in by_subject.items()}
  absolute = {s: np.mean(np.abs(v), axis=0) for s, v in by_subject.items()}
  groups = {"all": list(signed), "adhd": [s for s in signed if labels_by_subject[s] == 1],
            "control": [s for s in signed if labels_by_subject[s] == 0]}
  zero = np.zeros(source.grid.shape, np.float32)

  def mean_over(subjects, table):
    return np.mean([table[s] for s in subjects], axis=0) if subjects else zero

  maps = {"abs_all": mean_over(groups["all"], absolute),
          "signed_adhd": mean_over(groups["adhd"], signed),
          "signed_control": mean_over(groups["control"], signed),
          "abs_adhd": mean_over(groups["adhd"], absolute),
          "abs_control": mean_over(groups["control"], absolute)}
  return maps, errors_


def region_rows(maps: dict, on_grid, min_voxels: int = 0) -> list[dict]:
  """One row per region on the grid, ranked by mean |IG| per voxel.

  Regions under `min_voxels` voxels on the grid (thalamic and brainstem nuclei
  at 4 mm) get no rank and come last: a mean over a handful of voxels is
  noise, and would otherwise crowd the top of the table.
  """
  rows = []
  for region in on_grid.regions:
    voxels = on_grid.labels == region.id
    count = int(voxels.sum())
    if not count:
      continue
    row = {"id": region.id, "name": region.name, "hemisphere": region.hemisphere,
           "system": region.system, "voxels": count,
           "abs_mean": float(maps["abs_all"][voxels].mean()),
           "abs_sum": float(maps["abs_all"][voxels].sum())}
    for name in MAPS[1:]:
      row[f"{name}_mean"] = float(maps[name][voxels].mean())
    row["contrast"] = abs(row["signed_adhd_mean"] - row["signed_control_mean"])
    rows.append(row)
  rows.sort(key=lambda r: (r["voxels"] < min_voxels, -r["contrast"]))
  for rank, row in enumerate(rows, start=1):
    row["rank"] = rank if row["voxels"] >= min_voxels else ""
  return rows


def group_rows(rows: list[dict], min_voxels: int) -> list[dict]:
  """Regions pooled by hemisphere and by system (voxel-weighted), by contrast per level;
  a group under `min_voxels` voxels goes last (its contrast is noise, as a region's)."""
  out = []
  for level in ("hemisphere", "system"):
    groups = []
    for name in sorted({r[level] for r in rows}):
      members = [r for r in rows if r[level] == name]
      voxels = sum(r["voxels"] for r in members)
      total = sum(r["abs_sum"] for r in members)
      difference = sum(r["voxels"] * (r["signed_adhd_mean"] - r["signed_control_mean"])
                       for r in members)
      groups.append({"level": level, "name": name, "regions": len(members), "voxels": voxels,
                     "contrast": abs(difference) / voxels, "abs_sum": total,
                     "abs_mean": total / voxels})
    out += sorted(groups, key=lambda g: (g["voxels"] < min_voxels, -g["contrast"]))
  return out


def probe_classifier(config, pre, source):
  """The probe's logistic regression refitted on every labelled subject:
  (logit function of a clip, labels by subject, description, the head).

  Fitted on the features of the clips that are explained, so the head reads
  what the attribution path computes.
  """
  layers = readouts.parse_layers(config.get("layers", ""), pre.depth)
  feats = features.EncoderFeatures(pre, config.pool, batch_size=int(config.batch_size),
                                   max_windows=int(config.max_windows), layers=layers)(source)
  head = classifier.fit_linear_head(feats.features, feats.labels, config.pool,
                                    seed=int(config.seed), layers=layers)
  probs = 1 / (1 + np.exp(-np.asarray(head.logit(jnp.asarray(feats.features)))))
  fit = logistic.binary_metrics(feats.labels, probs)
  logging.info("linear head on %d subjects: C %.3g, in-sample AUC %.3f", len(feats.labels),
               head.c, fit["roc_auc"])
  about = {"kind": "linear probe", "pool": config.pool, "C": head.c,
           "layers": str(config.get("layers", "")),
           "in_sample_auc": fit["roc_auc"]}
  return (classifier.clip_logit(pre, head), dict(zip(feats.subjects, feats.labels.tolist())),
          about, head)


def finetuned_classifier(config, pre, source):
  """The classifier a finetune run saved in `config.classifier`."""
  params, meta = classifier.load_classifier(config.classifier, pre)
  pool = meta["pool"]
  table = features.subject_table(source)
  labels = dict(zip(table.subjects, table.labels.tolist()))
  about = {"kind": "fine-tuned", "path": os.path.abspath(config.classifier), "pool": pool}
  return (lambda windows: classifier.logits(pre, pool, params, windows)), labels, about, None


def reconstruction_rows(pre, source, count: int) -> list[dict]:
  """Each region masked alone: the autoencoder's error there over the first window of
  `count` scans, best first."""
  windows = np.stack([source.window_at(i, 0) for i in range(min(count, len(source)))])
  rows = reconstruction.reconstruction_by_region(pre, windows)
  logging.info("reconstruction by region over %d windows: best %s (MSE %.3f), worst %s "
               "(MSE %.3f)", len(windows), rows[0]["name"], rows[0]["mse"], rows[-1]["name"],
               rows[-1]["mse"])
  return rows


def completeness_summary(pairs: list[tuple[float, float]]) -> dict:
  """How far sum(IG) is from f(x) - f(baseline), per window and against the typical size.

  The per-window ratio blows up where the logit barely moves, so the error is
  also given against the mean |f(x) - f(baseline)| over windows.
  """
  sums, deltas = np.array(pairs).T
  error = np.abs(sums - deltas)
  relative = error / np.maximum(np.abs(deltas), 1e-6)
  return {"relative_median": float(np.median(relative)), "relative_max": float(relative.max()),
          "max_over_mean_delta": float(error.max() / max(np.abs(deltas).mean(), 1e-6)),
          "mean_abs_delta": float(np.abs(deltas).mean())}


def explain(config: ml_collections.ConfigDict, pre: pretrained_lib.Pretrained,
            source) -> dict:
  """Attribution of an attribute config (`configs/attribute.py`) as a dict.

      result = explain(config, pre, source)
      result["regions"][0]["name"], result["groups"], result["summary"]["completeness"]

  Keys: "maps" (name -> (X, Y, Z) mean IG maps, MAPS), "regions" (region_rows),
  "groups" (group_rows), "summary" (what attribution_summary.json holds),
  "head" (the probe head that was explained, or None for a fine-tuned
  classifier) and "reconstruction" (reconstruction_rows, [] when
  `reconstruction_windows` is 0).
  """
  validation.refuse("baseline", config.baseline)  # before the classifier is fitted
  if config.classifier:
    logit_fn, labels, about, head = finetuned_classifier(config, pre, source)
  else:
    logit_fn, labels, about, head = probe_classifier(config, pre, source)
  maps, completeness = subject_maps(config, pre, source, logit_fn, labels)
  rows = region_rows(maps, pre.patch_map.atlas, int(config.min_region_voxels))
  summary = {
      "subjects": len(labels), "windows": len(completeness),
      "ig_steps": int(config.ig_steps), "baseline": config.baseline,
      "completeness": completeness_summary(completeness),
      "classifier": about,
      "top_regions": [r["name"] for r in rows[:10] if r["rank"]],
      "checkpoint_step": pre.step}
  reconstruction = (reconstruction_rows(pre, source, int(config.reconstruction_windows))
                    if config.reconstruction_windows else [])
  return {"maps": maps, "regions": rows, "summary": summary, "head": head,
          "groups": group_rows(rows, int(config.min_region_voxels)),
          "reconstruction": reconstruction}
