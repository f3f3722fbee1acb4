r"""Task `attribute`: integrated gradients of the ADHD logit, aggregated to AAL3 regions.

    python -m roi_mae_jax.main --config=configs/attribute.py --workdir=runs/attribution \
        --config.checkpoint=runs/demo

What is computed is `regions.explain` (integrated gradients of the
probe's or a fine-tuned classifier, summed over each subject's clips, averaged
per class, aggregated to regions, hemispheres and systems); this task writes
it out. The classifier is the probe's logistic regression refitted on every
labelled subject (saved as classifier_head.npz), or, with
`--config.classifier=<finetune workdir>`, the classifier that run saved.
Writes to WORKDIR:
  attribution_regions.csv   one row per region: id, name, hemisphere, system, voxels and
                            scores (mean |IG| per voxel over all subjects = the main score,
                            sums, signed and absolute per class); ranked, regions under
                            `min_region_voxels` voxels last and unranked
  attribution_groups.csv    the same by hemisphere and by system (voxel-weighted); groups
                            under `min_region_voxels` voxels last, as regions
  attribution_map.nii.gz    the plot-ready map: mean signed IG of ADHD subjects minus that
                            of controls, per voxel (3D, on the data grid, MNI sform/qform,
                            mm), whose |region mean| ranks the regions:
                            `nilearn.plotting.plot_stat_map("attribution_map.nii.gz")`
  attribution_abs.nii.gz, attribution_adhd.nii.gz, attribution_control.nii.gz
                            3D as well: mean |IG| over all subjects, mean signed IG of
                            ADHD subjects, of controls
  attribution.png           the top-20 regions and the map on the MNI template (nilearn)
  attribution_summary.json  completeness (sum of IG vs logit difference), counts, top regions
  classifier_head.npz       the linear head that was explained
  reconstruction_by_region.csv / .png
                            each region masked alone: the autoencoder's error there, best
                            first (the first window of `reconstruction_windows` scans;
                            0 skips it)
"""

from __future__ import annotations

import ml_collections
import numpy as np
from absl import logging

from roi_mae_jax import outputs
from roi_mae_jax import plots
from roi_mae_jax.brain import maps
from roi_mae_jax.data import shards
from roi_mae_jax.data import sources
from roi_mae_jax.downstream import pretrained as pretrained_lib
from roi_mae_jax.explain import regions

REQUIRED_KEYS = ("checkpoint", "pool", "ig_steps", "ig_chunk", "baseline")
# Written 3D maps: file -> (what, key of `maps` or "difference").
MAP_FILES = {
    "attribution_map.nii.gz": ("IG ADHD - control (mean signed, per voxel)", "difference"),
    "attribution_abs.nii.gz": ("IG mean |attribution|, all subjects", "abs_all"),
    "attribution_adhd.nii.gz": ("IG mean signed attribution, ADHD", "signed_adhd"),
    "attribution_control.nii.gz": ("IG mean signed attribution, controls", "signed_control"),
}
OUTPUT_NAMES = ("attribution_regions.csv", "attribution_groups.csv", *MAP_FILES,
                "attribution.png", "attribution_summary.json", "classifier_head.npz",
                "reconstruction_by_region.csv", "reconstruction_by_region.png")


def write_reconstruction_by_region(rows: list[dict], paths: dict) -> None:
  shards.write_table(paths["reconstruction_by_region.csv"],
                     ("rank", "id", "name", "hemisphere", "system", "tokens", "mse", "power",
                      "r2"), rows)
  plots.save(plots.reconstruction_by_region_figure(rows), paths["reconstruction_by_region.png"])


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  paths = dict(zip(OUTPUT_NAMES, outputs.claim(workdir, OUTPUT_NAMES, config.overwrite)))
  pre = pretrained_lib.load_pretrained(config.checkpoint, config.checkpoint_step or None)
  source = sources.downstream_source(pre.config, config.data)
  result = regions.explain(config, pre, source)
  if result["head"] is not None:
    result["head"].save(paths["classifier_head.npz"])
  ig_maps, rows, on_grid = result["maps"], result["regions"], pre.patch_map.atlas
  columns = ["rank", "id", "name", "hemisphere", "system", "voxels", "contrast", "abs_mean",
             "abs_sum"] + \
      [f"{m}_mean" for m in regions.MAPS[1:]]
  shards.write_table(paths["attribution_regions.csv"], columns, rows)
  shards.write_table(paths["attribution_groups.csv"],
                     ("level", "name", "regions", "voxels", "contrast", "abs_sum", "abs_mean"),
                     result["groups"])
  difference = ig_maps["signed_adhd"] - ig_maps["signed_control"]
  for name, (what, key) in MAP_FILES.items():
    volume = difference if key == "difference" else ig_maps[key]
    maps.save_mni(volume.astype(np.float32), on_grid.grid.affine, paths[name], what)
  ranked = [r for r in rows if r["rank"]]
  plots.save(plots.attribution_figure(ranked[:20], difference, pre.brain, on_grid.grid.affine,
                                      config.get("figure_point_mm", (30.0, -20.0, 8.0))),
             paths["attribution.png"])
  summary = result["summary"]
  outputs.write_json(paths["attribution_summary.json"], summary)
  if result["reconstruction"]:
    write_reconstruction_by_region(result["reconstruction"], paths)
  logging.info("completeness error: median %.4f of each window's logit difference, max %.4f "
               "of the mean difference; top regions: %s",
               summary["completeness"]["relative_median"],
               summary["completeness"]["max_over_mean_delta"],
               ", ".join(summary["top_regions"][:5]))
