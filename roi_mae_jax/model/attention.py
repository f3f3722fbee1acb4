"""Multi-head softmax attention behind one function, with a choice of kernels.

    y = attention.attend(q, k, v, key_valid, implementation="auto")  # (B, T, H, D)

q, k, v are (batch, tokens, heads, head_dim); `key_valid` (B, T) bool says which
tokens may be attended to (reconstruction by region hides some). Kernels:

  reference  two einsums and a float32 softmax; materialises (B, H, T, T)
  dense      the same, a few heads at a time (their (T, T) logits under
             4 MiB) so the logits stay in cache, with a hand-written backward that
             recomputes them (on a CPU the softmax passes cost as much as the
             matmuls)
  xla        `jax.nn.dot_product_attention(implementation="xla")`, likewise
  cudnn      cuDNN's fused kernel (GPU, bfloat16/float16)
  pallas     the Pallas flash-attention kernel (TPU), under shard_map on a mesh:
             batch over data x fsdp, heads over tensor (queries over tensor
             where the heads do not divide it)
  chunked    blockwise online softmax over query and key blocks (Rabe and
             Staats 2021, "Self-attention does not need O(n^2) memory") with a
             flash-style backward: memory O(T x block) on every backend
  auto       picks one by platform, dtype and size (`choose`), and logs it

The platform is that of the mesh the step is compiled for (`platforms.Target`),
not the host's: a CPU host compiling for a TPU pod gets `pallas`.

The chunked path keeps only the output and two float32 numbers per row (the
running max and the softmax denominator) for the backward pass, which
recomputes each tile's probabilities.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jax.sharding import PartitionSpec as P

from roi_mae_jax import errors
from roi_mae_jax.config import validation
from roi_mae_jax.devices import platforms
from roi_mae_jax.devices import sharding
from roi_mae_jax.model.cpu import scan_slices

IMPLEMENTATIONS = ("auto", "reference", "dense", "xla", "cudnn", "pallas", "chunked")
# `auto` takes `dense` (one head's full (T, T) logits at a time) only while one
# layer's (B, H, T, T) float32 logits stay under this; beyond, a
# memory-efficient kernel.
AUTO_DENSE_LIMIT_BYTES = 256 * 2**20
_MASKED = -1e30  # a hidden key: as the reference, a row hiding every key is uniform
_logged: set = set()


def check_implementation(name: str) -> None:
  """InputError unless `name` is one of IMPLEMENTATIONS (the rule of model.attention)."""
  validation.refuse("model.attention", name)


def choose(implementation: str, platform: str, dtype, batch: int, tokens: int,
           heads: int) -> str:
  """The kernel that `implementation` means on `platform`; `auto` decides by size.

      choose("auto", "cpu", jnp.float32, 2, 1200, 6)     # 'dense' (small: fastest)
      choose("auto", "cpu", jnp.bfloat16, 1, 28480, 8)   # 'chunked'
      choose("auto", "gpu", jnp.bfloat16, 1, 28480, 8)   # 'cudnn'
      choose("auto", "tpu", jnp.float32, 1, 29100, 12)   # 'pallas' (pads to its blocks)
  """
  check_implementation(implementation)
  if implementation != "auto":
    return implementation
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  if platform == "tpu":
    return "pallas"
  if platform == "gpu" and half:
    return "cudnn"  # fused and O(T) memory
  if batch * heads * tokens * tokens * 4 > AUTO_DENSE_LIMIT_BYTES:
    return "chunked"
  # Small: the cache-sized head loop on a CPU (see platforms); XLA's fused
  # dense attention elsewhere (a GPU in float32).
  return "dense" if platform == "cpu" else "xla"


def attend(q, k, v, key_valid=None, *, implementation: str = "auto", block: int = 512,
           target: platforms.Target | None = None):
  """Softmax(q k^T / sqrt(d)) v over (B, T, H, D) arrays; see the module docstring.

  `target`: what the step is compiled for (None: this host's backend, unsharded).
  """
  target = target or platforms.Target.host()
  kind = choose(implementation, target.platform, q.dtype, q.shape[0], k.shape[1], q.shape[2])
  _log_choice(implementation, kind, q.shape, q.dtype, target.platform)
  if kind == "reference":
    return reference(q, k, v, key_valid)
  if kind == "dense":
    return dense(q, k, v, key_valid)
  if kind == "chunked":
    return chunked(q, k, v, key_valid, block=block, pack=target.cpu_paths)
  if kind == "xla" or kind == "cudnn":
    if kind == "cudnn" and target.platform != "gpu":
      raise errors.InputError(f"model.attention 'cudnn' needs a GPU; this step is compiled "
                              f"for {target.platform} (use 'chunked' or 'auto')")
    mask = None if key_valid is None else key_valid[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=kind)
  if target.platform != "tpu":
    raise errors.InputError(f"model.attention 'pallas' needs a TPU; this step is compiled "
                            f"for {target.platform} (use 'chunked' or 'auto')")
  return pallas_flash(q, k, v, key_valid, mesh=target.mesh)


def _log_choice(implementation: str, kind: str, shape, dtype, platform: str) -> None:
  """Logs what `auto` chose, once per shape and platform (not per trace)."""
  key = (kind, shape, str(dtype), platform)
  if implementation == "auto" and key not in _logged:
    _logged.add(key)
    logging.info("attention auto: %s for %s tokens x %s heads (%s, %s)", kind, shape[1],
                 shape[2], dtype, platform)


def reference(q, k, v, key_valid=None):
  """Dense attention as two einsums (on XLA's CPU backend faster than
  `jax.nn.dot_product_attention`); the logits and softmax are float32."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1]).astype(q.dtype)
  logits = logits.astype(jnp.float32)
  if key_valid is not None:
    logits = jnp.where(key_valid[:, None, None, :], logits, _MASKED)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def _dot(equation: str, a, b):
  """einsum accumulated and returned in float32. bfloat16 operands stay
  bfloat16: XLA's CPU backend runs bfloat16 x bfloat16 -> float32 natively
  (XNNPACK; with AMX/AVX-512 BF16 several times its float32 matmul rate), while
  float32 copies of the operands would cost memory and time."""
  return jnp.einsum(equation, a, b, preferred_element_type=jnp.float32)


def dense(q, k, v, key_valid=None):
  """`reference` in values and gradients, with fewer passes over the logits: the
  softmax normalisation is applied to the (T, D) output, not the (T, T) weights,
  and the backward takes the softmax row term from dO . O (as FlashAttention).

  A few heads at a time, in a loop (see `dense_packed`): each pass over their
  (T, T) logits then runs in cache, where passes over all heads' logits at once
  would stream them through memory (on a 2-core CPU, a quarter less time).
  """
  return dense_packed(jnp.stack([q, k, v], axis=2), key_valid)


def attend_packed(qkv, key_valid=None, *, implementation: str = "auto", block: int = 512,
                  target: platforms.Target | None = None):
  """`attend` on the (B, T, 3, H, D) output of a fused q/k/v projection.

  The `dense` kernel reads each head's q, k and v straight from it (no
  activation is moved heads-first, in either pass); the others get q, k, v.
  """
  target = target or platforms.Target.host()
  b, t, _, h, d = qkv.shape
  kind = choose(implementation, target.platform, qkv.dtype, b, t, h)
  _log_choice(implementation, kind, (b, t, h, d), qkv.dtype, target.platform)
  if kind == "dense":
    return dense_packed(qkv, key_valid)
  return attend(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], key_valid,
                implementation=kind, block=block, target=target)  # chosen: not again


def dense_packed(qkv, key_valid=None, heads_per_step: int = 0):
  """`dense` on qkv (B, T, 3, H, D) -> (B, T, H, D).

  Each step of the loop over (batch, head group) slices its heads' q, k and v
  out of `qkv` (a small strided copy) and writes its output rows into
  (B, T, H, D) in place; the backward pass writes dq, dk, dv into the cotangent
  of `qkv` the same way. So the (B, T, 3 x H x D) activations are neither
  transposed heads-first nor kept twice for the backward pass, and the output
  projection reads the output as it is. `heads_per_step` (0: `heads_per_step_for`)
  heads go through each step together.
  """
  valid = None if key_valid is None else key_valid.astype(bool)
  group = heads_per_step or heads_per_step_for(qkv.shape[3], qkv.shape[1])
  if qkv.shape[3] % group:
    raise errors.InputError(f"{group} heads per step do not divide {qkv.shape[3]} heads")
  return _dense_attention(qkv, valid, group)


# One loop step's float32 logits stay under this: bigger steps are fewer (a loop
# step costs a few microseconds per op on a CPU), smaller ones stay in cache.
_STEP_LOGITS_BYTES = 4 * 2**20


def heads_per_step_for(heads: int, tokens: int) -> int:
  """The most heads dividing `heads` whose (tokens x tokens) float32 logits
  together fit _STEP_LOGITS_BYTES (at least 1)."""
  fits = [g for g in range(1, heads + 1)
          if heads % g == 0 and g * tokens * tokens * 4 <= _STEP_LOGITS_BYTES]
  return max(fits, default=1)


def _heads(x, b, h, group, s=None):
  """(group, T, D) slice of x (B, T, H, D), or of x (B, T, 3, H, D) at part s,
  from head h on."""
  t, d = x.shape[1], x.shape[-1]
  if s is None:
    part = jax.lax.dynamic_slice(x, (b, 0, h, 0), (1, t, group, d))
  else:
    part = jax.lax.dynamic_slice(x, (b, 0, s, h, 0), (1, t, 1, group, d))
  return jnp.swapaxes(part.reshape(t, group, d), 0, 1)


def _rows(x):
  """(group, T, D) -> (1, T, group, D): as a slice of a (B, T, H, D) array."""
  return jnp.swapaxes(x, 0, 1)[None]


def _group_fwd(q, k, v, valid):
  """Heads (n, T, D) x 3, valid (T,) or None -> (out, row max m, row sums l)."""
  p, m = _weights(q, k, valid)
  l = p.sum(-1)  # (n, T)
  out = _dot("nqk,nkd->nqd", p.astype(v.dtype), v) / l[..., None]
  return out.astype(q.dtype), m, l


def _weights(q, k, valid, m=None):
  """exp((logits - m) x scale) for heads (n, T, D), with m the row max of the
  unscaled logits unless given, and m. The scale rides in the exp's pass over
  the (T, T) logits rather than a pass of its own."""
  s = _dot("nqd,nkd->nqk", q, k)
  if valid is not None:  # (no mask: no pass over the logits for it)
    s = jnp.where(valid[None, None, :], s, _MASKED)
  m = s.max(-1) if m is None else m
  return jnp.exp((s - m[..., None]) * (1.0 / math.sqrt(q.shape[-1]))), m


def _over_heads(qkv, valid, group, body, init):
  """fori_loop of body(b, h, q, k, v, valid_b, i, carry) over groups i of
  `group` heads: batch b, heads h..h+group, q, k, v (group, T, D)."""
  batch, _, _, heads, _ = qkv.shape
  steps_per_batch = heads // group

  def step(i, carry):
    b, h = i // steps_per_batch, (i % steps_per_batch) * group
    q, k, v = (_heads(qkv, b, h, group, s) for s in range(3))
    valid_b = None if valid is None else jax.lax.dynamic_index_in_dim(valid, b, keepdims=False)
    return body(b, h, q, k, v, valid_b, i, carry)
  return jax.lax.fori_loop(0, batch * steps_per_batch, step, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dense_attention(qkv, valid, group):
  """qkv (B, T, 3, H, D), valid (B, T) or None -> (B, T, H, D)."""
  return _dense_attention_fwd(qkv, valid, group)[0]


def _dense_attention_fwd(qkv, valid, group):
  batch, t, _, heads, d = qkv.shape

  def body(b, h, q, k, v, valid_b, i, carry):
    out, m, l = carry
    o, m_i, l_i = _group_fwd(q, k, v, valid_b)
    out = jax.lax.dynamic_update_slice(out, _rows(o), (b, 0, h, 0))
    m = jax.lax.dynamic_update_index_in_dim(m, m_i, i, 0)
    l = jax.lax.dynamic_update_index_in_dim(l, l_i, i, 0)
    return out, m, l
  stats = jnp.zeros((batch * heads // group, group, t), jnp.float32)
  out, m, l = _over_heads(qkv, valid, group, body,
                          (jnp.zeros((batch, t, heads, d), qkv.dtype), stats, stats))
  return out, (qkv, valid, out, m, l)


def _group_bwd(q, k, v, valid, out, m, l, d_out):
  """Heads' dq, dk, dv. The weights are recomputed (as FlashAttention) keys by
  queries, P^T = exp((k q^T - m) x scale) / l: then dV = P^T dO, dP^T = v dO^T
  and dK = dS^T q take their operands as stored, and only dQ = (dS^T)^T k reads
  one transposed (XLA's CPU matmul libraries copy a transposed operand first)."""
  scale = 1.0 / math.sqrt(q.shape[-1])
  s_t = _dot("nkd,nqd->nkq", k, q)
  if valid is not None:
    s_t = jnp.where(valid[None, :, None], s_t, _MASKED)
  p_t = jnp.exp((s_t - m[:, None, :]) * scale).astype(v.dtype)  # unnormalised
  dv = _dot("nkq,nqd->nkd", p_t, (d_out / l[..., None]).astype(p_t.dtype))
  dp_t = _dot("nkd,nqd->nkq", v, d_out)
  delta = jnp.einsum("nqd,nqd->nq", d_out, out, preferred_element_type=jnp.float32)
  # dS = P (dP - delta); hidden keys' logits are constants (no gradient).
  ds_t = p_t * ((dp_t - delta[:, None, :]) * (scale / l)[:, None, :])
  if valid is not None:
    ds_t = jnp.where(valid[None, :, None], ds_t, 0.0)
  ds_t = ds_t.astype(q.dtype)
  dk = _dot("nkq,nqd->nkd", ds_t, q)
  dq = _dot("nkq,nkd->nqd", ds_t, k)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def _dense_attention_bwd(group, residuals, d_out):
  qkv, valid, out, m, l = residuals

  def body(b, h, q, k, v, valid_b, i, d_qkv):
    grads = _group_bwd(q, k, v, valid_b, _heads(out, b, h, group), m[i], l[i],
                       _heads(d_out, b, h, group))
    for s, g in enumerate(grads):
      d_qkv = jax.lax.dynamic_update_slice(d_qkv, _rows(g)[:, :, None], (b, 0, s, h, 0))
    return d_qkv
  return _over_heads(qkv, valid, group, body, jnp.zeros_like(qkv)), None


_dense_attention.defvjp(_dense_attention_fwd, _dense_attention_bwd)


# The Pallas TPU kernel's tiles: 512 tokens (as MaxText's defaults) where the
# sequence is that long, else its smallest, 128.
_PALLAS_BLOCK, _PALLAS_MIN_BLOCK = 512, 128


def pallas_flash(q, k, v, key_valid=None, *, mesh: jax.sharding.Mesh | None = None):
  """The Pallas TPU flash-attention kernel on (B, T, H, D) arrays.

  A Mosaic kernel cannot be partitioned by XLA, so on a mesh of several devices
  it runs under `shard_map`: batch over data x fsdp (where they divide it),
  heads over tensor, or where the heads do not divide tensor, the queries over
  tensor against every key. Tokens are padded to the kernel's tiles (padded keys
  are hidden), so any token count works.
  """
  b, t, h, _ = q.shape
  valid = jnp.ones((b, t), bool) if key_valid is None else key_valid.astype(bool)
  block = _PALLAS_BLOCK if t >= _PALLAS_BLOCK else _PALLAS_MIN_BLOCK
  if mesh is None or mesh.size == 1:
    return _pad_tokens(_pallas_local, q, k, v, valid, block)
  batch_axes = tuple(a for a in sharding.BATCH_AXES if mesh.shape.get(a, 1) > 1)
  if b % max(int(np.prod([mesh.shape[a] for a in batch_axes])), 1):
    batch_axes = ()  # e.g. one window to encode on a data-parallel mesh
  batch_spec = batch_axes or None
  tensor = mesh.shape.get("tensor", 1)
  if tensor == 1 or h % tensor == 0:
    q_spec = kv_spec = P(batch_spec, None, "tensor" if tensor > 1 else None, None)
    multiple = block
  else:
    q_spec, kv_spec = P(batch_spec, "tensor", None, None), P(batch_spec, None, None, None)
    multiple = block * tensor  # each query shard a whole number of tiles
  local = jax.shard_map(_pallas_local, mesh=mesh,
                        in_specs=(q_spec, kv_spec, kv_spec, P(batch_spec, None)),
                        out_specs=q_spec, check_vma=False)
  return _pad_tokens(local, q, k, v, valid, multiple)


def _pad_tokens(fn, q, k, v, valid, multiple: int):
  """fn on q, k, v, valid padded to a multiple of `multiple` tokens (padded keys
  hidden), its output cut back."""
  t = q.shape[1]
  pad = -t % multiple
  q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
  return fn(q, k, v, jnp.pad(valid, ((0, 0), (0, pad))))[:, :t]


def _pallas_local(q, k, v, valid):
  """The kernel on one device's (b, tq, h, D) queries and (b, tk, h, D) keys; the
  key mask becomes segment ids (queries in segment 1, hidden keys in 0)."""
  from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash  # TPU only
  block = min(_PALLAS_BLOCK, q.shape[1], k.shape[1])
  sizes = tpu_flash.BlockSizes(
      block_q=block, block_k_major=block, block_k=block, block_b=1,
      block_q_major_dkv=block, block_k_major_dkv=block, block_k_dkv=block, block_q_dkv=block,
      block_k_major_dq=block, block_k_dq=block, block_q_dq=block)
  segments = tpu_flash.SegmentIds(q=jnp.ones(q.shape[:2], jnp.int32),
                                  kv=valid.astype(jnp.int32))
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)
  y = tpu_flash.flash_attention(heads_first(q), heads_first(k), heads_first(v),
                                segment_ids=segments, sm_scale=1.0 / math.sqrt(q.shape[-1]),
                                block_sizes=sizes)
  return heads_first(y)


# --- chunked: blockwise online softmax, flash-style backward -----------------


def chunked(q, k, v, key_valid=None, *, block: int = 512, pack: bool = False):
  """Attention in (block x block) tiles; equals `reference` in values and gradients.

  Neither pass holds more than one tile of logits per query block; the backward
  pass recomputes them from q, k and the saved row statistics. Tokens are padded
  up to a multiple of the block (padded keys get probability 0). `pack`: the
  loops slice bfloat16 blocks as their bits (a CPU-only path, see platforms).
  """
  if block < 1:
    raise errors.InputError(f"model.attention_block must be positive, got {block}")
  b, t, _, _ = q.shape
  block = min(block, t)
  pad = -t % block
  valid = jnp.ones((b, t), bool) if key_valid is None else key_valid.astype(bool)
  # Added to the logits: 0 for a key, -1e30 for a hidden one (as the reference:
  # s - 1e30 rounds to -1e30), -inf for padding (probability 0 even in a row
  # that hides every key).
  key_bias = jnp.pad(jnp.where(valid, 0.0, _MASKED), ((0, 0), (0, pad)),
                     constant_values=-jnp.inf)
  q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
  return _chunked(q, k, v, key_bias, block, pack)[:, :t]


def _blocks(x, block):
  """(B, T, ...) -> (T / block, B, block, ...): the scan runs over the first axis."""
  return jnp.moveaxis(x.reshape(x.shape[0], -1, block, *x.shape[2:]), 1, 0)


def _unblocks(x):
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape(x.shape[0], -1, *x.shape[3:])


def _tile_logits(q_blk, k_blk, bias_blk):
  """(B, bq, H, D) x (B, bk, H, D) -> (B, H, bq, bk) float32 scaled, masked logits."""
  scale = 1.0 / math.sqrt(q_blk.shape[-1])
  s = _dot("bqhd,bkhd->bhqk", q_blk, k_blk)
  return s * scale + bias_blk[:, None, None, :]


def _forward(q, k, v, key_bias, block, pack):
  """(output (B, T, H, D), row statistics (T / block, 2, B, H, block) float32: the
  running max m and the sum l of exp(logit - m), so that p = exp(logit - m) / l.

  (Not the log-sum-exp m + log l: for a row hiding every key, m = -1e30 swallows
  log l in float32.)
  """
  dtype = q.dtype
  keys = (_packed_blocks(k, block, pack), _packed_blocks(v, block, pack),
          _blocks(key_bias, block))

  def one_query_block(q_blk):
    q_blk = scan_slices.unpacked(q_blk, dtype)
    b, bq, h, d = q_blk.shape

    def over_keys(carry, kv):
      m, l, acc = carry
      k_blk, v_blk, b_blk = kv
      k_blk, v_blk = scan_slices.unpacked(k_blk, dtype), scan_slices.unpacked(v_blk, dtype)
      s = _tile_logits(q_blk, k_blk, b_blk)
      m_new = jnp.maximum(m, s.max(-1))
      p = jnp.exp(s - m_new[..., None])
      rescale = jnp.exp(m - m_new)
      l = l * rescale + p.sum(-1)
      acc = acc * rescale[..., None] + _dot(
          "bhqk,bkhd->bhqd", p.astype(v_blk.dtype), v_blk)
      return (m_new, l, acc), None

    init = (jnp.full((b, h, bq), -jnp.inf, jnp.float32), jnp.zeros((b, h, bq), jnp.float32),
            jnp.zeros((b, h, bq, d), jnp.float32))
    (m, l, acc), _ = jax.lax.scan(over_keys, init, keys)
    out = jnp.einsum("bhqd->bqhd", acc / l[..., None]).astype(dtype)
    return out, jnp.stack([m, l])

  # stats (nq, 2, B, H, bq)
  out, stats = jax.lax.map(one_query_block, _packed_blocks(q, block, pack))
  return _unblocks(out), stats


def _packed_blocks(x, block, pack: bool):
  """`_blocks` of x for a scan to slice; with `pack`, bfloat16 as its bits (see scan_slices)."""
  return scan_slices.packed(_blocks(x, block)) if pack else _blocks(x, block)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _chunked(q, k, v, key_bias, block, pack):
  return _forward(q, k, v, key_bias, block, pack)[0]


def _chunked_fwd(q, k, v, key_bias, block, pack):
  out, stats = _forward(q, k, v, key_bias, block, pack)
  return out, (q, k, v, key_bias, out, stats)


def _chunked_bwd(block, pack, residuals, d_out):
  """FlashAttention-2's backward: per key block, a scan over query blocks
  accumulates dK, dV and adds each query block's dQ share in place."""
  q, k, v, key_bias, out, stats = residuals
  dtype = q.dtype
  scale = 1.0 / math.sqrt(q.shape[-1])
  # delta_i = sum_d dO_i * O_i: the softmax Jacobian's row term.
  delta = jnp.einsum("bqhd,bqhd->bhq", d_out, out, preferred_element_type=jnp.float32)
  delta_blocks = jnp.moveaxis(delta.reshape(*delta.shape[:2], -1, block), 2, 0)
  queries = (jnp.arange(stats.shape[0]), _packed_blocks(q, block, pack),
             _packed_blocks(d_out.astype(dtype), block, pack), stats, delta_blocks)

  def one_key_block(dq, kv):
    k_blk, v_blk, b_blk = kv
    k_blk, v_blk = scan_slices.unpacked(k_blk, dtype), scan_slices.unpacked(v_blk, dtype)

    def over_queries(carry, qs):
      dk, dv, dq = carry
      i, q_blk, do_blk, stats_blk, delta_blk = qs
      q_blk, do_blk = scan_slices.unpacked(q_blk, dtype), scan_slices.unpacked(do_blk, dtype)
      m, l = stats_blk[0][..., None], stats_blk[1][..., None]
      p = jnp.exp(_tile_logits(q_blk, k_blk, b_blk) - m) / l  # (B, H, bq, bk)
      dv = dv + _dot("bhqk,bqhd->bkhd", p.astype(dtype), do_blk)
      dp = _dot("bqhd,bkhd->bhqk", do_blk, v_blk)
      ds = p * (dp - delta_blk[..., None]) * scale
      # Hidden keys' logits are constants: no gradient reaches q or k through them.
      ds = jnp.where(b_blk[:, None, None, :] == 0, ds, 0.0).astype(dtype)
      dk = dk + _dot("bhqk,bqhd->bkhd", ds, q_blk)
      dq = dq.at[i].add(_dot("bhqk,bkhd->bqhd", ds, k_blk))  # in place, no stack of shares
      return (dk, dv, dq), None

    zeros = jnp.zeros(k_blk.shape, jnp.float32)
    (dk, dv, dq), _ = jax.lax.scan(over_queries, (zeros, zeros, dq), queries)
    return dq, (dk.astype(k.dtype), dv.astype(v.dtype))

  dq0 = jnp.zeros((stats.shape[0],) + q.shape[:1] + (block,) + q.shape[2:], jnp.float32)
  keys = (_packed_blocks(k, block, pack), _packed_blocks(v, block, pack),
          _blocks(key_bias, block))
  dq, (dk, dv) = jax.lax.scan(one_key_block, dq0, keys)
  return _unblocks(dq).astype(dtype), _unblocks(dk), _unblocks(dv), None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)
