r"""Region-aware (AAL3 `roi` masking) pretraining of the 4D masked autoencoder.

    python -m roi_mae_jax.main --config=configs/pretrain_aal3.py --workdir=runs/demo
    python -m roi_mae_jax.main --config=configs/pretrain_aal3.py:adhd200 --workdir=runs/paper
    python -m roi_mae_jax.main --config=configs/pretrain_aal3.py:test --workdir=/tmp/t

The default trains on the built-in synthetic resting-state data (no files
needed) on a 4 mm grid, sized to finish in a few minutes on a laptop CPU.
`:adhd200` is the paper's scale (96^3 at 2 mm, 20 frames, 6^3-voxel patches,
base model, bf16, memory-efficient attention, remat, scanned layers) for
accelerators; `:test` is a seconds-long setting for tests.
Any field can be overridden, e.g. `--config.mask.ratio=0.75`.
"""

import ml_collections

from roi_mae_jax import config_lib
from roi_mae_jax import distributed
from roi_mae_jax import model as model_lib
from roi_mae_jax import region_objectives
from roi_mae_jax import sharding
from roi_mae_jax import train_step
from roi_mae_jax.data import synthetic


def get_config(arg: str = "", strategy: str = "roi") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.task = "pretrain"
  config.seed = 0
  config.total_steps = 300
  config.batch_size = 8
  config.frames = 4                    # frames per window
  config.atlas = config_lib.atlas()
  config.grid = config_lib.grid(voxel_size_mm=4.0, shape=(40, 48, 44))
  config.patches = config_lib.patches(size=4, frames=2)
  config.mask = config_lib.mask(strategy=strategy, ratio=0.5)
  config.model = model_lib.model_config("tiny")
  config.loss = region_objectives.loss_config()  # region-weighted reconstruction loss
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
  config.figure_point_mm = (30.0, -20.0, 8.0)
  if arg == "adhd200":
    config_lib.paper_scale(config)
    config.patches.frames = 1
    config.model = model_lib.model_config("base")
    config.model.dtype = "bfloat16"
    # 29,100 tokens per window: never materialise their attention logits (auto:
    # cuDNN on GPUs, the Pallas kernel on TPUs, `chunked` elsewhere); recompute
    # each block in backward, scan the layers, run the MLP 4,096 tokens at a time.
    config.model.remat = "block"
    config.model.scan = True
    config.model.mlp_chunk = 4096
    config.batch_size = 32
    config.total_steps = 20_000
    config.optim.learning_rate = 1.5e-4
    config.optim.warmup_steps = 1000
    config.log_every = 50
    config.checkpoint_every = 1000
    config.data.synthetic.run_frames = 120
  elif arg == "test":
    config.grid = config_lib.grid(voxel_size_mm=8.0, shape=(20, 24, 24))
    config.patches = config_lib.patches(size=4, frames=2)
    config.data.synthetic.num_subjects = 16
    config.data.synthetic.run_frames = 12
    config.total_steps = 6
    config.log_every = 2
    config.checkpoint_every = 2
    config.mesh = sharding.mesh_config(data=1, fsdp=1, tensor=1)
  elif arg:
    raise ValueError(f"unknown config variant {arg!r}; expected '', 'adhd200' or 'test'")
  return config
