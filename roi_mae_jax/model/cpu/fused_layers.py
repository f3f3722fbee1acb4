"""The model's layers for CPUs (see platforms): layer norm -> dense and GELU ->
dense whose backward recomputes the cheap elementwise half instead of keeping
it, the matmul of every dense layer (float32 or bfloat16), and a scan over
stacked layers that keeps only each layer's input.

Autodiff of a pre-norm block keeps, per block, the layer norm's outputs (the
inputs of the qkv and MLP-up matmuls) and GELU's output (the input of the
MLP-down matmul) besides the tensors they are computed from: a large share of
what a block holds for the backward pass. These two functions keep only the
inputs (the residual stream, the MLP's pre-activation) and recompute layer
norm and GELU in the backward pass, which costs elementwise work only; no
matmul is recomputed.

    h = norm_dense(x, scale, bias, w_up, b_up, dtype=jnp.float32)   # LN(x) @ w + b
    y = gelu_dense(h, w_down, b_down, dtype=jnp.float32)            # gelu(h) @ w + b
    z = matmul(y, w_out)   # any dense layer: its weight gradient in XLA's fastest form
    y = recomputed_layers(apply, stacked_params, x, key_valid)      # remat=block, scanned

The backward pass runs in a fixed order within each call (see
`_recomputing_backward`): XLA drops optimisation barriers before it schedules,
and without the order its scheduler holds every layer's recomputed arrays and
cotangents at once, which costs more memory than the recomputation saves.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from roi_mae_jax.model.cpu import scan_slices

# The model's nnx.LayerNorm modules are built with it too (model._layer_norm),
# so `layer_norm` and their calls give the same numbers.
LAYER_NORM_EPSILON = 1e-6


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
  """nnx.LayerNorm's arithmetic (float32 statistics, fast variance) over the
  last axis: the functional form the custom VJPs below recompute."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  mean_square = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
  var = jnp.maximum(0.0, mean_square - jnp.square(mean))
  return (x - mean) * (jax.lax.rsqrt(var + LAYER_NORM_EPSILON) * scale) + bias


@jax.custom_vjp
def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """x (..., n) @ w (n, m) in x's dtype, accumulated in float32: the model's
  dense layers, float32 or bfloat16 (then rounded to bfloat16, as a bfloat16
  matmul on a GPU or TPU).

  Its backward picks the form of w's gradient that XLA's CPU backend runs
  fastest inside the train step. Autodiff takes g^T x over the leading axes
  and transposes the result, which XLA turns into a transposed copy of the
  cotangent and a slower matmul; for float32, one matmul over the flattened
  tokens is faster, while for bfloat16 that form goes through float32 copies
  and the contraction over the leading axes as they are is faster.
  bfloat16 operands stay bfloat16 with float32 accumulation in every matmul:
  XLA's CPU backend runs those natively (AMX / AVX-512 BF16), where a
  bfloat16-output matmul, or one with a float32 cotangent, goes through
  float32 copies.
  """
  return jnp.matmul(x, w, preferred_element_type=_accumulator(x)).astype(x.dtype)


def _accumulator(x):
  return jnp.promote_types(x.dtype, jnp.float32)  # float32, or float64 where x is


def _matmul_forward(x, w):
  return matmul(x, w), (x, w)


def _matmul_backward(residuals, g):
  x, w = residuals
  g = g.astype(x.dtype)
  dx = jnp.einsum("...m,nm->...n", g, w, preferred_element_type=_accumulator(x))
  if x.dtype == jnp.bfloat16:  # bfloat16 operands as they are (2D: float32 copies)
    dw = jnp.einsum("...n,...m->nm", x, g, preferred_element_type=jnp.float32)
  else:  # tokens flattened (3D: a transposed copy and a slower matmul)
    dw = jnp.einsum("tn,tm->nm", x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]),
                    preferred_element_type=_accumulator(x))
  return dx.astype(x.dtype), dw.astype(w.dtype)


matmul.defvjp(_matmul_forward, _matmul_backward)


def _affine(x, w, b, dtype):
  """x @ w (+ b) in `dtype`; b may be None."""
  out = matmul(x.astype(dtype), w.astype(dtype))
  return out if b is None else out + b.astype(dtype)


def _after(x, signal):
  """x, computed only once all of `signal` exists: a select on the signal's
  maximum (not one element, which XLA would compute from a slice of the
  signal's inputs without waiting for it). A NaN in the signal zeroes x; the
  gradient is NaN then anyway."""
  probe = jnp.max(signal)
  return jnp.where(probe == probe, x, jnp.zeros((), x.dtype))


def _elementwise_affine(pre, x, pre_params, w, b, dtype):
  return _affine(pre(x, *pre_params).astype(dtype), w, b, dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 5))
def _recomputing(pre, x, pre_params, w, b, dtype):
  """pre(x, *pre_params) @ w (+ b), keeping x, not pre(x), for the backward pass."""
  return _elementwise_affine(pre, x, pre_params, w, b, dtype)


def _recomputing_forward(pre, x, pre_params, w, b, dtype):
  return _elementwise_affine(pre, x, pre_params, w, b, dtype), (x, pre_params, w, b)


def _recomputing_backward(pre, dtype, residuals, g):
  # In this order, each step waiting for the last: recompute pre(x) once g
  # exists, take the weight gradients, then hand back x's gradient. Left
  # alone, XLA recomputes every layer's pre(x) at the start of the backward
  # pass and takes the weight gradients at its end, holding every layer's
  # recomputed activations and cotangents at once.
  x, pre_params, w, b = residuals
  a, pull_pre = jax.vjp(lambda x, p: pre(x, *p).astype(dtype), _after(x, g), pre_params)
  _, pull_weights = jax.vjp(lambda w, b: _affine(a, w, b, dtype), w, b)
  dw, db = pull_weights(g)
  _, pull_input = jax.vjp(lambda a: _affine(a, w, b, dtype), a)
  da, = pull_input(g)
  dx, dpre_params = pull_pre(_after(da, dw))
  return dx, dpre_params, dw, db


_recomputing.defvjp(_recomputing_forward, _recomputing_backward)


def norm_dense(x: jax.Array, scale: jax.Array, bias: jax.Array, w: jax.Array,
               b: jax.Array | None, dtype) -> jax.Array:
  """LN(x) @ w (+ b): layer norm in float32, matmul in `dtype`; b may be None.

  x (..., d), scale and bias (d,), w (d, f), b (f,) -> (..., f) in `dtype`.
  Backward keeps x and the parameters, not LN(x).
  """
  return _recomputing(layer_norm, x, (scale, bias), w, b, dtype)


def gelu_dense(h: jax.Array, w: jax.Array, b: jax.Array | None, dtype) -> jax.Array:
  """gelu(h) @ w (+ b) in `dtype` (GELU's tanh form, as jax.nn.gelu); b may be None.

  Backward keeps h and the parameters, not gelu(h).
  """
  return _recomputing(jax.nn.gelu, h, (), w, b, dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def recomputed_layers(apply: Callable, params: Any, x: jax.Array,
                      key_valid: jax.Array | None) -> jax.Array:
  """x through `apply(params[i], x, key_valid)` for each layer i of the stacked
  `params`, as a scan that keeps only each layer's input for the backward pass,
  which recomputes the layer from it (the model's `remat=block` with scanned
  layers). Written out, not jax.checkpoint inside nnx.scan: the saved inputs
  stay in the compute dtype (see `scan_slices`)."""
  return _layers_forward(apply, params, x, key_valid)[0]


def _layers_forward(apply, params, x, key_valid):
  def layer(h, p):
    return apply(p, h, key_valid), scan_slices.packed(h)
  y, saved = jax.lax.scan(layer, x, params)
  return y, (params, saved, key_valid)


def _layers_backward(apply, residuals, dy):
  params, saved, key_valid = residuals

  def layer(g, ps):  # recompute one layer from its input, then pull g back
    p, s = ps
    _, pull = jax.vjp(lambda p, h: apply(p, h, key_valid), p, scan_slices.unpacked(s, dy.dtype))
    dp, dh = pull(g)
    return dh, dp
  dx, dparams = jax.lax.scan(layer, dy, (params, saved), reverse=True)
  return dparams, dx, None


recomputed_layers.defvjp(_layers_forward, _layers_backward)
