r"""Task `synthesize`: synthetic subjects written as an ADHD-200 (Athena) release.

    python -m roi_mae_jax.main --config=configs/synthesize.py --workdir=runs/release

Writes to WORKDIR, which becomes the release's root:
SITE/SID/sfnwmrdaSID_session_1_rest_1.nii.gz (4 mm, `orientation`, TR in the
header), SITE/SITE_phenotypic.csv, ground_truth.csv (subject, site, TR, label,
effect regions) and synthesize_summary.json. Existing scans are never
replaced: a folder that holds any is refused.
"""

from __future__ import annotations

import csv
import os
import time

import ml_collections
from absl import logging

from roi_mae_jax import errors
from roi_mae_jax import metrics
from roi_mae_jax import outputs
from roi_mae_jax.brain import atlas as atlas_lib
from roi_mae_jax.data import synthetic

REQUIRED_KEYS = ("seed", "synthetic_preset", "orientation", "data.synthetic.num_subjects",
                 "data.synthetic.run_frames", "data.synthetic.num_sites")
OUTPUT_NAMES = ("ground_truth.csv", "synthesize_summary.json")


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  truth_path, summary_path = (os.path.join(workdir, n) for n in OUTPUT_NAMES)
  for path in (truth_path, summary_path):
    if os.path.exists(path):
      raise errors.InputError(f"{workdir} already holds a release ({path}); scans are never "
                              "replaced: choose an empty --workdir")
  outputs.write_config(workdir, config)  # so no other task writes into the release
  cfg = synthetic.apply_preset(ml_collections.ConfigDict(config.data.synthetic.to_dict()),
                               config.synthetic_preset)
  start = time.perf_counter()
  data = synthetic.SyntheticFMRI(atlas_lib.atlas_on_grid(synthetic.athena_grid()), cfg,
                                 config.seed)
  rows = synthetic.ground_truth(data)
  logging.info("writing %d subjects x %d frames (%s, %d sites, seed %d) to %s",
               len(rows), data.run_frames, config.synthetic_preset or "own effect",
               cfg.num_sites, config.seed, workdir)

  def progress(done: int, total: int) -> None:
    if done == total or done % max(1, total // 10) == 0:
      rate = done / max(time.perf_counter() - start, 1e-9) * 60
      logging.info("synthesize %s %d/%d scans | %.1f scans/min | eta %s",
                   metrics.progress_bar(done, total), done, total, rate,
                   metrics.duration((total - done) / max(rate, 1e-9) * 60))

  paths = synthetic.write_adhd200(data, workdir, orientation=config.orientation,
                                  on_written=progress)
  with open(truth_path, "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=synthetic.TRUTH_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
  effect = [r.name for r, planted in zip(data.atlas.regions, data.effect) if planted]
  outputs.write_json(summary_path, {
      "subjects": len(rows), "adhd": sum(r["label"] for r in rows),
      "sites": sorted({r["site"] for r in rows}), "run_frames": data.run_frames,
      "grid": data.grid.describe(), "orientation": config.orientation,
      "preset": config.synthetic_preset, "seed": int(config.seed),
      "effect": {k: cfg[k] for k in ("effect_regions", "effect_decoupling",
                                     "effect_amplitude", "effect_level_percent")},
      "effect_regions_on_grid": effect,
      "seconds": round(time.perf_counter() - start, 1)})
  print(f"wrote {len(paths)} scans, {truth_path} and {summary_path}; prepare them with\n"
        f"  python -m roi_mae_jax.main --config=configs/prepare.py --workdir=PREPARED "
        f"--config.source=adhd200 --config.input_dir={os.path.normpath(workdir)}")
