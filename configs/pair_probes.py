r"""Pair two probes on their shared splits: a - b with its 95% interval.

    python -m roi_mae_jax.main --config=configs/pair_probes.py --workdir=runs/pair_steps \
        --config.a=runs/probe_3000 --config.b=runs/probe_1500
    python -m roi_mae_jax.main --config=configs/pair_probes.py --workdir=runs/pair_recon \
        --config.a=runs/probe:recon_power --config.b=runs/probe:init_recon_power

`a`, `b`: a probe workdir, optionally ':FEATURE' (one of its feature sets,
default encoder). See roi_mae_jax/tasks/pair_probes.py.
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg:
    raise ValueError(f"unknown config variant {arg!r}; expected ''")
  config = ml_collections.ConfigDict()
  config.task = "pair_probes"
  config.a = ""           # probe workdir[:FEATURE]
  config.b = ""
  config.overwrite = False
  return config
