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

from roi_mae_jax.config import blocks
from roi_mae_jax.model import mae as model_lib
from roi_mae_jax.training import defaults


def get_config(arg: str = "", strategy: str = "roi") -> ml_collections.ConfigDict:
  config = defaults.default(strategy)  # the blocks: roi_mae_jax/training/defaults.py
  if arg == "adhd200":
    blocks.paper_scale(config)
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
    defaults.tiny(config)
  elif arg:
    raise ValueError(f"unknown config variant {arg!r}; expected '', 'adhd200' or 'test'")
  return config
