"""What an encoder keeps of each region's fluctuation: a linear read-out of the synthetic truth.

    result = recover(pre, source)        # source: synthetic subjects (sources.downstream_source)
    result["summary"]["own"]["effect"]   # cross-validated R², one value per encoder layer
    result["r2"]["network"][layer][k]    # region k of result["regions"]

The synthetic generator builds every region's fluctuation from its network's
series and its own (`SyntheticFMRI.components`); group effects live in the
own part of the effect regions (they decouple and grow in ADHD). For each
encoder layer (0 = the embedded tokens .. depth = the output) and pooled
region, a ridge regression from the region's mean embedding at each time step
to each component, averaged over that step's frames, is fitted across
subjects and scored on held-out subjects (5-fold by subject, R²). Embeddings
and components are centred within each subject first, so the score counts
fluctuation over time, not static differences between subjects or sites.
Summaries average the regions of the effect group and of the rest.
"""

from __future__ import annotations

import numpy as np
from absl import logging

from roi_mae_jax import errors
from roi_mae_jax.downstream import features as features_lib
from roi_mae_jax.downstream import pretrained as pretrained_lib

COMPONENTS = ("network", "own")
RIDGE = 0.1  # penalty per training sample on standardised features: linear, stable, fixed


def _truth(data, subject: int, starts: list[int], frames: int, step_frames: int
           ) -> dict[str, np.ndarray]:
  """component -> (T', R): each time step's mean over its frames, windows in order."""
  parts = data.components(subject)
  steps = frames // step_frames
  out = {}
  for name in COMPONENTS:
    series = parts[name]  # (R, run_frames)
    chunks = [series[:, s + k * step_frames:s + (k + 1) * step_frames].mean(1)
              for s in starts for k in range(steps)]
    out[name] = np.stack(chunks)
  return out


def _ridge_r2(x: np.ndarray, y: np.ndarray, groups: np.ndarray, folds: int) -> np.ndarray:
  """Held-out R² of ridge x -> y (columns), folds by group. x (N, D), y (N, C) -> (C,)."""
  unique = np.unique(groups)
  fold_of = {g: i % folds for i, g in enumerate(unique)}
  fold = np.array([fold_of[g] for g in groups])
  predicted = np.zeros_like(y)
  for k in range(folds):
    train, test = fold != k, fold == k
    mean, std = x[train].mean(0), x[train].std(0) + 1e-6
    xs = (x[train] - mean) / std
    w = np.linalg.solve(xs.T @ xs + RIDGE * len(xs) * np.eye(x.shape[1]),
                        xs.T @ (y[train] - y[train].mean(0)))
    predicted[test] = ((x[test] - mean) / std) @ w + y[train].mean(0)
  residual = ((y - predicted) ** 2).sum(0)
  total = ((y - y.mean(0)) ** 2).sum(0)
  return 1.0 - residual / np.maximum(total, 1e-12)


def recover(pre: pretrained_lib.Pretrained, source, batch_size: int = 8,
            folds: int = 5) -> dict:
  """Recovery R² of each region's network and own component from every encoder layer.

  `source` must hold the built-in synthetic subjects (their components are known);
  prepared data is an InputError. Returns {"step", "layers", "regions", "effect",
  "r2": {component: (L, R') lists}, "summary": {component: {effect|other: (L,)}}}.
  """
  data = getattr(source, "data", None)
  if data is None or not hasattr(data, "components"):
    raise errors.InputError("recovery needs the built-in synthetic subjects (their network "
                            "and own components are known); prepared data has no ground truth")
  layers = tuple(range(pre.depth + 1))
  extractor = features_lib.EncoderFeatures(pre, "region", batch_size=batch_size,
                                           layers=layers, name="recovery")
  names = [r.name for r in data.atlas.regions]
  pooled = [names.index(pre.patch_map.regions[i].name) for i in pre.pooled_regions]
  step_frames = int(pre.config.patches.frames)
  xs, ys, groups = [], {c: [] for c in COMPONENTS}, []
  for scan in range(len(source)):
    _, courses = extractor.scan_courses(source, scan)  # (T', L, R', width)
    truth = _truth(data, scan, extractor.windows(source, scan), source.frames, step_frames)
    xs.append(courses - courses.mean(0, keepdims=True))
    for c in COMPONENTS:
      y = truth[c][:, pooled]
      ys[c].append(y - y.mean(0, keepdims=True))
    groups += [scan] * len(courses)
  x = np.concatenate(xs)  # (N, L, R', width)
  y = np.stack([np.concatenate(ys[c]) for c in COMPONENTS], -1)  # (N, R', C)
  groups = np.asarray(groups)
  r2 = np.zeros((len(COMPONENTS), len(layers), len(pooled)))
  for layer in layers:
    for k in range(len(pooled)):
      r2[:, layer, k] = _ridge_r2(x[:, layer, k].astype(np.float64), y[:, k], groups, folds)
  effect = data.effect[pooled]
  summary = {c: {"effect": r2[i][:, effect].mean(1).tolist() if effect.any() else [],
                 "other": r2[i][:, ~effect].mean(1).tolist()}
             for i, c in enumerate(COMPONENTS)}
  logging.info("recovery at step %d: own R² by layer, effect regions %s, others %s", pre.step,
               np.round(summary["own"]["effect"], 3), np.round(summary["own"]["other"], 3))
  return {"step": int(pre.step), "layers": list(layers),
          "regions": [names[i] for i in pooled], "effect": effect.tolist(),
          "r2": {c: r2[i].tolist() for i, c in enumerate(COMPONENTS)}, "summary": summary}
