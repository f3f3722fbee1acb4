"""Grain input pipelines: scans -> random temporal windows -> batches.

    source = ShardWindows("runs/prepared", frames=8)     # or SyntheticWindows(data, 8)
    ds = training_dataset(source, local_batch=8, seed=0, windows_per_subject=4)
    it = make_iterator(ds, prefetch_workers=0)
    batch = next(it)            # {"windows": (8, X, Y, Z, 8), "subject": (8,), "label": (8,)}
    state = it.get_state()      # goes into the checkpoint; it.set_state(state) resumes

The global batch is made of `streams` equal parts. Stream k reads every
streams-th scan (k, k + streams, ...: disjoint shares), visits each of its
scans `windows_per_subject` times per epoch in a seeded shuffle, each visit a
random window of T frames. Process p of n reads streams p*streams/n ... in
order, so the batches depend on `streams`, not on how many processes read
them: one process with streams=2 sees the global batches of a 2-process run.
The default (streams=0) is one stream per process. All randomness is a function
of (seed, stream, position), so a resumed run sees exactly the batches it would
have seen. `sharding.global_batch` turns each process's batch into global arrays.
"""

from __future__ import annotations

import os

import grain
import grain.experimental
import jax
from absl import flags
import nibabel as nib
import numpy as np

from roi_mae_jax import errors
from roi_mae_jax import process_guard
from roi_mae_jax.brain import grids
from roi_mae_jax.data import shards
from roi_mae_jax.data import synthetic


def normalise(window: np.ndarray, brain: np.ndarray) -> np.ndarray:
  """z-scores a window over its brain voxels (all frames); 0 outside the brain."""
  values = window[brain]
  mean, std = values.mean(), values.std()
  out = np.where(brain[..., None], (window - mean) / max(float(std), 1e-6), 0.0)
  return out.astype(np.float32)


class SyntheticWindows:
  """A random-access source of subjects whose windows are drawn on the fly."""

  def __init__(self, data: synthetic.SyntheticFMRI, frames: int):
    if frames > data.run_frames:
      raise errors.InputError(f"windows of {frames} frames do not fit the "
                              f"{data.run_frames}-frame synthetic runs (config.frames, "
                              "config.data.synthetic.run_frames)")
    self.data = data
    self.frames = frames

  def __len__(self) -> int:
    return len(self.data.subjects)

  @property
  def brain(self) -> np.ndarray:
    return self.data.brain

  @property
  def grid(self) -> grids.Grid:
    return self.data.grid

  def num_frames(self, index: int) -> int:
    return self.data.run_frames

  def window_at(self, index: int, start: int) -> np.ndarray:
    """The normalised window of subject `index` from frame `start`."""
    return normalise(self.data.window(index, start, self.frames), self.data.brain)

  def read(self, index: int, start: int, count: int) -> np.ndarray:
    """`count` frames of subject `index` from `start`, normalised together."""
    return normalise(self.data.window(index, start, count), self.data.brain)

  def info(self, index: int) -> dict:
    s = self.data.subjects[index]
    return {"subject": s.subject_id, "site": s.site.name, "label": s.label}

  def draw(self, subject: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A random window of `subject`, normalised."""
    start = int(rng.integers(0, self.data.run_frames - self.frames + 1))
    window = self.data.window(subject, start, self.frames)
    return {"windows": normalise(window, self.data.brain),
            "subject": np.int32(subject),
            "label": np.int32(self.data.subjects[subject].label)}


class ShardWindows:
  """Random windows from the shards of a prepared dataset (task prepare).

  Data are already normalised per scan when prepared; scans shorter than the
  window are left out (and logged by the caller through `left_out`).
  """

  windows_are_slices = True  # window_at(i, s) == read(i, s, frames): a read scan serves both

  def __init__(self, workdir: str, frames: int):
    self.data = shards.PreparedDataset(workdir)
    self.frames = frames
    self.scans = [i for i, r in enumerate(self.data.rows) if r["frames"] >= frames]
    self.left_out = [r["scan"] for r in self.data.rows if r["frames"] < frames]
    if not self.scans:
      longest = max(r["frames"] for r in self.data.rows)
      raise errors.InputError(f"windows of {frames} frames do not fit any scan in {workdir} "
                              f"(the longest has {longest}); lower config.frames")
    mask = os.path.join(workdir, shards.BRAIN_MASK_FILE)
    if not os.path.exists(mask):
      raise errors.InputError(f"{mask} is missing: the prepare run in {workdir} did not finish")
    self.brain = np.asarray(nib.load(mask).dataobj) > 0
    self.grid = self.data.info.grid

  def __len__(self) -> int:
    return len(self.scans)

  def row(self, index: int) -> dict:
    return self.data.rows[self.scans[index]]

  def num_frames(self, index: int) -> int:
    return self.row(index)["frames"]

  def window_at(self, index: int, start: int) -> np.ndarray:
    return self.data.frames(self.scans[index], start, self.frames)

  def read(self, index: int, start: int, count: int) -> np.ndarray:
    """`count` frames of the `index`-th usable scan from `start` (normalised when prepared)."""
    return self.data.frames(self.scans[index], start, count)

  def info(self, index: int) -> dict:
    row = self.row(index)
    return {"subject": row["subject"], "site": row["site"], "label": row["label"]}

  def draw(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A random window of the `index`-th usable scan."""
    scan = self.scans[index]
    start = int(rng.integers(0, self.data.rows[scan]["frames"] - self.frames + 1))
    return {"windows": self.data.frames(scan, start, self.frames),
            "subject": np.int32(index),
            "label": np.int32(self.data.rows[scan]["label"])}


class _DrawWindow(grain.transforms.RandomMap):
  """A module-level transform (not a lambda) so worker processes can unpickle it."""

  def __init__(self, source):
    self.source = source

  def random_map(self, element: int, rng: np.random.Generator):
    return self.source.draw(int(element), rng)


class _ConcatStreams(grain.transforms.Map):
  """(batch of stream a, batch of stream b, ...) -> one batch, rows in stream order."""

  def map(self, element):
    return {k: np.concatenate([part[k] for part in element]) for k in element[0]}


def _stream(source, stream: int, streams: int, rows: int, seed: int,
            windows_per_subject: int) -> grain.MapDataset:
  """Endless shuffled batches of `rows` windows from scans stream, stream + streams, ..."""
  ds = grain.MapDataset.range(len(source))[stream::streams]
  if windows_per_subject > 1:
    ds = ds.repeat(windows_per_subject)
  stream_seed = seed + 7919 * stream  # stream 0 keeps `seed`
  ds = ds.shuffle(seed=stream_seed)
  ds = ds.random_map(_DrawWindow(source), seed=stream_seed + 1)
  return ds.repeat().batch(rows, drop_remainder=True)


def training_dataset(source, local_batch: int, seed: int, *, windows_per_subject: int = 1,
                     streams: int = 0, process_index: int | None = None,
                     process_count: int | None = None) -> grain.MapDataset:
  """Shuffled, endlessly repeated batches of this process's streams (see module doc)."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  streams = streams or process_count
  if windows_per_subject < 1:
    raise errors.InputError(f"data.windows_per_subject must be >= 1, got {windows_per_subject}")
  if streams % process_count:
    raise errors.InputError(f"data.streams={streams} cannot be shared by {process_count} "
                            "processes: it must be a multiple of the process count")
  own = streams // process_count
  if local_batch % own:
    raise errors.InputError(f"this process's batch of {local_batch} cannot be split into its "
                            f"{own} streams (data.streams={streams}, {process_count} processes)")
  if len(source) < streams:
    raise errors.InputError(f"{len(source)} scans cannot be shared by {streams} data streams "
                            f"({process_count} processes): every stream needs at least one")
  parts = [_stream(source, k, streams, local_batch // own, seed, windows_per_subject)
           for k in range(process_index * own, (process_index + 1) * own)]
  if len(parts) == 1:
    return parts[0]
  return grain.experimental.ZipMapDataset(parts).map(_ConcatStreams())


def iterator_from_config(config, source, local_batch: int):
  """The checkpointable batch iterator of this process for a pretraining config
  (`data.windows_per_subject`, `data.streams`, `data.read_threads`, ...)."""
  dataset = training_dataset(
      source, local_batch, config.seed,
      windows_per_subject=config.data.get("windows_per_subject", 1),
      streams=config.data.get("streams", 0))
  return make_iterator(dataset, config.data.get("read_threads", 2),
                       config.data.get("prefetch", 4), config.data.get("prefetch_workers", 0))


def make_iterator(dataset: grain.MapDataset, read_threads: int = 2, prefetch: int = 4,
                  prefetch_workers: int = 0):
  """A checkpointable iterator; `prefetch_workers` > 0 reads in that many processes
  (each exits when this process is gone; `close(iterator)` stops them at once)."""
  iter_ds = dataset.to_iter_dataset(read_options(read_threads, prefetch))
  if prefetch_workers > 0:
    if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags (notebooks, tests)
      flags.FLAGS.mark_as_parsed()
    process_guard.quiet_resource_tracker()
    iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=prefetch_workers),
                                  worker_init_fn=process_guard.grain_worker_init)
  return iter(iter_ds)


def close(iterator) -> None:
  """Stops the iterator's worker processes, if it has any (Grain's `close`)."""
  closer = getattr(iterator, "close", None)
  if callable(closer):
    closer()


def read_options(num_threads: int = 2, prefetch: int = 4) -> grain.ReadOptions:
  """Few threads: on small machines data work competes with the step for cores."""
  return grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
