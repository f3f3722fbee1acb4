"""The paper-scale step's compiled memory grows linearly with the token count.

Compiles only (nothing runs): base model, bfloat16, one window per device, the
chunked attention, remat and scanned layers, as `configs/pretrain_aal3.py:adhd200`.
"""

from conftest import load_config
from roi_mae_jax.bench import memory as bench_memory


def test_paper_scale_step_memory_is_linear_in_tokens():
  config = load_config("pretrain_aal3", "adhd200")
  assert (config.model.size, config.model.dtype, config.model.remat) == ("base", "bfloat16",
                                                                         "block")
  config.model.attention = "chunked"  # what `auto` picks on a CPU; named so a GPU test agrees
  need = {}
  for frames in (10, 20):  # 14,550 and 29,100 tokens per window
    config.frames = frames
    need[frames] = bench_memory.compiled_step(config, 1)["step_memory_bytes"]
  # Doubling the tokens: quadratic attention memory (the dense path needs ~490 GiB
  # here) would grow ~4x; linear growth plus the fixed parameters and AdamW
  # moments stays under 2x.
  assert need[20] / need[10] < 2.0, need
  assert need[20] < 6 * 2**30, need
