"""Resampling a scan onto the target grid (space, then time) and normalising it.

    sampler = TrilinearSampler(scan.affine, scan.shape, target_world_mm)  # (N, 3) points
    values = sampler(frames)                       # (X, Y, Z, n) -> (N, n)
    run = resample_time(values, source_tr=2.5, target_tr=2.0)
    z = normalise(run, valid, mode="global")

Space is resampled in world coordinates, so LAS and RAS files (and any voxel
size) land on the same millimetres; points outside the field of view get 0
and are flagged as not covered.
"""

from __future__ import annotations

import itertools

import nibabel as nib
import numpy as np

NORMALISATIONS = ("global", "voxel")


class TrilinearSampler:
  """Trilinear interpolation from a source voxel grid at fixed world points.

  The 8 neighbours and weights of every point are computed once per scan and
  reused for every frame.
  """

  def __init__(self, source_affine: np.ndarray, source_shape: tuple[int, int, int],
               world_mm: np.ndarray):
    shape = np.asarray(source_shape[:3])
    ijk = nib.affines.apply_affine(np.linalg.inv(source_affine), world_mm)
    base = np.floor(ijk).astype(np.int64)
    frac = (ijk - base).astype(np.float32)
    index, weight = [], []
    for corner in itertools.product((0, 1), repeat=3):
      at = base + np.array(corner)
      w = np.prod(np.where(np.array(corner, bool), frac, 1.0 - frac), axis=1)
      inside = np.all((at >= 0) & (at < shape), axis=1)
      index.append(np.ravel_multi_index(tuple(np.clip(at, 0, shape - 1).T), tuple(shape),
                                        order="F"))
      weight.append(np.where(inside, w, 0.0).astype(np.float32))
    self.index = np.stack(index)       # (8, N) Fortran-order voxel indices
    self.weight = np.stack(weight)     # (8, N), 0 outside the field of view
    self.covered = self.weight.sum(0) > 1.0 - 1e-4

  def __call__(self, frames: np.ndarray) -> np.ndarray:
    """(X, Y, Z, n) -> (N, n) values at the points."""
    flat = frames.reshape(-1, frames.shape[-1], order="F")
    out = np.zeros((self.index.shape[1], frames.shape[-1]), np.float32)
    for k in range(8):
      out += self.weight[k][:, None] * flat[self.index[k]]
    return out

  def touches(self, voxels: np.ndarray) -> np.ndarray:
    """(N,) bool: points whose interpolation uses a voxel where `voxels` is True."""
    flat = voxels.reshape(-1, order="F")
    return np.any((self.weight > 0) & flat[self.index], axis=0)


def resample_time(values: np.ndarray, source_tr: float, target_tr: float) -> np.ndarray:
  """Linear interpolation along the last axis from `source_tr` to `target_tr`.

  Output frame k sits at k * target_tr seconds; frames past the last source
  frame are dropped. Resting-state signal (< 0.1 Hz) is far below the Nyquist
  frequency of any TR up to 5 s, so no anti-alias filter is applied.
  """
  if abs(source_tr - target_tr) < 1e-6:
    return values
  frames = values.shape[-1]
  count = int(np.floor((frames - 1) * source_tr / target_tr + 1e-9)) + 1
  position = np.arange(count) * target_tr / source_tr
  lower = np.minimum(np.floor(position).astype(np.int64), frames - 1)
  upper = np.minimum(lower + 1, frames - 1)
  w = (position - lower).astype(np.float32)
  out = values[..., lower]  # in place from here: runs at 2 mm are hundreds of MiB
  out *= 1 - w
  out += values[..., upper] * w
  return out


def _mean_std(values: np.ndarray, axis=None, block: int = 1 << 14):
  """float64 mean and std of float32 values, one block of rows in float64 at a time.

  Squares are taken in float64: float32 squares overflow to inf past ~1.8e19
  (data scaled to 1e30 would then normalise to all zeros).
  """
  if axis is None:
    total = sum(float(np.sum(values[i:i + block], dtype=np.float64))
                for i in range(0, len(values), block))
    mean = total / values.size
    squares = sum(float(np.sum(np.square(values[i:i + block].astype(np.float64) - mean)))
                  for i in range(0, len(values), block))
    return mean, np.sqrt(squares / values.size)
  mean = values.mean(axis=axis, keepdims=True, dtype=np.float64)
  std = np.concatenate([
      np.sqrt(np.square(values[i:i + block].astype(np.float64) - mean[i:i + block]).mean(
          axis=axis, keepdims=True)) for i in range(0, len(values), block)] or [mean * 0])
  return mean, std


def normalise(run: np.ndarray, valid: np.ndarray, mode: str = "global") -> np.ndarray:
  """z-scores (N, T) values over the `valid` (N,) points; invalid points become 0.

  global: one mean and std over all valid points and frames (keeps the
    spatial contrast between regions).
  voxel: each point over time (removes it; constant points become 0).
  Statistics are float64 and every threshold is relative, so data scaled by
  any factor (1e-30 or 1e30) give the same output.
  """
  if mode not in NORMALISATIONS:
    raise ValueError(f"normalise must be one of {NORMALISATIONS}, got {mode!r}")
  out = np.zeros(run.shape, np.float32)
  values = run[valid]  # a float32 copy, normalised in place
  if mode == "global":
    mean, std = _mean_std(values)
    # In float64, then back: (x - mean) / std of float32 data is within float32 range.
    for i in range(0, len(values), 1 << 14):
      part = values[i:i + (1 << 14)]
      part[...] = ((part.astype(np.float64) - mean) / (std if std > 0 else 1.0)).astype(np.float32)
  else:
    mean, std = _mean_std(values, axis=1)
    # Constant up to float32 rounding (~1e-7 of the value): no signal at that point.
    flat = std[:, 0] <= 1e-6 * np.abs(mean[:, 0])
    scale = np.where(flat[:, None], 1.0, std)
    for i in range(0, len(values), 1 << 14):
      rows = slice(i, i + (1 << 14))
      values[rows] = ((values[rows] - mean[rows]) / scale[rows]).astype(np.float32)
    values[flat] = 0.0
  out[valid] = values
  return out
