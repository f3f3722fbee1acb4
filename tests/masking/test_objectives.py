"""Region-weighted reconstruction loss and adaptive region masking."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import load_config
from roi_mae_jax import errors
from roi_mae_jax.devices import sharding
from roi_mae_jax.masking import objectives
from roi_mae_jax.model import mae as model_lib
from roi_mae_jax.tasks import compare
from roi_mae_jax.training import build
from roi_mae_jax.training import checkpoint as checkpoint_lib
from roi_mae_jax.training import train_step


def _parts(config):
  parts = build.parts(config)
  return parts.patch_map, parts.spec, parts.sampler


def test_loss_weights_follow_each_tokens_region():
  config = load_config("pretrain_aal3", "test")
  patch_map, spec, _ = _parts(config)
  assert objectives.token_loss_weights(config, patch_map, spec.num_time) is None
  config.loss.system_weights.limbic = 3.0
  config.loss.region_weights = "Hippocampus_L=0.5"
  weights = objectives.token_loss_weights(config, patch_map, spec.num_time)
  regions = objectives.token_regions(patch_map, spec.num_time)
  assert weights.shape == (spec.num_tokens,)
  names = [patch_map.regions[r].name for r in regions]
  systems = [patch_map.regions[r].system for r in regions]
  for name, system, w in zip(names, systems, weights):
    assert w == (1.5 if name == "Hippocampus_L" else 3.0 if system == "limbic" else 1.0)
  config.loss.region_weights = "Nowhere_*=2"
  with pytest.raises(errors.InputError, match="loss.region_weights: 'Nowhere_\\*' matches no"):
    objectives.token_loss_weights(config, patch_map, spec.num_time)


def test_weighted_loss_is_the_weighted_mean_of_masked_token_errors():
  error = jnp.array([[1.0, 2.0, 3.0, 4.0]])
  mask = jnp.array([[True, True, False, True]])
  weight = jnp.array([1.0, 3.0, 100.0, 0.0])
  assert float(model_lib.weighted_mean(error, mask, weight)) == pytest.approx((1 + 6) / 4)
  assert float(model_lib.weighted_mean(error, mask)) == pytest.approx(7 / 3)


def test_adaptive_update_tracks_each_regions_error():
  config = load_config("pretrain_aal3", "test")
  config.mask.adaptive, config.mask.adaptive_decay = True, 0.5
  patch_map, spec, _ = _parts(config)
  tracker = objectives.AdaptiveRegions.from_config(config, patch_map, spec.num_time)
  regions = tracker.regions
  a, b = regions[0], regions[-1]
  token_error = jnp.asarray(np.where(regions == a, 5.0, 1.0))[None]
  mask = jnp.asarray((regions == a) | (regions == b))[None]
  error = tracker.update(tracker.initial(), token_error, mask)
  assert float(error[a]) == pytest.approx(0.5 * 1 + 0.5 * 5)  # decay 0.5 from 1
  assert float(error[b]) == pytest.approx(1.0)
  untouched = np.setdiff1d(np.arange(tracker.num_regions), [a, b])
  np.testing.assert_array_equal(np.asarray(error)[untouched], 1.0)  # not masked: kept


def test_region_scale_steers_the_roi_draw():
  config = load_config("pretrain_aal3", "test")
  patch_map, _, sampler = _parts(config)
  favoured = int(np.bincount(patch_map.brain_region[patch_map.brain_region >= 0]).argmax())
  in_region = np.tile(patch_map.brain_region == favoured, sampler.num_time)
  scale = jnp.ones(patch_map.atlas.num_regions).at[favoured].set(1e6)
  masks = sampler.sample_batch(jax.random.key(0), 32, scale)
  assert np.asarray(masks.mask)[:, in_region].all()  # drawn first, every time
  plain = sampler.sample_batch(jax.random.key(0), 32)
  assert not np.asarray(plain.mask)[:, in_region].all()


def _two_steps(config):
  patch_map, spec, sampler = _parts(config)
  mesh = sharding.mesh_from_config(config.mesh, jax.devices()[:1])
  setup = train_step.TrainSetup.create(config, spec, sampler, mesh)
  state = setup.init()
  windows = np.random.default_rng(0).standard_normal(
      (config.batch_size,) + spec.window_shape).astype(np.float32)
  batch = sharding.global_batch({"windows": windows}, mesh)
  losses = []
  for _ in range(2):
    state, metrics = setup.step(state, batch)
    losses.append(float(metrics["loss"]))
  return setup, state, losses


@pytest.mark.slow
def test_train_step_with_both_options(tmp_path):
  config = load_config("pretrain_aal3", "test")
  config.batch_size = 2
  _, plain_state, plain = _two_steps(config)
  assert "region_error" not in plain_state
  config.mask.adaptive = True
  config.loss.system_weights.limbic = 4.0
  setup, state, weighted = _two_steps(config)
  assert weighted[0] != pytest.approx(plain[0])  # the same first masks, another loss
  error = np.asarray(state["region_error"])
  assert error.shape == (setup.sampler.patch_map.atlas.num_regions,)
  assert np.all(np.isfinite(error)) and np.any(error != 1.0)  # tracked, in the state
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(2, state)
  restored, _ = ckpt.restore(setup.abstract_state)
  ckpt.close()
  np.testing.assert_array_equal(np.asarray(restored["region_error"]), error)  # resumes with it


def test_compare_variants_set_the_options():
  config = load_config("compare_masking", "test")
  adaptive = compare.pretrain_config(config, "roi_adaptive", seed=3)
  assert adaptive.mask.adaptive and adaptive.mask.strategy == "roi" and adaptive.seed == 3
  weighted = compare.pretrain_config(config, "roi_weighted", seed=0)
  assert weighted.loss.system_weights.limbic == 2.0 and not weighted.mask.adaptive
  config.strategies = "roi_weighted,roi_adaptive,random"
  assert compare.plan_runs(config)[:3] == [("roi_weighted", 0), ("roi_adaptive", 0),
                                            ("random", 0)]


@pytest.mark.slow
def test_visible_weight_adds_the_visible_tokens_error():
  config = load_config("pretrain_aal3", "test")
  config.batch_size = 2
  assert config.loss.visible_weight == 1.0  # pretraining's default
  config.loss.visible_weight = 0.0
  _, _, plain = _two_steps(config)
  config.loss.visible_weight = 1.0
  setup, _, both = _two_steps(config)
  # Same first masks and parameters: the first loss gains the visible tokens' mean error.
  model = nnx.merge(setup.graphdef, setup.init()["params"])
  patch_map, spec, sampler = _parts(config)
  masks = sampler.sample_batch(jax.random.fold_in(setup.init()["rng"], 0), 2)
  windows = np.random.default_rng(0).standard_normal((2,) + spec.window_shape)
  out = model(jnp.asarray(windows, jnp.float32), masks)
  visible = model_lib.weighted_mean(out["token_error"], ~out["mask"])
  assert both[0] == pytest.approx(plain[0] + float(visible), rel=1e-4)
  visible_variant = compare.pretrain_config(load_config("compare_masking", "test"),
                                            "random_visible", seed=0)
  assert objectives.visible_weight(visible_variant) == 1.0
  assert visible_variant.mask.strategy == "random"
  paper = compare.pretrain_config(load_config("compare_masking"), "roi", seed=0)
  assert objectives.visible_weight(paper) == 0.0  # the paper's comparison: masked only
