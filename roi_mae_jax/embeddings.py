"""Subject-level features: every window of every scan through the frozen encoder.

    feats = subject_features(pre, source, pool="region", labelled_only=True)
    feats.features            # (S, F), the mean over each subject's windows
    feats.labels, feats.sites, feats.subjects, feats.windows

A scan of n frames gives n // T non-overlapping windows of T frames (at most
`max_windows`, evenly spread, when set). A subject with several scans averages
over all of them. Windows are fed in fixed-size batches (the last one padded),
so the encoder compiles once.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
from absl import logging

from roi_mae_jax import errors
from roi_mae_jax import metrics
from roi_mae_jax import pretrained as pretrained_lib


@dataclasses.dataclass
class SubjectFeatures:
  subjects: list[str]
  sites: list[str]
  labels: np.ndarray     # (S,) 1 ADHD, 0 control, -1 unlabelled
  features: np.ndarray   # (S, F) float32
  windows: np.ndarray    # (S,) windows averaged per subject


def subject_table(source, labelled_only: bool = True) -> SubjectFeatures:
  """Subjects, sites and labels without running the encoder (`features` is (S, 0))."""
  info = {}
  for i in range(len(source)):
    meta = source.info(i)
    if not labelled_only or meta["label"] in (0, 1):
      info.setdefault(str(meta["subject"]), meta)
  if not info:
    raise errors.InputError("no labelled scan (labels 0/1)")
  subjects = list(info)
  return SubjectFeatures(subjects, [str(info[s]["site"]) for s in subjects],
                         np.array([int(info[s]["label"]) for s in subjects]),
                         np.zeros((len(subjects), 0), np.float32), np.zeros(len(subjects), int))


def window_starts(num_frames: int, frames: int, max_windows: int = 0) -> list[int]:
  """Starts of the non-overlapping windows; `max_windows` > 0 keeps that many, spread out."""
  starts = list(range(0, num_frames - frames + 1, frames))
  if max_windows and len(starts) > max_windows:
    keep = np.linspace(0, len(starts) - 1, max_windows).round().astype(int)
    starts = [starts[i] for i in keep]
  return starts


def windows_by_subject(source, subjects,
                       max_windows: int = 0) -> dict[str, list[tuple[int, int]]]:
  """subject -> (scan index, start frame) of the windows of each of its scans."""
  out: dict[str, list[tuple[int, int]]] = {}
  for i in range(len(source)):
    subject = str(source.info(i)["subject"])
    if subject in subjects:
      out.setdefault(subject, []).extend(
          (i, s) for s in window_starts(source.num_frames(i), source.frames, max_windows))
  return out


def subject_features(pre: pretrained_lib.Pretrained, source, pool: str = "mean",
                     labelled_only: bool = True, batch_size: int = 8,
                     max_windows: int = 0) -> SubjectFeatures:
  """Pooled encoder features per subject, averaged over windows (and scans)."""
  pretrained_lib.check_pool(pool)
  if source.frames != pre.config.frames:
    raise errors.InputError(f"the data give windows of {source.frames} frames but the encoder "
                            f"was pretrained on {pre.config.frames}")
  scans = [i for i in range(len(source))
           if not labelled_only or source.info(i)["label"] in (0, 1)]
  if not scans:
    raise errors.InputError("no labelled scan to probe (labels 0/1)")
  jobs = [(i, s) for i in scans for s in window_starts(source.num_frames(i), source.frames,
                                                        max_windows)]
  order, info = [], {}
  sums: dict[str, np.ndarray] = {}
  counts: dict[str, int] = {}
  started = time.time()
  for first in range(0, len(jobs), batch_size):
    chunk = jobs[first:first + batch_size]
    windows = np.stack([source.window_at(i, s) for i, s in chunk])
    if len(chunk) < batch_size:  # one compiled shape
      pad = np.zeros((batch_size - len(chunk),) + windows.shape[1:], windows.dtype)
      windows = np.concatenate([windows, pad])
    feats = pre.features(windows, pool)[:len(chunk)]
    for (i, _), f in zip(chunk, feats):
      meta = source.info(i)
      key = str(meta["subject"])
      if key not in sums:
        order.append(key)
        info[key] = meta
        sums[key], counts[key] = np.zeros_like(f, np.float64), 0
      elif info[key]["label"] != meta["label"]:
        raise errors.InputError(f"subject {key} has scans with different labels")
      sums[key] += f
      counts[key] += 1
    done = min(first + batch_size, len(jobs))
    if done == len(jobs) or (first // batch_size) % 20 == 0:
      rate = done / max(time.time() - started, 1e-9)
      logging.info("features %s %d/%d windows | %.1f windows/s | eta %s",
                   metrics.progress_bar(done, len(jobs)), done, len(jobs), rate,
                   metrics.duration((len(jobs) - done) / rate))
  return SubjectFeatures(
      subjects=order, sites=[str(info[k]["site"]) for k in order],
      labels=np.array([int(info[k]["label"]) for k in order]),
      features=np.stack([sums[k] / counts[k] for k in order]).astype(np.float32),
      windows=np.array([counts[k] for k in order]))
