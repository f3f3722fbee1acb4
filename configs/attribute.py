r"""Integrated gradients of the ADHD logit, aggregated to AAL3 regions, hemispheres, systems.

    python -m roi_mae_jax.main --config=configs/attribute.py --workdir=runs/attribution \
        --config.checkpoint=runs/demo
    python -m roi_mae_jax.main --config=configs/attribute.py --workdir=runs/attribution_adhd200 \
        --config.checkpoint=runs/pretrain_adhd200 --config.data.shards=runs/adhd200_4mm

The classifier explained is the frozen encoder + `pool` + a linear head fitted
on every labelled subject (the probe's model).
"""

import ml_collections

from roi_mae_jax import config_lib


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  config = config_lib.downstream("attribute")
  config.classifier = ""            # a finetune workdir; empty: fit the probe's head here
  config.pool = "region"            # features the probe head reads: mean | region
  config.baseline = "zeros"         # zeros | temporal_mean
  config.ig_steps = 32              # points on the path (midpoint rule)
  config.ig_chunk = 8               # points per backward pass: bounds memory
  config.max_windows = 2            # windows per scan explained (0: all)
  config.reconstruction_windows = 8  # reconstruction by region over this many scans (0: off)
  config.min_region_voxels = 10     # smaller regions are listed but not ranked
  config.batch_size = 8             # windows per encoder call for the head's features
  if arg == "test":
    config.data.synthetic_subjects = 48
  elif arg:
    raise ValueError(f"unknown config variant {arg!r}; expected '' or 'test'")
  return config
