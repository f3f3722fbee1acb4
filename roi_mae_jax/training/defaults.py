"""Pretraining configs as values: what `configs/pretrain_aal3.py` returns, importable.

    config = defaults.default()          # 4 mm synthetic demo, minutes on a CPU
    defaults.tiny(config)                # seconds: 8 mm grid, 16 subjects, 6 steps

The config files keep their variants (`:adhd200`); these blocks live in the
package so that an installed copy without the repository's `configs/`
folder (the Colab notebook) builds the same runs.
"""

from __future__ import annotations

import ml_collections

from roi_mae_jax.config import blocks
from roi_mae_jax.data import synthetic
from roi_mae_jax.devices import distributed
from roi_mae_jax.devices import sharding
from roi_mae_jax.masking import objectives
from roi_mae_jax.model import mae as model_lib
from roi_mae_jax.training import train_step


def default(strategy: str = "roi") -> ml_collections.ConfigDict:
  """Pretraining on the built-in synthetic data, tiny model, 4 mm grid, 300 steps;
  the loss reconstructs masked and visible tokens."""
  config = ml_collections.ConfigDict()
  config.task = "pretrain"
  config.seed = 0
  config.total_steps = 300
  config.batch_size = 8
  config.frames = 4                    # frames per window
  config.atlas = blocks.atlas()
  config.grid = blocks.grid(voxel_size_mm=4.0, shape=(40, 48, 44))
  config.patches = blocks.patches(size=4, frames=2)
  config.mask = blocks.mask(strategy=strategy, ratio=0.5)
  config.model = model_lib.model_config("tiny")
  config.loss = objectives.loss_config()  # region-weighted reconstruction loss
  # The visible tokens are reconstructed too: with the masked tokens alone the
  # encoder drops each region's own fluctuation, and its features fall below its
  # random initialisation (docs/compare.md#pretraining-curve); 0 is MAE's loss.
  config.loss.visible_weight = 1.0
  config.optim = train_step.optim_config()
  config.optim.learning_rate = 2e-3
  config.mesh = sharding.mesh_config(data=-1, fsdp=1, tensor=1)
  config.distributed = distributed.distributed_config()
  config.data = ml_collections.ConfigDict({
      "shards": "",                    # a prepare workdir; empty: the synthetic data below
      "windows_per_subject": 4,        # random windows of each scan per epoch
      "streams": 0,                    # parts of the global batch; 0: one per process
      "read_threads": 2,
      "prefetch": 4,                   # batches read ahead
      "prefetch_workers": 0,           # >0: read in that many processes
      "synthetic": synthetic.synthetic_config(),
  })
  config.log_every = 10
  config.checkpoint_every = 100
  config.keep_checkpoints = 3
  config.fault_kill_after_step = 0     # >0: SIGKILL itself after that step (resume tests)
  config.resume_onto_changed_data = False  # True: resume although data.shards was prepared
                                           # again since (recorded in data_fingerprint.json)
  config.figure_point_mm = (30.0, -20.0, 8.0)
  return config


def tiny(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks `config` (in place) to seconds on a CPU: 8 mm grid, 16 short runs, 6 steps."""
  config.grid = blocks.grid(voxel_size_mm=8.0, shape=(20, 24, 24))
  config.patches = blocks.patches(size=4, frames=2)
  config.data.synthetic.num_subjects = 16
  config.data.synthetic.run_frames = 12
  config.total_steps = 6
  config.log_every = 2
  config.checkpoint_every = 2
  config.mesh = sharding.mesh_config(data=1, fsdp=1, tensor=1)
  return config
