"""Subject features: extractors that turn a scan source into one row per subject.

    extractor = EncoderFeatures(pre, pool="region_std")       # a (pretrained) encoder
    extractor = RegionSeriesFeatures(pre.patch_map.atlas, "fc")  # or "region_stats"
    feats = extractor(source)           # SubjectFeatures: subjects, sites, labels, (S, F)
    extractors = baseline_extractors(pre, "region_stats,fc,init", pool="region_std")

Resting-state group differences live in fluctuation amplitude and in the
correlation between regions over time, both of which vanish when window
embeddings are averaged. So an encoder's features come from the time course
of its embeddings over a scan: consecutive windows (`stride` frames apart;
0 = the window length, no overlap) each give `t = frames / patches.frames`
time steps of every region's mean embedding (one step, their mean, when
windows overlap), concatenated over the subject's windows and scans. Pools:

  mean         mean over time of the mean of all tokens                 (width)
  region       mean over time of each region's embedding                (R' x width)
  region_std   per region and dimension: mean and std over time         (2 x R' x width)
  region_corr  correlation between regions' embedding time courses (covariance
               summed over dimensions), Fisher z, upper triangle        (R' (R'-1) / 2)

Pools join with '+' ("region_std+region_corr"). The classical baselines read
the prepared data directly: `region_stats` (each region's mean time series:
its mean and std over the scan) and `fc` (Pearson correlation of those series,
Fisher z). `pool_courses` is one jnp function, so the classifier that
attribution and fine-tuning differentiate computes exactly these features.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from roi_mae_jax import errors
from roi_mae_jax import metrics
from roi_mae_jax.brain import atlas as atlas_lib
from roi_mae_jax.config import validation
from roi_mae_jax.downstream import pretrained as pretrained_lib
from roi_mae_jax.model import mae as model_lib

POOLS = ("mean", "region", "region_std", "region_corr")
BASELINES = ("region_stats", "fc", "init")
CLASSICAL = ("region_stats", "fc")  # features of the data alone, no encoder
_EPS = 1e-6


@dataclasses.dataclass
class SubjectFeatures:
  subjects: list[str]
  sites: list[str]
  labels: np.ndarray     # (S,) 1 ADHD, 0 control, -1 unlabelled
  features: np.ndarray   # (S, F) float32
  windows: np.ndarray    # (S,) windows (or scans, for baselines) per subject


def check_pools(pool: str) -> list[str]:
  """'region_std+region_corr' -> its parts; a bad name is an InputError."""
  validation.refuse("pool", pool)
  return [p.strip() for p in str(pool).split("+") if p.strip()]


def _corr_upper(series: jax.Array) -> jax.Array:
  """(T, R) or (T, R, D) time courses -> Fisher z of the correlations between the R
  series, upper triangle (R (R-1) / 2).

  With D dimensions the covariance is summed over them (the RV-like
  generalisation of Pearson's r): dim-averaging a layer-normed embedding
  would leave little but the norm's bias.
  """
  centred = series - series.mean(axis=0)
  if centred.ndim == 2:
    centred = centred[..., None]
  cov = jnp.einsum("trd,tsd->rs", centred, centred)
  norm = jnp.sqrt(jnp.diag(cov) + _EPS)
  corr = cov / (norm[:, None] * norm[None, :])
  rows, cols = np.triu_indices(series.shape[1], k=1)
  return jnp.arctanh(jnp.clip(corr[rows, cols], -0.999, 0.999))


def pool_courses(tokens: jax.Array, regions: jax.Array, pool: str) -> jax.Array:
  """Subject features from time courses: tokens (T, width), regions (T, R', width) -> (F,)."""
  out = []
  for part in check_pools(pool):
    if part == "mean":
      out.append(tokens.mean(axis=0))
    elif part == "region":
      out.append(regions.mean(axis=0).reshape(-1))
    elif part == "region_std":
      std = jnp.sqrt(regions.var(axis=0) + _EPS)
      out += [regions.mean(axis=0).reshape(-1), std.reshape(-1)]
    else:
      out.append(_corr_upper(regions))
  return jnp.concatenate(out)


def window_starts(num_frames: int, frames: int, stride: int = 0,
                  max_windows: int = 0) -> list[int]:
  """Starts of windows `stride` frames apart (0: `frames`, no overlap); `max_windows` > 0
  keeps that many consecutive ones from the start."""
  step = stride or frames
  if step < 1:
    raise errors.InputError(f"the window stride must be >= 1 frame, got {stride}")
  starts = list(range(0, num_frames - frames + 1, step))
  return starts[:max_windows] if max_windows else starts


def window_clips(source, subjects, clip_windows: int,
                 first_only: bool = False) -> dict[str, list[list[tuple[int, int]]]]:
  """subject -> its clips, each `clip_windows` consecutive windows as (scan, start).

  Every non-overlapping run of windows of every scan; `first_only`: one clip per
  scan, its first `clip_windows` windows (fewer where the scan is shorter).
  A subject of `subjects` without a clip is an InputError.
  """
  out: dict[str, list[list[tuple[int, int]]]] = {}
  for i in range(len(source)):
    subject = str(source.info(i)["subject"])
    if subject not in subjects:
      continue
    starts = window_starts(source.num_frames(i), source.frames)
    firsts = [0] if first_only else range(0, len(starts) - clip_windows + 1, clip_windows)
    for first in firsts:
      if starts[first:first + clip_windows]:
        out.setdefault(subject, []).append([(i, s) for s in starts[first:first + clip_windows]])
  missing = [s for s in subjects if s not in out]
  if missing:
    raise errors.InputError(f"subject {missing[0]} has no run of {clip_windows} windows "
                            f"({len(missing)} subjects); lower config.clip_windows")
  return out


def window_batches(source, scan: int, starts: list[int], batch_size: int):
  """Yields (windows (batch_size, X, Y, Z, T), n) of one scan's windows at `starts`:
  the last batch padded with zeros to the same size (one compiled shape), of
  which the first n are real."""
  for first in range(0, len(starts), batch_size):
    chunk = starts[first:first + batch_size]
    windows = np.stack([source.window_at(scan, s) for s in chunk])
    if len(chunk) < batch_size:
      pad = np.zeros((batch_size - len(chunk),) + windows.shape[1:], windows.dtype)
      windows = np.concatenate([windows, pad])
    yield windows, len(chunk)


def labelled_scans(source, labelled_only: bool = True) -> list[int]:
  scans = [i for i in range(len(source))
           if not labelled_only or source.info(i)["label"] in (0, 1)]
  if not scans:
    raise errors.InputError("no labelled scan (labels 0/1)")
  return scans


def _by_subject(source, scans: list[int]) -> dict[str, list[int]]:
  """subject -> its scans, in source order; a subject's scans must share one label."""
  out: dict[str, list[int]] = {}
  for i in scans:
    subject = str(source.info(i)["subject"])
    if subject in out and source.info(out[subject][0])["label"] != source.info(i)["label"]:
      raise errors.InputError(f"subject {subject} has scans with different labels")
    out.setdefault(subject, []).append(i)
  return out


def subject_table(source, labelled_only: bool = True) -> SubjectFeatures:
  """Subjects, sites and labels without reading any data (`features` is (S, 0))."""
  groups = _by_subject(source, labelled_scans(source, labelled_only))
  first = [source.info(scans[0]) for scans in groups.values()]
  return SubjectFeatures(list(groups), [str(m["site"]) for m in first],
                         np.array([int(m["label"]) for m in first]),
                         np.zeros((len(groups), 0), np.float32),
                         np.array([len(s) for s in groups.values()]))


def _stack(source, groups: dict[str, list[int]], rows: list[np.ndarray],
           counts: list[int]) -> SubjectFeatures:
  table = [source.info(scans[0]) for scans in groups.values()]
  return SubjectFeatures(list(groups), [str(m["site"]) for m in table],
                         np.array([int(m["label"]) for m in table]),
                         np.stack(rows).astype(np.float32), np.array(counts))


def _progress(what: str, done: int, total: int, started: float) -> None:
  rate = done / max(time.time() - started, 1e-9)
  logging.info("%s %s %d/%d subjects | %.2f subjects/s | eta %s", what,
               metrics.progress_bar(done, total), done, total, rate,
               metrics.duration((total - done) / rate))


class EncoderFeatures:
  """An encoder (pretrained, or `pretrained.random_init`) + a pool over its time courses.

  `layers` (block outputs, 0 = the embedded tokens .. pre.depth = the output;
  None = the output) pools each listed layer's courses alone and joins the rows:

      EncoderFeatures(pre, "region_std+region_corr", layers=(1, 2))
  """

  def __init__(self, pre: pretrained_lib.Pretrained, pool: str = "region_std",
               stride: int = 0, batch_size: int = 8, max_windows: int = 0, name: str = "",
               layers: tuple[int, ...] | None = None):
    check_pools(pool)
    self.pre, self.pool, self.stride = pre, pool, int(stride)
    self.batch_size, self.max_windows = int(batch_size), int(max_windows)
    self.layers = None if layers is None else tuple(int(k) for k in layers)
    if self.layers is not None:
      model_lib.check_layers(self.layers, pre.depth)
    self.name = name or f"encoder ({pool})"
    self._courses = jax.jit(functools.partial(pre.courses, layers=self.layers))

  def windows(self, source, scan: int) -> list[int]:
    return window_starts(source.num_frames(scan), source.frames, self.stride, self.max_windows)

  def scan_courses(self, source, scan: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens (T, width), regions (T, R', width)) of one scan, in fixed-size batches
    (with `layers`: (T, L, width), (T, L, R', width))."""
    tokens, regions = [], []
    for windows, n in window_batches(source, scan, self.windows(source, scan), self.batch_size):
      t, r = jax.device_get(self._courses(self.pre.params, jnp.asarray(windows)))
      tokens.append(t[:n])
      regions.append(r[:n])
    tokens, regions = np.concatenate(tokens), np.concatenate(regions)
    if self.stride and self.stride < source.frames:  # overlapping: one step per window
      return tokens.mean(1), regions.mean(1)
    return tokens.reshape((-1,) + tokens.shape[2:]), regions.reshape((-1,) + regions.shape[2:])

  def check(self, source) -> None:
    if source.frames != self.pre.config.frames:
      raise errors.InputError(f"the data give windows of {source.frames} frames but the "
                              f"encoder was pretrained on {self.pre.config.frames}")

  def scan_part(self, source, scan: int) -> tuple[np.ndarray, np.ndarray]:
    return self.scan_courses(source, scan)

  def subject_row(self, source, scans: list[int], parts: list) -> tuple[np.ndarray, int]:
    """(features (F,), windows read) of a subject from its scans' time courses."""
    tokens = np.concatenate([p[0] for p in parts])
    regions = np.concatenate([p[1] for p in parts])
    if self.layers is None:
      row = np.asarray(pool_courses(jnp.asarray(tokens), jnp.asarray(regions), self.pool))
    else:  # each layer pooled alone: correlations do not mix layers
      row = np.concatenate([np.asarray(pool_courses(jnp.asarray(tokens[:, k]),
                                                    jnp.asarray(regions[:, k]), self.pool))
                            for k in range(len(self.layers))])
    return row, sum(len(self.windows(source, i)) for i in scans)

  def __call__(self, source, labelled_only: bool = True) -> SubjectFeatures:
    return extract({self.name: self}, source, labelled_only)[self.name]


@dataclasses.dataclass(frozen=True)
class _RegionIndex:
  """Voxels sorted by region, so a frame's region sums are one np.add.reduceat."""

  order: np.ndarray    # flat voxel indices, grouped by region
  bounds: np.ndarray   # (R,) where each region's voxels start in `order`
  sizes: np.ndarray    # (R,) voxels per region

  @classmethod
  def of(cls, on_grid: atlas_lib.Atlas) -> "_RegionIndex":
    labels = on_grid.labels.reshape(-1)
    ids = np.array([r.id for r in on_grid.regions if np.any(labels == r.id)])
    voxels = np.flatnonzero(np.isin(labels, ids))
    order = voxels[np.argsort(labels[voxels], kind="stable")]
    bounds = np.searchsorted(labels[order], ids)
    return cls(order, bounds, np.diff(np.append(bounds, len(order))))


def region_series(source, scan: int, on_grid: atlas_lib.Atlas, chunk: int = 64,
                  index: _RegionIndex | None = None) -> np.ndarray:
  """(T, R) mean time series of every region with voxels on the grid, read `chunk` frames
  at a time (a whole 2 mm scan need not fit in memory)."""
  index = index or _RegionIndex.of(on_grid)
  order, bounds, sizes = index.order, index.bounds, index.sizes
  frames = source.num_frames(scan)
  out = []
  for start in range(0, frames, chunk):
    block = source.read(scan, start, min(chunk, frames - start))
    values = block.reshape(-1, block.shape[-1])[order]
    out.append((np.add.reduceat(values, bounds, axis=0) / sizes[:, None]).T)
  return np.concatenate(out)


class RegionSeriesFeatures:
  """A classical baseline on the data's region-mean time series: `region_stats` or `fc`."""

  def __init__(self, on_grid: atlas_lib.Atlas, kind: str):
    if kind not in ("region_stats", "fc"):
      raise errors.InputError(f"unknown region-series baseline {kind!r}")
    self.on_grid, self.kind, self.name = on_grid, kind, kind
    self.index = _RegionIndex.of(on_grid)

  def check(self, source) -> None:
    del source  # any window length

  def scan_part(self, source, scan: int) -> np.ndarray:
    return region_series(source, scan, self.on_grid, index=self.index)

  def subject_row(self, source, scans: list[int], parts: list) -> tuple[np.ndarray, int]:
    del source
    series = np.concatenate(parts)
    if self.kind == "region_stats":
      return np.concatenate([series.mean(0), series.std(0)]), len(scans)
    return np.asarray(_corr_upper(jnp.asarray(series))), len(scans)

  def __call__(self, source, labelled_only: bool = True) -> SubjectFeatures:
    return extract({self.name: self}, source, labelled_only)[self.name]


class _HeldScan:
  """`source`, holding the scan read last in memory, so that several extractors
  read each scan from disk once. Only for sources whose windows are plain slices
  of their frames (`windows_are_slices`) and scans under `max_bytes`."""

  def __init__(self, source, max_bytes: int = 2 << 30):
    self.source, self.max_bytes = source, max_bytes
    self._scan, self._frames = None, None

  def __getattr__(self, name):
    return getattr(self.source, name)

  def __len__(self) -> int:
    return len(self.source)

  def _held(self, scan: int) -> np.ndarray | None:
    if self._scan != scan:
      count = self.source.num_frames(scan)
      size = int(np.prod(self.source.grid.shape)) * count * 4
      self._scan, self._frames = scan, (self.source.read(scan, 0, count)
                                        if size <= self.max_bytes else None)
    return self._frames

  def read(self, scan: int, start: int, count: int) -> np.ndarray:
    held = self._held(scan)
    if held is None or not 0 <= start <= held.shape[-1] - count:
      return self.source.read(scan, start, count)
    return held[..., start:start + count]

  def window_at(self, scan: int, start: int) -> np.ndarray:
    return self.read(scan, start, self.source.frames)


def extract(extractors: dict, source, labelled_only: bool = True) -> dict[str, SubjectFeatures]:
  """Features of every extractor (name -> EncoderFeatures / RegionSeriesFeatures) in one
  pass over the data: each scan is read once for all of them.

      sets = extract({"encoder": EncoderFeatures(pre), "fc": RegionSeriesFeatures(atlas, "fc")},
                     source)
  """
  for extractor in extractors.values():
    extractor.check(source)
  groups = _by_subject(source, labelled_scans(source, labelled_only))
  if getattr(source, "windows_are_slices", False) and len(extractors) > 1:
    source = _HeldScan(source)
  rows = {name: [] for name in extractors}
  counts = {name: [] for name in extractors}
  started = time.time()
  for n, scans in enumerate(groups.values(), start=1):
    parts = {name: [] for name in extractors}
    for scan in scans:  # every extractor reads the scan before the next one is read
      for name, extractor in extractors.items():
        parts[name].append(extractor.scan_part(source, scan))
    for name, extractor in extractors.items():
      row, count = extractor.subject_row(source, scans, parts[name])
      rows[name].append(row)
      counts[name].append(count)
    if n == len(groups) or n % 10 == 0:
      _progress(f"features of {', '.join(e.name for e in extractors.values())}", n,
                len(groups), started)
  return {name: _stack(source, groups, rows[name], counts[name]) for name in extractors}


def baseline_names(names: str) -> list[str]:
  """'region_stats,fc' -> its names (see BASELINES); '' gives none; a bad name is an error."""
  validation.refuse("baselines", names)
  return [n.strip() for n in str(names).split(",") if n.strip()]


def baseline_extractors(pre: pretrained_lib.Pretrained, names: str, pool: str,
                        **encoder_options) -> dict[str, Callable]:
  """name -> extractor for the comma-separated `names` (see BASELINES); '' gives none."""
  out = {}
  for name in baseline_names(names):
    if name == "init":
      out[name] = EncoderFeatures(pretrained_lib.random_init(pre), pool, name="init",
                                  **encoder_options)
    else:
      out[name] = RegionSeriesFeatures(pre.patch_map.atlas, name)
  return out
