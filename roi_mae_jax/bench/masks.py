"""Mask sampler speed per strategy, and token counts (all vs brain patches).

Defaults are the paper's scale: 96^3 grid at 2 mm, 6^3-voxel patches, 20
frames of one frame per token, batch 16, mask ratio 0.5. The time is the
median wall time of one jitted, vmapped batch (compile excluded), on
whatever JAX's default device is.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from roi_mae_jax.brain import atlas as atlas_lib
from roi_mae_jax.brain import grids
from roi_mae_jax.brain import patches as patches_lib
from roi_mae_jax.masking import samplers


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--voxel_size_mm", type=float, default=2.0)
  parser.add_argument("--grid", type=int, nargs=3, default=(96, 96, 96))
  parser.add_argument("--patch", type=int, default=6)
  parser.add_argument("--frames", type=int, default=20)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--ratio", type=float, default=0.5)
  parser.add_argument("--assignment", default="majority",
                      choices=patches_lib.ASSIGNMENTS)
  parser.add_argument("--strategies", default=",".join(samplers.STRATEGIES))
  parser.add_argument("--repeats", type=int, default=50)


def time_batches(sampler: samplers.MaskSampler, batch: int, repeats: int) -> np.ndarray:
  """Seconds per batch for `repeats` fresh keys, after one compile call."""
  jax.block_until_ready(sampler.sample_batch(jax.random.key(0), batch))
  seconds = []
  for i in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(sampler.sample_batch(jax.random.key(i + 1), batch))
    seconds.append(time.perf_counter() - start)
  return np.array(seconds)


def run(args) -> dict:
  grid = grids.mni_grid(args.voxel_size_mm, tuple(args.grid))
  patch_map = patches_lib.build_patch_map(atlas_lib.atlas_on_grid(grid), args.patch,
                                          args.assignment)
  tokens_all = patch_map.num_patches * args.frames
  tokens_brain = patch_map.num_brain_patches * args.frames
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  "
        f"grid {grid.describe()}  patch {args.patch}^3 x 1 frame  "
        f"frames {args.frames}  batch {args.batch}  ratio {args.ratio}  "
        f"assignment {args.assignment}")
  print(f"tokens per window: {tokens_all} in the box, {tokens_brain} brain "
        f"({tokens_brain / tokens_all:.1%}; {patch_map.num_brain_patches} of "
        f"{patch_map.num_patches} patches), regions on grid "
        f"{patch_map.atlas.num_regions}")
  print(f"{'strategy':<10}{'median ms':>11}{'min ms':>9}{'p90 ms':>9}"
        f"{'masked':>9}{'visible':>9}")
  figures = {"grid": grid.describe(), "batch": args.batch,
             "tokens_all": tokens_all, "tokens_brain": tokens_brain,
             "device": jax.devices()[0].device_kind, "strategies": {}}
  for strategy in filter(None, args.strategies.split(",")):
    sampler = samplers.MaskSampler(patch_map, args.frames, strategy, args.ratio)
    ms = time_batches(sampler, args.batch, args.repeats) * 1e3
    row = {"median_ms": float(np.median(ms)), "min_ms": float(ms.min()),
           "p90_ms": float(np.percentile(ms, 90)),
           "masked": sampler.num_mask, "visible": sampler.num_keep}
    figures["strategies"][strategy] = row
    print(f"{strategy:<10}{row['median_ms']:>11.2f}{row['min_ms']:>9.2f}"
          f"{row['p90_ms']:>9.2f}{row['masked']:>9}{row['visible']:>9}")
  return figures
