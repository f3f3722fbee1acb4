r"""Prepare NIfTI fMRI into ArrayRecord shards on an MNI grid.

    python -m roi_mae_jax.main --config=configs/prepare.py --workdir=runs/prepared \
        --config.source=adhd200 --config.input_dir=/data/ADHD200_Athena
    python -m roi_mae_jax.main --config=configs/prepare.py:paper --workdir=runs/prepared_2mm \
        --config.source=adhd200 --config.input_dir=/data/ADHD200_Athena
    python -m roi_mae_jax.main --config=configs/prepare.py --workdir=runs/prepared \
        --config.source=manifest --config.manifest=scans.csv

The default grid (4 mm, 40x48x44) is the one configs/pretrain_aal3.py trains
on; `:paper` is the paper's 96^3 box at 2 mm (train with
configs/pretrain_aal3.py:adhd200). Set `--config.grid.shape=None` to cover the
whole MNI152 box at any `grid.voxel_size_mm`.
"""

import ml_collections

from roi_mae_jax.config import blocks


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.task = "prepare"
  config.source = "adhd200"         # adhd200 | nilearn_adhd | fmriprep | manifest
  config.input_dir = ""
  config.manifest = ""              # CSV: path, subject, site, label[, tr]
  config.atlas = blocks.atlas()
  config.grid = blocks.grid(voxel_size_mm=4.0, shape=(40, 48, 44))
  config.patches = blocks.patches(size=4, frames=2)   # for patch_map.csv
  config.frames = 4                 # the shortest run kept, in frames at config.tr
  config.tr = 2.0                   # common TR (s) every scan is resampled to
  config.default_tr = 0.0           # TR for headers without one (0: skip such scans)
  config.normalise = "global"       # global z over the brain | voxel (each voxel over time)
  # Labels: table value -> 1 (ADHD) / 0 (control); others are unlabelled (-1).
  config.label_values = "0=0,1=1,2=1,3=1"
  config.label_column = ""          # fmriprep: the participants.tsv column with the label
  config.site_column = "site"       # fmriprep: the participants.tsv column with the site
  config.space = ""                 # fmriprep: the template, e.g. MNI152NLin2009cAsym (needed
                                    # when a run has several; may add _res-2)
  config.qc_column = "QC_Rest_1"    # adhd200: rows with 0 here are skipped ('' keeps all)
  config.require_label = False      # True: skip unlabelled scans
  # Denoising (see roi_mae_jax/data/denoise.py), at each scan's own TR.
  config.denoise = ml_collections.ConfigDict()
  config.denoise.apply = "auto"     # auto: by file name (Athena sfnwmrda: off) | on | off
  config.denoise.strategy = "simple"  # fMRIPrep: nilearn load_confounds_strategy preset
  config.denoise.detrend = True     # linear detrend
  config.denoise.high_pass = 0.01   # Hz (0: none)
  config.denoise.low_pass = 0.1     # Hz (0: none; at or above Nyquist: none)
  # Checks (see roi_mae_jax/data/nifti.py)
  config.max_oblique_degrees = 1.0
  config.min_coverage = 0.9         # share of the MNI brain inside the field of view
  config.max_nonfinite_fraction = 0.01
  config.min_signal_fraction = 0.5  # share of the brain with non-zero data
  # Registration to the template (see roi_mae_jax/data/registration.py): the scan's own
  # brain (mean |signal| > brain_threshold x its 98th percentile) against the MNI152 brain.
  config.registration = ml_collections.ConfigDict()
  config.registration.min_inside = 0.88    # share of the scan's brain inside the template's
  config.registration.min_dice = 0.5       # overlap of the two brains
  config.registration.warn_margin = 0.04   # used with a warning this close above a threshold
  config.registration.brain_threshold = 0.2
  config.workers = 2                # processes; 0 or 1 runs in this process
  config.overwrite = False
  config.fault_kill_after_scans = 0  # >0: SIGKILL itself after that many scans (tests)
  if arg == "paper":
    blocks.paper_scale(config)
  elif arg == "test":
    config.grid = blocks.grid(voxel_size_mm=8.0, shape=(20, 24, 24))
    config.workers = 0
  elif arg:
    raise ValueError(f"unknown config variant {arg!r}; expected '', 'paper' or 'test'")
  return config
