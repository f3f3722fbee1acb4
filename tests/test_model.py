"""The 4D masked autoencoder: shapes, gradients, the masked loss, options."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import load_config
from roi_mae_jax import masking
from roi_mae_jax import model as model_lib
from roi_mae_jax import patches as patches_lib
from roi_mae_jax import tokens as tokens_lib


@pytest.fixture(scope="module")
def setting():
  config = load_config("pretrain_aal3", "test")
  patch_map = patches_lib.patch_map_from_config(config)
  spec = model_lib.spec_from_config(config, patch_map)
  sampler = masking.sampler_from_config(config, patch_map)
  return config, patch_map, spec, sampler


def _model(spec, **overrides):
  cfg = model_lib.model_config("tiny")
  cfg.update(overrides)
  return model_lib.MaskedAutoencoder(spec, cfg, rngs=nnx.Rngs(0))


def _windows(spec, batch=2, seed=1):
  return jax.random.normal(jax.random.key(seed), (batch,) + spec.window_shape)


def test_patchify_round_trip_keeps_brain_patches_only(setting):
  _, patch_map, spec, _ = setting
  windows = _windows(spec)
  tok = spec.patchify(windows)
  assert tok.shape == (2, spec.num_tokens, spec.token_dim)
  back = np.asarray(spec.unpatchify(tok))
  brain = patch_map.to_volume(np.ones(spec.num_patches, bool), fill=False)
  np.testing.assert_array_equal(back[:, brain], np.asarray(windows)[:, brain])
  assert np.all(back[:, ~brain] == 0)
  # Token t * P + p is patch p in time chunk t: its first voxel is the patch corner.
  p, pt = spec.patch_size, spec.patch_frames
  origin = patch_map.patch_origin_voxels(spec.brain_patches[3:4])[0]
  t = 1
  expected = np.asarray(windows)[0, origin[0], origin[1], origin[2], t * pt]
  assert np.asarray(tok)[0, t * spec.num_patches + 3, 0] == expected


def test_forward_shapes_and_finite_gradients(setting):
  _, _, spec, sampler = setting
  model = _model(spec)
  masks = sampler.sample_batch(jax.random.key(0), 2)
  out = model(_windows(spec), masks)
  assert out["tokens"].shape == (2, spec.num_tokens, spec.token_dim)
  assert out["encoded"].shape == (2, sampler.num_keep, 64)
  assert out["prediction"].shape == (2, spec.num_tokens, spec.token_dim)
  assert out["mask"].shape == (2, spec.num_tokens)
  graphdef, params = nnx.split(model, nnx.Param)
  grads = jax.grad(lambda p: nnx.merge(graphdef, p)(_windows(spec), masks)["loss"])(params)
  norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
  assert all(np.isfinite(norms)) and sum(n > 0 for n in norms) > 0.9 * len(norms)


def test_loss_counts_masked_tokens_only(setting):
  _, _, spec, sampler = setting
  masks = sampler.sample_batch(jax.random.key(3), 2)
  prediction = jax.random.normal(jax.random.key(4), (2, spec.num_tokens, spec.token_dim))
  target = jax.random.normal(jax.random.key(5), prediction.shape)
  loss = model_lib.masked_mse(prediction, target, masks.mask)
  visible = ~masks.mask[..., None]
  changed_visible = jnp.where(visible, target + 100.0, target)
  assert model_lib.masked_mse(prediction, changed_visible, masks.mask) == loss
  changed_masked = jnp.where(visible, target, target + 1.0)
  assert model_lib.masked_mse(prediction, changed_masked, masks.mask) > loss + 0.5
  manual = np.mean(((np.asarray(prediction) - np.asarray(target)) ** 2).mean(-1)[np.asarray(masks.mask)])
  np.testing.assert_allclose(float(loss), manual, rtol=1e-5)


def test_encoder_sees_only_visible_tokens(setting):
  _, _, spec, sampler = setting
  model = _model(spec)
  masks = sampler.sample_batch(jax.random.key(6), 1)
  windows = _windows(spec, batch=1)
  tok = spec.patchify(windows)
  hidden = jnp.where(masks.mask[..., None], 50.0, tok)  # change masked voxels only
  changed = spec.unpatchify(hidden)
  a = model(windows, masks)["encoded"]
  b = model(changed, masks)["encoded"]
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_options_bf16_norm_target_learned_positions_no_regions(setting):
  _, _, spec, sampler = setting
  masks = sampler.sample_batch(jax.random.key(0), 2)
  base = _model(spec)
  n_base = sum(x.size for x in jax.tree.leaves(nnx.state(base, nnx.Param)))
  variant = _model(spec, dtype="bfloat16", norm_target=True, pos_embedding="learned",
                   region_embedding=False)
  out = variant(_windows(spec), masks)
  assert np.isfinite(float(out["loss"]))
  params = nnx.state(variant, nnx.Param)
  assert {np.dtype(x.dtype) for x in jax.tree.leaves(params)} == {np.dtype(np.float32)}
  assert out["encoded"].dtype == jnp.float32  # layer norm output stays float32
  n_variant = sum(x.size for x in jax.tree.leaves(params))
  width, d_width = model_lib.SIZES["tiny"][0], model_lib.SIZES["tiny"][3]
  learned = (spec.num_patches + spec.num_time) * (width + d_width)
  regions = (spec.num_regions + 1) * width
  assert n_variant == n_base + learned - regions


def test_bad_model_settings_are_input_errors(setting):
  _, _, spec, _ = setting
  with pytest.raises(ValueError, match="model.size"):
    _model(spec, size="huge")
  with pytest.raises(ValueError, match="pos_embedding"):
    _model(spec, pos_embedding="rope")


def test_sincos_codes_are_distinct_per_patch(setting):
  _, _, spec, _ = setting
  coords = tokens_lib.patch_coordinates(spec.brain_patches, spec.patch_grid)
  codes = tokens_lib.sincos_3d(coords, 64)
  assert codes.shape == (spec.num_patches, 64)
  assert len(np.unique(codes.round(5), axis=0)) == spec.num_patches


def test_cpu_einsum_attention_matches_dot_product_attention():
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 37, 3, 16)) for i in range(3))
  np.testing.assert_allclose(np.asarray(model_lib._einsum_attention(q, k, v)),
                             np.asarray(jax.nn.dot_product_attention(q, k, v)), atol=2e-6)
