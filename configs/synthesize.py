r"""Write synthetic subjects as NIfTI files in the ADHD-200 (Athena) layout.

    python -m roi_mae_jax.main --config=configs/synthesize.py --workdir=runs/release
    python -m roi_mae_jax.main --config=configs/synthesize.py --workdir=runs/release_decoupling \
        --config.synthetic_preset=decoupling --config.seed=101
    python -m roi_mae_jax.main --config=configs/prepare.py --workdir=runs/release_4mm \
        --config.source=adhd200 --config.input_dir=runs/release

A release to run the whole chain on files (prepare -> pretrain -> probe) with
an effect whose regions are known: 4 mm LAS scans on the Athena grid, one
phenotypic table per site, and `ground_truth.csv` (each subject's label and
effect regions). `seed` picks the subjects: one the pretraining default never
uses (0) gives subjects no demo run has seen. `:test` writes 4 tiny scans.
"""

import ml_collections

from roi_mae_jax.data import synthetic


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.task = "synthesize"
  config.seed = 101
  config.synthetic_preset = "realistic"   # data/synthetic.py PRESETS; '' keeps data.synthetic's
  config.orientation = "LAS"              # voxel axes of the written scans (Athena: LAS)
  config.data = ml_collections.ConfigDict()
  config.data.synthetic = synthetic.synthetic_config()
  config.data.synthetic.update(num_subjects=75, num_sites=4, run_frames=120)
  if arg == "test":
    config.data.synthetic.update(num_subjects=4, num_sites=2, run_frames=8)
  elif arg:
    raise ValueError(f"unknown config variant {arg!r}; expected '' or 'test'")
  return config
