r"""Integrated gradients of the ADHD logit, aggregated to AAL3 regions, hemispheres, systems.

    python -m roi_mae_jax.main --config=configs/attribute.py --workdir=runs/attribution \
        --config.checkpoint=runs/demo
    python -m roi_mae_jax.main --config=configs/attribute.py --workdir=runs/attribution_adhd200 \
        --config.checkpoint=runs/pretrain_adhd200 --config.data.shards=runs/adhd200_4mm

The classifier explained is the frozen encoder (its blocks `layers`, as the
probe's read-out) + `pool` + a linear head fitted on every labelled subject
(the probe's model).
"""

import ml_collections

from roi_mae_jax.config import blocks


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  config = blocks.downstream("attribute")
  config.classifier = ""            # a finetune workdir; empty: fit the probe's head here
  config.pool = "region_std"        # the probe's subject pool (roi_mae_jax/downstream/features.py)
  config.layers = ""                # encoder blocks pooled, as the probe's ("": the output)
  config.baseline = "temporal_mean"  # temporal_mean | zeros
  config.ig_steps = 32              # points on the path (midpoint rule)
  config.ig_chunk = 2               # points per backward pass (x max_windows windows): memory
  config.max_windows = 4            # consecutive windows per scan: the clip explained
  config.reconstruction_windows = 8  # reconstruction by region over this many scans (0: off)
  config.min_region_voxels = 10     # smaller regions are listed but not ranked
  config.batch_size = 8             # windows per encoder call for the head's features
  if arg == "test":
    config.data.synthetic_subjects = 48
    config.ig_steps = 16
    config.min_region_voxels = 2    # 8 mm voxels: 2 are a 4 mm grid's 16
  elif arg:
    raise ValueError(f"unknown config variant {arg!r}; expected '' or 'test'")
  return config
