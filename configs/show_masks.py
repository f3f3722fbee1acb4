r"""Draw the atlas on the target grid and one mask of each strategy.

    python -m roi_mae_jax.main --config=configs/show_masks.py --workdir=runs/masks
    python -m roi_mae_jax.main --config=configs/show_masks.py:paper --workdir=runs/masks_paper

Writes WORKDIR/masks.png and WORKDIR/masks_summary.json. The default is a
4 mm grid; `:paper` is the paper's 96^3 box at 2 mm with 6^3-voxel patches.
"""

import ml_collections

from roi_mae_jax.config import blocks


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.task = "show_masks"
  config.seed = 0
  config.frames = 10                 # frames per window
  config.atlas = blocks.atlas()
  config.grid = blocks.grid(voxel_size_mm=4.0, shape=(40, 48, 44))
  config.patches = blocks.patches(size=4, frames=1)
  config.mask = blocks.mask(strategy="roi", ratio=0.5)
  config.show = ml_collections.ConfigDict({
      "strategies": "random,tube,roi,roi_time",
      "slice_mm": (30.0, -20.0, 8.0),  # x (sagittal), y (coronal), z (axial)
      "time_chunk": 0,                 # which time chunk the slices show
  })
  config.overwrite = False
  if arg == "paper":
    blocks.paper_scale(config)
  elif arg:
    raise ValueError(f"unknown config variant {arg!r}; expected '' or 'paper'")
  return config
