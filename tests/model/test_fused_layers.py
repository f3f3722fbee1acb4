"""fused_layers: same values and gradients as plain autodiff, less memory kept."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from roi_mae_jax.model import mae as model_lib
from roi_mae_jax.model.cpu import fused_layers
from roi_mae_jax.training import train_step

DEPTH, TOKENS, WIDTH, HIDDEN = 8, 1024, 64, 256


def _params(key, with_bias=True):
  keys = jax.random.split(key, 4 * DEPTH)
  layers = []
  for i in range(DEPTH):
    layers.append({
        "scale": 1.0 + 0.1 * jax.random.normal(keys[4 * i], (WIDTH,)),
        "shift": 0.1 * jax.random.normal(keys[4 * i + 1], (WIDTH,)),
        "up": jax.random.normal(keys[4 * i + 2], (WIDTH, HIDDEN)) / 8,
        "up_bias": jnp.full((HIDDEN,), 0.01) if with_bias else None,
        "down": jax.random.normal(keys[4 * i + 3], (HIDDEN, WIDTH)) / 16,
        "down_bias": jnp.full((WIDTH,), -0.01) if with_bias else None})
  return layers


def _fused_mlps(layers, x, dtype=jnp.float32):
  for p in layers:
    h = fused_layers.norm_dense(x, p["scale"], p["shift"], p["up"], p["up_bias"], dtype)
    x = x + fused_layers.gelu_dense(h, p["down"], p["down_bias"], dtype).astype(x.dtype)
  return jnp.sum(x.astype(jnp.float32) ** 2)


def _plain_mlps(layers, x, dtype=jnp.float32):
  def dense(a, w, b):
    out = a.astype(dtype) @ w.astype(dtype)
    return out if b is None else out + b.astype(dtype)
  for p in layers:
    h = dense(fused_layers.layer_norm(x, p["scale"], p["shift"]).astype(dtype), p["up"],
              p["up_bias"])
    x = x + dense(jax.nn.gelu(h), p["down"], p["down_bias"]).astype(x.dtype)
  return jnp.sum(x.astype(jnp.float32) ** 2)


@pytest.mark.parametrize("with_bias", [True, False])
def test_values_and_gradients_equal_plain_autodiff(with_bias):
  layers = _params(jax.random.key(0), with_bias)
  x = jax.random.normal(jax.random.key(1), (2, 37, WIDTH))
  want_loss, want = jax.jit(jax.value_and_grad(_plain_mlps, (0, 1)))(layers, x)
  got_loss, got = jax.jit(jax.value_and_grad(_fused_mlps, (0, 1)))(layers, x)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5 * float(jnp.max(jnp.abs(w))))


def test_layer_norm_matches_the_models_flax_layer_norm():
  from flax import nnx
  with nnx.use_eager_sharding(False):  # no mesh: parameters unplaced
    norm = model_lib._layer_norm(nnx.Rngs(0), WIDTH)
  assert norm.epsilon == fused_layers.LAYER_NORM_EPSILON
  norm.scale[...] = jnp.linspace(0.5, 1.5, WIDTH)
  norm.bias[...] = jnp.linspace(-0.2, 0.2, WIDTH)
  for spread in (1.0, 0.01):  # small variance: the epsilon shows
    x = 3.0 + spread * jax.random.normal(jax.random.key(2), (5, WIDTH))
    np.testing.assert_allclose(fused_layers.layer_norm(x, norm.scale[...], norm.bias[...]),
                               norm(x), rtol=1e-6, atol=1e-6)


def test_bfloat16_gradients_near_plain_autodiff():
  layers = _params(jax.random.key(3))
  x = jax.random.normal(jax.random.key(4), (2, 16, WIDTH)).astype(jnp.bfloat16)
  want = jax.jit(jax.grad(lambda p, x: _plain_mlps(p, x, jnp.bfloat16)))(layers, x)
  got = jax.jit(jax.grad(lambda p, x: _fused_mlps(p, x, jnp.bfloat16)))(layers, x)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.dtype == w.dtype
    scale = float(jnp.max(jnp.abs(w))) + 1e-6
    assert float(jnp.max(jnp.abs(g - w))) / scale < 0.05


@pytest.mark.parametrize("scheduler", ["default", "memory"])
def test_backward_keeps_about_half_the_memory(scheduler):
  """The recomputed layer norm and GELU are not kept; without the ordering in
  the backward pass XLA holds every layer's recomputed arrays at once and the
  saving is gone (measured: 30 vs 55-65 MiB of temporaries)."""
  layers = _params(jax.random.key(5))
  x = jnp.zeros((2, TOKENS, WIDTH))
  options = None
  if scheduler == "memory":
    cpu_mesh = jax.sharding.Mesh(np.array(jax.devices("cpu")[:1]), ("data",))
    options = train_step.compiler_options(cpu_mesh)

  def temps(loss):
    compiled = jax.jit(jax.grad(loss, (0, 1)), compiler_options=options).lower(layers, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes
  assert temps(_fused_mlps) < 0.6 * temps(_plain_mlps)


def test_nan_cotangent_gives_nan_gradients():
  """The ordering in backward selects on the cotangent's maximum; a NaN there
  must still come out as NaN gradients, not as zeros."""
  p = _params(jax.random.key(6))[0]
  x = jax.random.normal(jax.random.key(7), (1, 4, WIDTH))

  def loss(p, x):
    h = fused_layers.norm_dense(x, p["scale"], p["shift"], p["up"], p["up_bias"], jnp.float32)
    y = fused_layers.gelu_dense(h, p["down"], p["down_bias"], jnp.float32)
    return jnp.sum(y) * jnp.nan
  grads = jax.grad(loss, (0, 1))(p, x)
  assert all(bool(jnp.all(jnp.isnan(g))) for g in jax.tree.leaves(grads))


def test_matmul_gradients_equal_autodiff():
  x = jax.random.normal(jax.random.key(0), (2, 30, 48))
  w = jax.random.normal(jax.random.key(1), (48, 40)) / 7
  g = jax.random.normal(jax.random.key(2), (2, 30, 40))
  got = jax.grad(lambda x, w: jnp.sum(fused_layers.matmul(x, w) * g), (0, 1))(x, w)
  want = jax.grad(lambda x, w: jnp.sum((x @ w) * g), (0, 1))(x, w)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_matmul_gradients_follow_autodiff_in_bfloat16():
  """The bfloat16 weight gradient (its own contraction form) stays within bfloat16's
  rounding of float32 autodiff."""
  x = jax.random.normal(jax.random.key(3), (2, 30, 48))
  w = jax.random.normal(jax.random.key(4), (48, 40)) / 7
  g = jax.random.normal(jax.random.key(5), (2, 30, 40))
  low = lambda a: a.astype(jnp.bfloat16)
  got = jax.grad(lambda x, w: jnp.sum(fused_layers.matmul(x, w).astype(jnp.float32) * g),
                 (0, 1))(low(x), low(w))
  want = jax.grad(lambda x, w: jnp.sum((x @ w) * g), (0, 1))(
      low(x).astype(jnp.float32), low(w).astype(jnp.float32))
  for a, b in zip(got, want):
    assert a.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=0.02,
                               atol=0.02 * float(jnp.abs(b).max()))
