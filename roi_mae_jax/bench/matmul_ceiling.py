"""The MFU a train step could reach: its own matmuls, each timed alone.

MFU counts the model's matmul FLOPs against a large square matmul's rate, but
a step's matmuls are not square: attention's have 64-wide heads, weight
gradients contract over tokens. This lists every matmul the step runs (shape,
operand layout, times per step), times each shape on its own on the device,
and sums them: the step's matmul time if every other kernel took no time. Its
MFU is the ceiling for the step as compiled on this device and matmul library.

    matmuls = step_matmuls(spec, "small", 4, num_keep=654, batch=2)  # attention "auto"
    figures = measure(matmuls, jnp.float32, model_flops)
    figures["seconds"], figures["mfu_ceiling"]   # e.g. 1.45 s, 0.78

Only the attention kernels built from whole matmuls (`dense`, `reference`)
are listed; a fused kernel (cuDNN, Pallas) or `chunked`'s tiles are not.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from roi_mae_jax.model import attention as attention_lib
from roi_mae_jax.model import mae as model_lib

KERNELS = ("dense", "reference")  # attention kernels whose matmuls are listed
NOT_LISTED = "n/a (an attention kernel not made of whole matmuls: fused or tiled)"


class UnlistedKernel(ValueError):
  """The step's attention kernel is not made of whole matmuls (see KERNELS)."""


@dataclasses.dataclass(frozen=True)
class Matmul:
  """One matmul of the step: `equation` on operands of shapes `lhs`, `rhs`
  (the layouts the step reads them in), run `count` times per step."""

  part: str       # "linear" or "attention": the figures are summed by part
  what: str
  equation: str
  lhs: tuple[int, ...]
  rhs: tuple[int, ...]
  count: int
  forward: bool = False  # part of the forward pass (MFU counts 3 x these)

  @property
  def flops(self) -> float:
    """2 x the product of every index's size (one multiply-add per term)."""
    sizes = {}
    inputs = self.equation.split("->")[0].split(",")
    for letters, shape in zip(inputs, (self.lhs, self.rhs)):
      sizes.update(zip(letters, shape))
    return 2.0 * math.prod(sizes.values())


def _linear(what: str, tokens: int, d_in: int, d_out: int, layers: int, batch: int, dtype,
            input_grad: bool = True) -> Iterator[Matmul]:
  """x @ W forward, g @ W^T (x's gradient) and x^T @ g (W's gradient), the
  last in the form `fused_layers.matmul` takes for `dtype`: over the flattened
  tokens in float32, over (batch, tokens per window) in bfloat16."""
  yield Matmul("linear", f"{what} forward", "td,df->tf", (tokens, d_in), (d_in, d_out), layers,
               forward=True)
  if input_grad:
    yield Matmul("linear", f"{what} input grad", "tf,df->td", (tokens, d_out), (d_in, d_out),
                 layers)
  if jnp.dtype(dtype) == jnp.bfloat16:
    yield Matmul("linear", f"{what} weight grad", "btd,btf->df", (batch, tokens // batch, d_in),
                 (batch, tokens // batch, d_out), layers)
  else:
    yield Matmul("linear", f"{what} weight grad", "td,tf->df", (tokens, d_in), (tokens, d_out),
                 layers)


def _attention(what: str, kernel: str, batch: int, tokens: int, heads: int, head_dim: int,
               layers: int) -> Iterator[Matmul]:
  """The matmuls of `attention.dense` (per loop step of a few heads, with the
  weights recomputed in backward) or of `reference` (all heads at once)."""
  group = attention_lib.heads_per_step_for(heads, tokens) if kernel == "dense" else batch * heads
  count = layers * (batch * heads // group if kernel == "dense" else 1)
  vec, mat = (group, tokens, head_dim), (group, tokens, tokens)
  forward = [("logits", "nqd,nkd->nqk", vec, vec), ("weights x values", "nqk,nkd->nqd", mat, vec)]
  if kernel == "dense":  # keys by queries (attention._group_bwd)
    backward = [("logits recomputed", "nkd,nqd->nkq", vec, vec),
                ("dV", "nkq,nqd->nkd", mat, vec), ("dP", "nkd,nqd->nkq", vec, vec),
                ("dK", "nkq,nqd->nkd", mat, vec), ("dQ", "nkq,nkd->nqd", mat, vec)]
  else:  # autodiff of the two einsums
    backward = [("dV", "nqk,nqd->nkd", mat, vec), ("dP", "nqd,nkd->nqk", vec, vec),
                ("dQ", "nqk,nkd->nqd", mat, vec), ("dK", "nqk,nqd->nkd", mat, vec)]
  for name, equation, lhs, rhs in forward:
    yield Matmul("attention", f"{what} {name}", equation, lhs, rhs, count, forward=True)
  for name, equation, lhs, rhs in backward:
    yield Matmul("attention", f"{what} {name}", equation, lhs, rhs, count)


def step_matmuls(spec: model_lib.TokenSpec, size: str, mlp_ratio: int, num_keep: int,
                 batch: int, attention: str = "auto", backend: str | None = None,
                 dtype=jnp.float32) -> list[Matmul]:
  """Every matmul of one train step of the masked autoencoder (forward and
  backward) on `batch` windows. `attention` is `model.attention`; the kernel
  it means for each stack (`attention.choose`, on `backend`, default this
  one's) must be one of KERNELS, else UnlistedKernel."""
  dims = model_lib.SIZES[size]
  width, d_width = dims.width, dims.decoder_width
  visible, every = batch * num_keep, batch * spec.num_tokens
  out = list(_linear("patch embedding", visible, spec.token_dim, width, 1, batch, dtype,
                     input_grad=False))
  for what, tokens, w, layers, h, per_window in (
      ("encoder", visible, width, dims.depth, dims.heads, num_keep),
      ("decoder", every, d_width, dims.decoder_depth, dims.decoder_heads, spec.num_tokens)):
    kernel = attention_lib.choose(attention, backend or jax.default_backend(), dtype, batch,
                                  per_window, h)
    if kernel not in KERNELS:
      raise UnlistedKernel(f"the {what}'s attention kernel is {kernel!r}: its matmuls are "
                           f"not listed (only {', '.join(KERNELS)})")
    out += _linear(f"{what} qkv", tokens, w, 3 * w, layers, batch, dtype)
    out += _linear(f"{what} attention out", tokens, w, w, layers, batch, dtype)
    out += _linear(f"{what} MLP up", tokens, w, mlp_ratio * w, layers, batch, dtype)
    out += _linear(f"{what} MLP down", tokens, mlp_ratio * w, w, layers, batch, dtype)
    out += _attention(f"{what} attention", kernel, batch, per_window, h, w // h, layers)
  out += _linear("encoder to decoder", visible, width, d_width, 1, batch, dtype)
  out += _linear("prediction head", every, d_width, spec.token_dim, 1, batch, dtype)
  return out


def time_matmul(matmul: Matmul, dtype, min_seconds: float = 0.02, repeats: int = 5) -> float:
  """Seconds per call of `matmul` alone (best of `repeats` runs of enough calls
  to last `min_seconds`), accumulating in float32 as the model does."""
  lhs = jax.random.normal(jax.random.key(0), matmul.lhs, dtype)
  rhs = jax.random.normal(jax.random.key(1), matmul.rhs, dtype)
  run = jax.jit(lambda a, b: jnp.einsum(matmul.equation, a, b,
                                        preferred_element_type=jnp.float32))
  jax.block_until_ready(run(lhs, rhs))  # compiles
  start = time.perf_counter()
  jax.block_until_ready(run(lhs, rhs))
  calls = max(1, int(min_seconds / max(time.perf_counter() - start, 1e-7)))
  best = np.inf
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(calls):
      result = run(lhs, rhs)
    jax.block_until_ready(result)
    best = min(best, (time.perf_counter() - start) / calls)
  return best


def measure(matmuls: list[Matmul], dtype, model_flops: float, peak_size: int = 2048,
            step_s: float | None = None) -> dict:
  """Times each distinct matmul once and sums them over the step.

  The peak is a (peak_size)^3 matmul timed the same way, before and after
  (the better of the two): a peak measured at another moment would move the
  ceiling with the machine's load. Returns 'seconds' (the step's matmuls
  alone), 'peak_flops_per_s', 'mfu_ceiling' (`model_flops` over those seconds
  and the peak), 'share' of `step_s` when given, per part ('linear',
  'attention') seconds, FLOPs and rate, and 'rows', one per matmul.
  """
  square = Matmul("peak", "square", "mk,kn->mn", (peak_size,) * 2, (peak_size,) * 2, 1)
  peak_s = time_matmul(square, dtype)
  timed: dict = {}
  rows = []
  for m in matmuls:
    key = (m.equation, m.lhs, m.rhs)
    if key not in timed:
      timed[key] = time_matmul(m, dtype)
    rows.append({"part": m.part, "what": m.what, "equation": m.equation, "lhs": list(m.lhs),
                 "rhs": list(m.rhs), "count": m.count, "flops": m.flops,
                 "seconds": timed[key] * m.count,
                 "flops_per_s": m.flops / timed[key]})
  peak = square.flops / min(peak_s, time_matmul(square, dtype))
  seconds = sum(r["seconds"] for r in rows)
  figures = {"seconds": seconds, "flops": sum(r["flops"] * r["count"] for r in rows),
             "peak_flops_per_s": peak, "mfu_ceiling": model_flops / seconds / peak,
             "rows": rows}
  if step_s:
    figures["share"] = seconds / step_s
  for part in ("linear", "attention"):
    mine = [r for r in rows if r["part"] == part]
    part_s = sum(r["seconds"] for r in mine)
    part_flops = sum(r["flops"] * r["count"] for r in mine)
    figures[part] = {"seconds": part_s, "flops": part_flops,
                     "flops_per_s": part_flops / part_s if part_s else float("nan")}
  return figures


def describe(figures: dict) -> str:
  """Two lines: the matmuls' time by part, and the MFU ceiling."""
  peak = figures["peak_flops_per_s"]
  parts = "; ".join(
      f"{part} {figures[part]['seconds']:.3f} s at {figures[part]['flops_per_s'] / 1e9:.0f} "
      f"GFLOP/s ({figures[part]['flops_per_s'] / peak:.0%} of peak)"
      for part in ("linear", "attention"))
  share = f" = {figures['share']:.0%} of the step" if "share" in figures else ""
  return (f"matmuls alone (each shape timed on its own): {figures['seconds']:.3f} s per step"
          f"{share}; {parts}\n"
          f"MFU ceiling {figures['mfu_ceiling']:.1%} (of a {peak / 1e9:.1f} GFLOP/s peak timed "
          "with them): the step's MFU if every other kernel took no time")
