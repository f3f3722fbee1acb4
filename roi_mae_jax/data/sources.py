"""Which scans a task reads: prepared shards, or the built-in synthetic subjects.

    source = training_source(config, multiple_of=config.patches.size)    # pretraining
    source = downstream_source(pre.config, config.data)                   # probe, attribute ...
    len(source), source.info(i), source.num_frames(i), source.window_at(i, start)

Both return a random-access source (pipeline.ShardWindows or
pipeline.SyntheticWindows) of windows of the pretraining run's length.
"""

from __future__ import annotations

import ml_collections
from absl import logging

from roi_mae_jax import errors
from roi_mae_jax.brain import grids
from roi_mae_jax.data import pipeline
from roi_mae_jax.data import synthetic


def training_source(config: ml_collections.ConfigDict, multiple_of: int):
  """The scans of `config.data`: prepared shards in `data.shards`, else the synthetic data."""
  if not config.data.shards:
    data = synthetic.SyntheticFMRI.from_config(config, multiple_of=multiple_of)
    return pipeline.SyntheticWindows(data, config.frames)
  source = pipeline.ShardWindows(config.data.shards, config.frames)
  wanted = grids.grid_from_config(config.grid, multiple_of)
  if source.grid.key() != wanted.key():
    shape = ",".join(map(str, source.grid.shape))
    raise errors.InputError(
        f"{config.data.shards} was prepared on grid {source.grid.describe()} but this config "
        f"trains on {wanted.describe()}; train with --config.grid.voxel_size_mm="
        f"{source.grid.voxel_size_mm[0]:g} --config.grid.shape=\"({shape})\" (and the same "
        "grid.orientation and centre_mm), or prepare again on this grid")
  if source.left_out:
    logging.warning("%d scans are shorter than %d frames and left out, e.g. %s",
                    len(source.left_out), config.frames, source.left_out[0])
  logging.info("reading %d prepared scans from %s", len(source), config.data.shards)
  return source


def downstream_source(pretrain_config: ml_collections.ConfigDict,
                      data: ml_collections.ConfigDict):
  """The scans a probe, fine-tuning or attribution reads, on the encoder's grid.

  `data.shards` (a prepare workdir) or, when empty, the pretraining run's
  synthetic subjects, with `data.synthetic_subjects` subjects when set and the
  effect of `data.synthetic_preset` when set (see synthetic.PRESETS).
  """
  config = ml_collections.ConfigDict(pretrain_config.to_dict())
  config.data.shards = data.shards
  if data.get("synthetic_subjects"):
    config.data.synthetic.num_subjects = int(data.synthetic_subjects)
  if not data.shards and data.get("synthetic_preset"):
    synthetic.apply_preset(config.data.synthetic, data.synthetic_preset)
  return training_source(config, multiple_of=int(config.patches.size))
