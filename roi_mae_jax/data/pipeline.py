"""Grain input pipelines: records -> random windows -> normalised batches.

    source = SyntheticWindows(data, frames=8)
    ds = training_dataset(source, local_batch=8, seed=0)   # a grain.MapDataset
    it = iter(ds.to_iter_dataset(read_options()))
    batch = next(it)            # {"windows": (8, X, Y, Z, 8), "subject": (8,), "label": (8,)}
    state = it.get_state()      # goes into the checkpoint; it.set_state(state) resumes

Each process reads its own slice of the records (process i of n takes every
n-th); the shuffle and the random windows are seeded, and reseeded every epoch,
so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import grain
import jax
import numpy as np

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
      raise ValueError(f"windows of {frames} frames do not fit the "
                       f"{data.run_frames}-frame synthetic runs")
    self.data = data
    self.frames = frames

  def __len__(self) -> int:
    return len(self.data.subjects)

  def __getitem__(self, index: int) -> int:
    return index

  def draw(self, subject: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A random window of `subject`, normalised."""
    start = int(rng.integers(0, self.data.run_frames - self.frames + 1))
    window = self.data.window(subject, start, self.frames)
    return {"windows": normalise(window, self.data.brain),
            "subject": np.int32(subject),
            "label": np.int32(self.data.subjects[subject].label)}


def training_dataset(source: SyntheticWindows, local_batch: int, seed: int,
                     process_index: int | None = None,
                     process_count: int | None = None) -> grain.MapDataset:
  """Shuffled, endlessly repeated batches of this process's share of subjects."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  ds = grain.MapDataset.source(source)
  ds = ds[process_index::process_count]
  ds = ds.shuffle(seed=seed)
  ds = ds.random_map(lambda subject, rng: source.draw(subject, rng), seed=seed + 1)
  ds = ds.repeat()
  return ds.batch(local_batch, drop_remainder=True)


def read_options(num_threads: int = 2, prefetch: int = 4) -> grain.ReadOptions:
  """Few threads: on small machines data work competes with the step for cores."""
  return grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
