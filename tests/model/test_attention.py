"""Attention kernels: chunked equals the reference; the choice of kernel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from roi_mae_jax import errors
from roi_mae_jax.devices import platforms
from roi_mae_jax.devices import sharding
from roi_mae_jax.model import attention


def _qkv(tokens, seed=0, batch=2, heads=3, head_dim=8, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(seed), 4)
  q, k, v = (jax.random.normal(key, (batch, tokens, heads, head_dim), dtype) for key in keys[:3])
  cotangent = jax.random.normal(keys[3], (batch, tokens, heads, head_dim), jnp.float32)
  return q, k, v, cotangent


def _key_valid(tokens, seed=1, hide_all_in_row=True):
  valid = jax.random.bernoulli(jax.random.key(seed), 0.6, (2, tokens))
  if hide_all_in_row:  # a sample that hides every key: the reference then averages all
    valid = valid.at[1].set(False)
  return valid


@pytest.mark.parametrize("tokens,block,masked", [
    (37, 8, False),    # 37 = 4 x 8 + 5: the last tile is mostly padding
    (37, 8, True),
    (50, 16, True),
    (20, 512, True),   # one tile bigger than the sequence
    (48, 16, False),   # blocks divide the tokens
])
def test_chunked_equals_reference_in_values_and_gradients(tokens, block, masked):
  q, k, v, cotangent = _qkv(tokens, seed=tokens + block)
  valid = _key_valid(tokens) if masked else None

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v, valid) * cotangent)

  chunked = lambda q, k, v, m: attention.chunked(q, k, v, m, block=block)
  np.testing.assert_allclose(chunked(q, k, v, valid), attention.reference(q, k, v, valid),
                             atol=1e-5, rtol=0)
  want = jax.grad(loss(attention.reference), argnums=(0, 1, 2))(q, k, v)
  got = jax.jit(jax.grad(loss(chunked), argnums=(0, 1, 2)))(q, k, v)
  for name, g, w in zip("qkv", got, want):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=0, err_msg=f"d{name}")


@pytest.mark.parametrize("masked", [False, True])
def test_dense_equals_reference_in_values_and_gradients(masked):
  q, k, v, cotangent = _qkv(29, seed=3)
  valid = _key_valid(29) if masked else None
  loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v, valid) * cotangent)
  np.testing.assert_allclose(attention.dense(q, k, v, valid),
                             attention.reference(q, k, v, valid), atol=1e-5, rtol=0)
  want = jax.grad(loss(attention.reference), argnums=(0, 1, 2))(q, k, v)
  got = jax.grad(loss(attention.dense), argnums=(0, 1, 2))(q, k, v)
  for name, g, w in zip("qkv", got, want):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=0, err_msg=f"d{name}")


@pytest.mark.parametrize("kernel,heads_per_step", [("dense", 1), ("dense", 2), ("chunked", 0)])
def test_attend_packed_reads_heads_from_the_fused_projection(kernel, heads_per_step):
  """(B, T, 3, H, D) in, as the model's q/k/v projection lays it out: the same
  values and gradients as the reference on q, k, v sliced out of it, with one
  or several heads per step of the dense kernel's loop."""
  q, k, v, cotangent = _qkv(23, seed=5, heads=4)
  qkv = jnp.stack([q, k, v], axis=2)
  valid = _key_valid(23)
  if kernel == "dense":
    attend = lambda x: attention.dense_packed(x, valid, heads_per_step)
  else:
    attend = lambda x: attention.attend_packed(x, valid, implementation=kernel, block=8)
  packed = lambda x: jnp.sum(attend(x) * cotangent)
  unpacked = lambda x: jnp.sum(attention.reference(x[:, :, 0], x[:, :, 1], x[:, :, 2], valid)
                               * cotangent)
  np.testing.assert_allclose(packed(qkv), unpacked(qkv), rtol=1e-5)
  np.testing.assert_allclose(jax.grad(packed)(qkv), jax.grad(unpacked)(qkv), atol=1e-5, rtol=0)


@pytest.mark.parametrize("heads,tokens", [(6, 654), (4, 1310), (3, 29), (5, 7)])
def test_dense_head_groups_divide_the_heads_and_keep_the_values(heads, tokens):
  per_step = attention.heads_per_step_for(heads, tokens)
  assert 1 <= per_step <= heads and heads % per_step == 0
  qkv = jax.random.normal(jax.random.key(heads), (1, min(tokens, 40), 3, heads, 4))
  np.testing.assert_allclose(attention.dense_packed(qkv, None, heads_per_step=per_step),
                             attention.dense_packed(qkv, None, heads_per_step=1),
                             atol=1e-5, rtol=0)
  with pytest.raises(errors.InputError, match="do not divide"):
    attention.dense_packed(jnp.zeros((1, 5, 3, 3, 4)), None, heads_per_step=2)


def test_chunked_bfloat16_stays_close_to_float32():
  q, k, v, _ = _qkv(40)
  valid = _key_valid(40, hide_all_in_row=False)
  want = attention.reference(q, k, v, valid)
  half = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  got = attention.chunked(*half, valid, block=16)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=5e-2)


@pytest.mark.parametrize("kernel", ["dense", "chunked"])
def test_bfloat16_gradients_run_at_a_demo_size(kernel):
  # XLA's CPU runtime has no bfloat16 x bfloat16 -> float32 matmul at this size.
  q, k, v, _ = _qkv(656, batch=2, heads=6, head_dim=64, dtype=jnp.bfloat16)
  fn = lambda q: attention.attend(q, k, v, implementation=kernel, block=256)
  grad = jax.jit(jax.grad(lambda q: fn(q).astype(jnp.float32).sum()))(q)
  assert grad.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(grad)))


def test_reference_equals_jax_dot_product_attention_with_a_key_mask():
  q, k, v, _ = _qkv(12)
  valid = _key_valid(12, hide_all_in_row=False)
  want = jax.nn.dot_product_attention(q, k, v, mask=valid[:, None, None, :])
  np.testing.assert_allclose(attention.reference(q, k, v, valid), want, atol=2e-6)
  np.testing.assert_allclose(attention.attend(q, k, v, valid, implementation="xla"), want,
                             atol=2e-6)


def test_auto_chooses_by_platform_dtype_and_size():
  f32, bf16 = jnp.float32, jnp.bfloat16
  assert attention.choose("auto", "cpu", f32, 2, 1200, 6) == "dense"
  assert attention.choose("auto", "cpu", bf16, 1, 28480, 8) == "chunked"
  assert attention.choose("auto", "gpu", bf16, 1, 28480, 8) == "cudnn"
  assert attention.choose("auto", "gpu", f32, 1, 28480, 8) == "chunked"
  assert attention.choose("auto", "gpu", f32, 2, 1200, 6) == "xla"  # no CPU loop on a GPU
  for tokens in (28416, 29100, 14550, 100):  # any token count: the kernel pads
    assert attention.choose("auto", "tpu", bf16, 1, tokens, 8) == "pallas"
    assert attention.choose("auto", "tpu", f32, 1, tokens, 8) == "pallas"
  assert attention.choose("chunked", "gpu", bf16, 1, 64, 8) == "chunked"


def test_auto_follows_the_target_not_the_host():
  """A CPU host compiling for a TPU mesh picks the TPU's kernel."""
  q, k, v, _ = _qkv(8)
  tpu = platforms.Target("tpu", None, cpu_paths=False)
  picked = []
  original = attention.pallas_flash
  attention.pallas_flash = lambda *a, **kw: picked.append("pallas") or q
  try:
    attention.attend(q, k, v, target=tpu)
  finally:
    attention.pallas_flash = original
  assert picked == ["pallas"]


@pytest.mark.parametrize("heads,tensor", [(4, 2), (6, 4)])  # heads split; queries split
def test_pallas_runs_under_shard_map_on_a_mesh(monkeypatch, heads, tensor):
  """The Pallas kernel's shard_map on an 8-device mesh, the kernel replaced by the
  reference (the TPU kernel cannot run here): the sharding of batch, heads or
  queries and the token padding give the reference's values and gradients."""
  monkeypatch.setattr(attention, "_PALLAS_MIN_BLOCK", 16)
  monkeypatch.setattr(attention, "_pallas_local", attention.reference)
  mesh = jax.make_mesh((8 // tensor, 1, tensor), sharding.AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  q, k, v, cotangent = _qkv(37, seed=3, batch=4, heads=heads)
  valid = jax.random.bernoulli(jax.random.key(2), 0.7, (4, 37))

  def loss(fn):
    return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v) * cotangent),
                                      argnums=(0, 1, 2)))
  got = loss(lambda q, k, v: attention.pallas_flash(q, k, v, valid, mesh=mesh))(q, k, v)
  want = loss(lambda q, k, v: attention.reference(q, k, v, valid))(q, k, v)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-5)


def test_bad_or_unavailable_kernels_are_input_errors():
  q, k, v, _ = _qkv(8)
  if jax.default_backend() == "cpu":
    with pytest.raises(errors.InputError, match="needs a GPU"):
      attention.attend(q, k, v, implementation="cudnn")
    with pytest.raises(errors.InputError, match="needs a TPU"):
      attention.attend(q, k, v, implementation="pallas")
  with pytest.raises(errors.InputError, match="positive"):
    attention.chunked(q, k, v, block=0)
