r"""The random-masking baseline: `pretrain_aal3.py` with `mask.strategy=random`.

    python -m roi_mae_jax.main --config=configs/pretrain_random.py --workdir=runs/random
    python -m roi_mae_jax.main --config=configs/pretrain_random.py:adhd200 --workdir=runs/paper_random

Variants (`:adhd200`, `:test`) are those of pretrain_aal3.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import pretrain_aal3  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config(arg: str = ""):
  return pretrain_aal3.get_config(arg, strategy="random")
