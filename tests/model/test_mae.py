"""The 4D masked autoencoder: shapes, gradients, the masked loss, options."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import load_config
from roi_mae_jax import errors
from roi_mae_jax.brain import tokens as tokens_lib
from roi_mae_jax.devices import platforms
from roi_mae_jax.model import mae as model_lib
from roi_mae_jax.model import targets
from roi_mae_jax.model.cpu import fused_layers
from roi_mae_jax.training import build


@pytest.fixture(scope="module")
def setting():
  config = load_config("pretrain_aal3", "test")
  parts = build.parts(config)
  return config, parts.patch_map, parts.spec, parts.sampler


def _model(spec, target=None, **overrides):
  cfg = model_lib.model_config("tiny")
  cfg.update(overrides)
  return model_lib.MaskedAutoencoder(spec, cfg, rngs=nnx.Rngs(0), target=target)


def _compiled(model, masks):
  """windows -> model(windows, masks), one compiled program (op-by-op it takes seconds)."""
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda s, w: nnx.merge(graphdef, s)(w, masks))
  return lambda windows: forward(state, windows)


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
  pt = spec.patch_frames
  origin = patch_map.patch_origin_voxels(spec.brain_patches[3:4])[0]
  t = 1
  expected = np.asarray(windows)[0, origin[0], origin[1], origin[2], t * pt]
  assert np.asarray(tok)[0, t * spec.num_patches + 3, 0] == expected


def test_forward_shapes_and_finite_gradients(setting):
  _, _, spec, sampler = setting
  model = _model(spec)
  masks = sampler.sample_batch(jax.random.key(0), 2)
  graphdef, params = nnx.split(model, nnx.Param)

  @jax.jit  # one compiled program: op-by-op dispatch of the backward pass takes seconds
  def forward_and_grads(p):
    def loss(p):
      out = nnx.merge(graphdef, p)(_windows(spec), masks)
      return out["loss"], out
    return jax.grad(loss, has_aux=True)(p)

  grads, out = forward_and_grads(params)
  assert out["tokens"].shape == (2, spec.num_tokens, spec.token_dim)
  assert out["encoded"].shape == (2, sampler.num_keep, 64)
  assert out["prediction"].shape == (2, spec.num_tokens, spec.token_dim)
  assert out["mask"].shape == (2, spec.num_tokens)
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
  forward = _compiled(model, masks)
  a = forward(windows)["encoded"]
  b = forward(changed)["encoded"]
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_options_bf16_norm_target_learned_positions_no_regions(setting):
  _, _, spec, sampler = setting
  masks = sampler.sample_batch(jax.random.key(0), 2)
  base = _model(spec)
  n_base = sum(x.size for x in jax.tree.leaves(nnx.state(base, nnx.Param)))
  variant = _model(spec, dtype="bfloat16", norm_target=True, pos_embedding="learned",
                   region_embedding=False)
  out = _compiled(variant, masks)(_windows(spec))
  assert np.isfinite(float(out["loss"]))
  params = nnx.state(variant, nnx.Param)
  assert {np.dtype(x.dtype) for x in jax.tree.leaves(params)} == {np.dtype(np.float32)}
  assert out["encoded"].dtype == jnp.float32  # layer norm output stays float32
  n_variant = sum(x.size for x in jax.tree.leaves(params))
  tiny = model_lib.SIZES["tiny"]
  learned = (spec.num_patches + spec.num_time) * (tiny.width + tiny.decoder_width)
  regions = (spec.num_regions + 1) * tiny.width
  assert n_variant == n_base + learned - regions


def test_the_model_checks_its_block(setting):  # the rules: tests/config/test_validation.py
  _, _, spec, _ = setting
  with pytest.raises(ValueError, match="model.size must be one of"):
    _model(spec, size="huge")


def test_sincos_codes_are_distinct_per_patch(setting):
  _, _, spec, _ = setting
  coords = tokens_lib.patch_coordinates(spec.brain_patches, spec.patch_grid)
  codes = tokens_lib.sincos_3d(coords, 64)
  assert codes.shape == (spec.num_patches, 64)
  assert len(np.unique(codes.round(5), axis=0)) == spec.num_patches


def test_attention_output_projection_fan_in_is_heads_times_head_dim(setting):
  _, _, spec, _ = setting
  model = _model(spec, size="small")
  heads, head_dim, width = model.encoder.blocks[0].attn.out.shape
  assert (heads, head_dim, width) == (6, 64, 384)
  std = float(np.std(np.asarray(model.encoder.blocks[0].attn.out[...])))
  # lecun-normal: std = 1 / sqrt(fan_in) = 0.051 (with fan-in `heads` it was 0.41).
  np.testing.assert_allclose(std, 1 / np.sqrt(heads * head_dim), rtol=0.05)


def _loss_and_grads(spec, sampler, params, target=None, **overrides):
  model = _model(spec, target, **overrides)
  graphdef = nnx.graphdef(model)
  masks = sampler.sample_batch(jax.random.key(7), 2)
  windows = _windows(spec)
  valid = jax.random.bernoulli(jax.random.key(8), 0.8, masks.ids_keep.shape)

  def loss(p):  # the step's loss, plus a region-style key mask through encode
    m = nnx.merge(graphdef, p)
    hidden = m.encode(spec.patchify(windows), masks.ids_keep, valid)
    return m(windows, masks)["loss"] + jnp.mean(hidden ** 2)
  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.fixture(scope="module")
def reference_step(setting):
  _, _, spec, sampler = setting
  params = nnx.to_pure_dict(nnx.state(_model(spec, attention="reference"), nnx.Param))
  return params, _loss_and_grads(spec, sampler, params, attention="reference")


# The accelerator path (plain nnx modules, autodiff, nnx.remat in nnx.scan),
# here compiled for the CPU with the CPU-only paths off.
_STANDARD = platforms.Target("cpu", None, cpu_paths=False)


@pytest.mark.parametrize("overrides", [
    {"remat": "block"}, {"remat": "dots"}, {"remat": "projections"}, {"scan": True},
    {"scan": True, "remat": "block", "mlp_chunk": 40},
    {"attention": "chunked", "attention_block": 48},
    {"target": _STANDARD},
    {"target": _STANDARD, "scan": True, "remat": "block"},
    {"target": _STANDARD, "remat": "projections", "attention": "xla"},
    {"target": _STANDARD, "scan": True, "remat": "dots", "attention": "chunked",
     "attention_block": 48, "mlp_chunk": 40},
])
def test_remat_scan_and_chunked_attention_keep_loss_and_gradients(setting, reference_step,
                                                                  overrides):
  _, _, spec, sampler = setting
  params, (want_loss, want) = reference_step
  scan = overrides.get("scan", False)
  same = model_lib.stack_layers(params) if scan else params
  loss, grads = _loss_and_grads(spec, sampler, same, **overrides)
  if scan:
    tiny = model_lib.SIZES["tiny"]
    depths = {"encoder": tiny.depth, "decoder": tiny.decoder_depth}
    grads = model_lib.unstack_layers(grads, depths)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    w = want
    for key in path:
      w = w[key.key]
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-4, err_msg=jax.tree_util.keystr(path))


def test_scanned_layers_stack_the_parameters_of_each_block(setting):
  _, _, spec, _ = setting
  plain = nnx.to_pure_dict(nnx.state(_model(spec), nnx.Param))
  scanned = nnx.state(_model(spec, scan=True), nnx.Param)
  depth = model_lib.SIZES["tiny"].depth
  assert scanned["encoder"]["blocks"]["up"]["kernel"].shape == (depth, 64, 256)
  spec_names = nnx.get_partition_spec(scanned)["encoder"]["blocks"]["up"]["kernel"].get_value()
  assert tuple(spec_names) == ("layers", "embed", "mlp")
  stacked = model_lib.stack_layers(plain)
  assert jax.tree.structure(stacked) == jax.tree.structure(nnx.to_pure_dict(scanned))
  back = model_lib.unstack_layers(stacked, {"encoder": depth, "decoder": 1})
  assert jax.tree.structure(back) == jax.tree.structure(plain)


def test_bfloat16_matmul_values_and_gradients_follow_float32():
  x = jax.random.normal(jax.random.key(0), (2, 30, 48), jnp.float32)
  w = jax.random.normal(jax.random.key(1), (48, 40), jnp.float32) / 7
  g = jax.random.normal(jax.random.key(2), (2, 30, 40), jnp.float32)
  loss = lambda matmul, x, w: jnp.sum(matmul(x, w).astype(jnp.float32) * g)
  bf16 = lambda a: a.astype(jnp.bfloat16)
  got = jax.grad(lambda x, w: loss(fused_layers.matmul, bf16(x), bf16(w)), (0, 1))(x, w)
  want = jax.grad(lambda x, w: loss(jnp.matmul, x, w), (0, 1))(x, w)
  np.testing.assert_allclose(fused_layers.matmul(bf16(x), bf16(w)).astype(np.float32),
                             x @ w, atol=0.05, rtol=0.02)
  for a, b in zip(got, want):
    assert a.dtype == jnp.float32  # cotangents reach float32 inputs in their dtype
    np.testing.assert_allclose(a, b, atol=0.15, rtol=0.03)


def test_centred_target_is_each_voxels_fluctuation_over_the_window(setting):
  _, _, spec, _ = setting
  windows = _windows(spec) + 5.0
  target = _model(spec, centre_target=True).target(spec.patchify(windows))
  want = spec.patchify(windows - windows.mean(axis=-1, keepdims=True))
  np.testing.assert_allclose(np.asarray(target), np.asarray(want), atol=1e-5)
  np.testing.assert_array_equal(_model(spec).target(spec.patchify(windows)),
                                spec.patchify(windows))


def test_decoder_region_code_tells_a_hidden_slot_its_region(setting):
  _, _, spec, sampler = setting
  masks = sampler.sample_batch(jax.random.key(2), 1)
  windows = _windows(spec, batch=1)
  model = _model(spec, decoder_region_embedding=True)
  assert _model(spec).decoder_region is None
  width = model_lib.SIZES["tiny"].decoder_width
  assert model.decoder_region.shape == (spec.num_regions + 1, width)
  before = np.asarray(_compiled(model, masks)(windows)["prediction"])
  # Change one hidden region's decoder code: only the decoder's output moves.
  hidden_region = int(spec.patch_region[np.asarray(masks.mask[0, :spec.num_patches])][0])
  # A random shift: a constant one would vanish in the decoder's layer norms.
  shift = jax.random.normal(jax.random.key(3), model.decoder_region.shape[1:])
  model.decoder_region[...] = model.decoder_region[...].at[hidden_region + 1].add(shift)
  after = _compiled(model, masks)(windows)
  moved = np.abs(np.asarray(after["prediction"]) - before).max(-1)[0]     # (N,)
  region_of_token = np.tile(spec.patch_region, spec.num_time)
  assert moved[region_of_token == hidden_region].min() > 1e-3
  np.testing.assert_array_equal(np.asarray(after["encoded"]),
                                np.asarray(_compiled(_model(spec, decoder_region_embedding=True),
                                                     masks)(windows)["encoded"]))


def test_patch_target_is_each_tokens_mean_course_and_the_head_predicts_it(setting):
  _, _, spec, sampler = setting
  windows = _windows(spec) + 5.0
  model = _model(spec, centre_target=True, target_pool="patch")
  tokens = spec.patchify(windows)
  target = model.target(tokens)
  by_voxel = np.asarray(targets.fluctuation(tokens, spec)).reshape(
      tokens.shape[:2] + (-1, spec.patch_frames))
  np.testing.assert_allclose(np.asarray(target), by_voxel.mean(2), atol=1e-5)
  masks = sampler.sample_batch(jax.random.key(0), 2)
  out = _compiled(model, masks)(windows)
  assert out["prediction"].shape == tokens.shape[:2] + (spec.patch_frames,)
  assert np.isfinite(float(out["loss"]))
  filled = targets.voxel_values(np.asarray(out["prediction"]), spec)  # for figures
  assert filled.shape == tokens.shape
  np.testing.assert_array_equal(filled.reshape(by_voxel.shape)[:, :, 3],
                                np.asarray(out["prediction"]))
  with pytest.raises(errors.InputError, match="norm_target"):
    _model(spec, target_pool="patch", norm_target=True)
  with pytest.raises(errors.InputError, match="target_pool"):
    _model(spec, target_pool="region")


def test_target_power_is_the_loss_of_predicting_zeros(setting):
  _, _, spec, sampler = setting
  masks = sampler.sample_batch(jax.random.key(4), 2)
  model = _model(spec, centre_target=True)
  out = _compiled(model, masks)(_windows(spec))
  assert 0 < float(out["target_power"]) != pytest.approx(float(out["loss"]))
  model.head.kernel[...] = jnp.zeros_like(model.head.kernel[...])
  model.head.bias[...] = jnp.zeros_like(model.head.bias[...])
  silent = _compiled(model, masks)(_windows(spec))
  assert float(silent["loss"]) == pytest.approx(float(out["target_power"]), rel=1e-5)
