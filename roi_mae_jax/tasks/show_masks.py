"""Task `show_masks`: the atlas on the target grid and one mask per strategy.

    python -m roi_mae_jax.main --config=configs/show_masks.py --workdir=runs/masks

Writes `masks.png` (orthogonal slices + token rasters) and `masks_summary.json`
(token counts, and per strategy how many regions were masked whole or partly).
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
from absl import logging

from roi_mae_jax import outputs
from roi_mae_jax import plots
from roi_mae_jax.brain import patches as patches_lib
from roi_mae_jax.masking import samplers

REQUIRED_KEYS = ("seed", "frames", "grid.voxel_size_mm", "patches.size",
                 "mask.ratio", "show.strategies", "show.slice_mm")


def region_coverage(sample: samplers.MaskSample, patch_map: patches_lib.PatchMap,
                    num_time: int) -> dict[str, int]:
  """How many regions a mask covers whole, partly, or not at all (all chunks)."""
  mask = np.asarray(sample.mask).reshape(num_time, -1)
  region = patch_map.brain_region
  whole = partial = 0
  for r in np.unique(region[region >= 0]):
    share = mask[:, region == r].mean()
    whole += share == 1.0
    partial += 0.0 < share < 1.0
  return {"whole": int(whole), "partial": int(partial),
          "untouched": int(len(np.unique(region[region >= 0])) - whole - partial)}


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  png_path, json_path = outputs.claim(
      workdir, ["masks.png", "masks_summary.json"], config.get("overwrite", False))
  strategies = [s.strip() for s in config.show.strategies.split(",") if s.strip()]
  patch_map = patches_lib.patch_map_from_config(config)
  num_time = samplers.num_time_chunks(config)
  logging.info("grid %s, %d of %d patches are brain, %d regions",
               patch_map.atlas.grid.describe(), patch_map.num_brain_patches,
               patch_map.num_patches, patch_map.atlas.num_regions)
  key = jax.random.key(config.seed)
  samples, summary = {}, {}
  for index, strategy in enumerate(strategies):
    sampler = samplers.sampler_from_config(config, patch_map, strategy)
    sample = jax.jit(sampler.sample)(jax.random.fold_in(key, index))
    samples[strategy] = sample
    summary[strategy] = {"masked_tokens": sampler.num_mask,
                         "visible_tokens": sampler.num_keep,
                         "regions": region_coverage(sample, patch_map, num_time)}
  fig = plots.show_masks_figure(patch_map, samples, num_time,
                                tuple(config.show.slice_mm),
                                int(config.show.get("time_chunk", 0)))
  plots.save(fig, png_path)
  outputs.write_json(json_path, {
      "grid": patch_map.atlas.grid.describe(),
      "patch_size": patch_map.patch_size,
      "assignment": patch_map.assignment,
      "time_chunks": num_time,
      "patches_all": patch_map.num_patches,
      "patches_brain": patch_map.num_brain_patches,
      "tokens_all": patch_map.num_patches * num_time,
      "tokens_brain": patch_map.num_brain_patches * num_time,
      "regions_on_grid": patch_map.atlas.num_regions,
      "strategies": summary})
  print(f"wrote {png_path} and {json_path}")
