"""bench.matmul_ceiling: the step's matmul list and the MFU it bounds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from roi_mae_jax.bench import matmul_ceiling
from roi_mae_jax.bench import step_time as bench_train
from roi_mae_jax.model import attention
from roi_mae_jax.model import mae as model_lib


def _spec(patches: int = 655, frames: int = 4) -> model_lib.TokenSpec:
  """The demo grid's token layout (only the counts matter here)."""
  return model_lib.TokenSpec((40, 48, 44, frames), 4, 2, np.arange(patches), (10, 12, 11),
                             np.zeros(patches, int), 170)


@pytest.mark.parametrize("size,kernel", [("small", "dense"), ("small", "reference"),
                                         ("tiny", "dense")])
def test_the_listed_forward_matmuls_are_the_flops_mfu_counts(size, kernel):
  spec, keep, batch = _spec(), 654, 2
  matmuls = matmul_ceiling.step_matmuls(spec, size, 4, keep, batch, kernel)
  forward = sum(m.flops * m.count for m in matmuls if m.forward)
  assert 3 * forward == bench_train.analytic_flops(spec, size, 4, keep, batch)

  # Backward: twice the forward, less the patch embedding's input gradient
  # (the windows are data), plus `dense`'s recomputed logits.
  dims = model_lib.SIZES[size]
  width, depth, heads = dims.width, dims.depth, dims.heads
  d_width, d_depth, d_heads = dims.decoder_width, dims.decoder_depth, dims.decoder_heads
  embedding_input_grad = 2 * batch * keep * spec.token_dim * width
  recomputed = 0
  if kernel == "dense":
    recomputed = 2 * batch * heads * keep ** 2 * (width // heads) * depth + \
        2 * batch * d_heads * spec.num_tokens ** 2 * (d_width // d_heads) * d_depth
  backward = sum(m.flops * m.count for m in matmuls if not m.forward)
  assert backward == 2 * forward - embedding_input_grad + recomputed


def test_dense_attention_matmuls_follow_its_loop_over_head_groups():
  matmuls = matmul_ceiling.step_matmuls(_spec(), "small", 4, 654, 2, "dense")
  logits = next(m for m in matmuls if m.what == "encoder attention logits")
  group = attention.heads_per_step_for(6, 654)
  assert group == 2 and logits.lhs == (group, 654, 64)
  assert logits.count == 12 * 2 * 6 // group  # layers x batch x heads / group
  assert len([m for m in matmuls if m.part == "attention" and m.what.startswith("encoder")]) == 7


def test_weight_gradients_take_the_form_the_model_runs_per_dtype():
  f32 = matmul_ceiling.step_matmuls(_spec(), "tiny", 4, 654, 2, "dense")
  bf16 = matmul_ceiling.step_matmuls(_spec(), "tiny", 4, 654, 2, "dense", dtype=jnp.bfloat16)
  grad32, grad16 = (next(m for m in ms if m.what == "encoder MLP up weight grad")
                    for ms in (f32, bf16))
  assert grad32.lhs == (2 * 654, 64) and grad16.lhs == (2, 654, 64)  # see fused_layers.matmul
  assert grad32.flops == grad16.flops
  assert sum(m.flops * m.count for m in f32) == sum(m.flops * m.count for m in bf16)


def test_kernels_not_made_of_matmuls_are_refused():
  with pytest.raises(matmul_ceiling.UnlistedKernel, match="chunked"):
    matmul_ceiling.step_matmuls(_spec(), "tiny", 4, 654, 2, "chunked")
  with pytest.raises(matmul_ceiling.UnlistedKernel, match="cudnn"):
    matmul_ceiling.step_matmuls(_spec(), "tiny", 4, 654, 2, "auto", backend="gpu",
                                dtype=jnp.bfloat16)


def test_measure_sums_the_timed_shapes_over_their_counts():
  matmuls = [
      matmul_ceiling.Matmul("linear", "a", "td,df->tf", (64, 32), (32, 48), 3, forward=True),
      matmul_ceiling.Matmul("linear", "b", "td,tf->df", (64, 32), (64, 48), 2),
      matmul_ceiling.Matmul("attention", "c", "nqd,nkd->nqk", (2, 40, 16), (2, 40, 16), 5),
  ]
  assert matmuls[0].flops == 2 * 64 * 32 * 48 == matmuls[1].flops
  assert matmuls[2].flops == 2 * 2 * 40 * 40 * 16
  figures = matmul_ceiling.measure(matmuls, jnp.float32, model_flops=1e6, peak_size=64,
                                   step_s=1.0)
  rows = figures["rows"]
  assert [r["count"] for r in rows] == [3, 2, 5]
  assert figures["seconds"] == pytest.approx(sum(r["seconds"] for r in rows))
  assert figures["seconds"] == pytest.approx(
      figures["linear"]["seconds"] + figures["attention"]["seconds"])
  assert figures["linear"]["flops"] == 5 * matmuls[0].flops
  assert figures["mfu_ceiling"] == pytest.approx(
      1e6 / figures["seconds"] / figures["peak_flops_per_s"])
  assert figures["share"] == pytest.approx(figures["seconds"])
  for row, m in zip(rows, matmuls):  # each row's rate is its shape's, once per call
    assert row["flops_per_s"] == pytest.approx(m.flops * m.count / row["seconds"])
  text = matmul_ceiling.describe(figures)
  assert "MFU ceiling" in text and "attention" in text


def test_the_peak_matmul_accumulates_in_float32_as_the_model_does():
  """A bfloat16-output matmul runs a much slower path on AMX CPUs: a peak
  measured with it would flatter the bfloat16 MFU."""
  x = jnp.ones((8, 16), jnp.bfloat16)
  out = jax.jit(bench_train.peak_matmul)(x, x.T)
  assert out.dtype == jnp.float32 and float(out[0, 0]) == 16.0
  lines = jax.jit(bench_train.peak_matmul).lower(x, x.T).as_text().splitlines()
  dot = next(line for line in lines if "dot_general" in line)
  assert "(tensor<8x16xbf16>, tensor<16x8xbf16>) -> tensor<8x8xf32>" in dot  # no f32 copies
