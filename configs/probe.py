r"""Linear probe (ADHD vs control) on a pretrained encoder.

    python -m roi_mae_jax.main --config=configs/probe.py --workdir=runs/probe \
        --config.checkpoint=runs/demo
    python -m roi_mae_jax.main --config=configs/probe.py --workdir=runs/probe_adhd200 \
        --config.checkpoint=runs/pretrain_adhd200 --config.data.shards=runs/adhd200_4mm

`checkpoint` is a pretraining workdir (its newest checkpoint unless
`checkpoint_step` is set); empty `data.shards` probes the pretraining run's
synthetic subjects.
"""

import ml_collections

from roi_mae_jax.config import blocks


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  config = blocks.downstream("probe")
  # Subject features from the time course of the encoder's region embeddings over
  # a scan (roi_mae_jax/downstream/features.py): mean | region | region_std | region_corr,
  # or several joined by '+'.
  config.pool = "region_std+region_corr"  # best measured on the realistic preset (docs/downstream.md#pools)
  config.layers = ""                # encoder blocks pooled ("1,2", "all"; "": the output)
  # More read-outs of the checkpoint on the same splits (roi_mae_jax/downstream/readouts.py):
  # encoder@K[+K...] (those blocks), recon | recon_power | recon_corr (reconstruction
  # residuals by region); with `init` in baselines each gets an untrained twin.
  config.readouts = ""
  config.recon_rounds = 2           # recon: mask draws per region and window
  config.stride = 0                 # frames between window starts (0: the window length)
  config.baselines = "region_stats,fc,init"  # probed on the same splits ('' : none)
  config.schemes = "kfold,loso"
  config.folds = 5
  config.repeats = 3                # k-fold repeated over seeds 0..repeats-1
  config.inner_folds = 3            # to choose C
  config.batch_size = 8             # windows per encoder call
  config.max_windows = 0            # windows per scan, from its start (0: all)
  if arg == "test":  # seconds on a CPU, on a pretrain_aal3.py:test checkpoint
    config.folds = 3
    config.repeats = 1
    config.data.synthetic_subjects = 48
  elif arg:
    raise ValueError(f"unknown config variant {arg!r}; expected '' or 'test'")
  return config
