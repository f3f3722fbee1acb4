r"""Fine-tune the pretrained encoder with a linear head (ADHD vs control).

    python -m roi_mae_jax.main --config=configs/finetune.py --workdir=runs/finetune \
        --config.checkpoint=runs/demo --config.mode=full

Same splits and metrics as configs/probe.py; `mode=frozen` trains the head only.
The classifier pools the encoder's region time courses over a clip of
`clip_windows` consecutive windows, as the probe pools a whole scan.
"""

import ml_collections

from roi_mae_jax.config import blocks


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  config = blocks.downstream("finetune")
  config.mode = "full"              # full | frozen (head only)
  config.pool = "region_std"        # the probe's subject pool (roi_mae_jax/downstream/features.py)
  config.clip_windows = 4           # consecutive windows the classifier reads at once
  config.steps = 60                 # per split
  config.batch_size = 4             # clips per step
  # The head starts at the probe's solution over thousands of features: Adam moves
  # every weight by about the learning rate, so the head's rate is small.
  config.learning_rate = 1e-5       # the head's
  config.encoder_lr_scale = 10.0    # encoder learning rate = this x learning_rate
  config.weight_decay = 1e-4
  config.schemes = "kfold,loso"
  config.folds = 5
  config.repeats = 1
  if arg == "test":
    config.folds = 3
    config.steps = 6
    config.clip_windows = 3         # the :test runs have 3 windows
    config.data.synthetic_subjects = 24
  elif arg:
    raise ValueError(f"unknown config variant {arg!r}; expected '' or 'test'")
  return config
