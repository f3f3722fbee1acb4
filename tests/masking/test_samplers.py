"""Mask samplers: counts, index algebra, region structure, weights, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from scipy import stats

from roi_mae_jax import errors
from roi_mae_jax.brain import patches as patches_lib
from roi_mae_jax.masking import samplers
from tests.conftest import toy_atlas

NUM_TIME = 5
BATCH = 8


@pytest.fixture(scope="module", params=["majority", "pure", "any"])
def patch_map(request, aal3_patch_map):
  if request.param == "majority":
    return aal3_patch_map
  return patches_lib.build_patch_map(aal3_patch_map.atlas, 4, request.param)


def _batch(sampler, seed=0, batch=BATCH):
  return jax.tree.map(np.asarray, sampler.sample_batch(jax.random.key(seed), batch))


@pytest.mark.parametrize("strategy", samplers.STRATEGIES)
@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_counts_and_index_algebra(patch_map, strategy, ratio):
  sampler = samplers.MaskSampler(patch_map, NUM_TIME, strategy, ratio)
  n = sampler.num_tokens
  assert n == NUM_TIME * patch_map.num_brain_patches
  assert sampler.num_mask == pytest.approx(ratio * n, abs=NUM_TIME)
  out = _batch(sampler)
  assert out.ids_keep.shape == (BATCH, sampler.num_keep)
  assert out.ids_mask.shape == (BATCH, sampler.num_mask)
  assert out.ids_restore.shape == out.mask.shape == (BATCH, n)
  for b in range(BATCH):
    keep, masked, restore, mask = (x[b] for x in out)
    assert mask.sum() == sampler.num_mask                       # exact count
    assert not mask[keep].any() and mask[masked].all()
    np.testing.assert_array_equal(np.sort(np.concatenate([keep, masked])), np.arange(n))
    shuffle = np.concatenate([keep, masked])
    np.testing.assert_array_equal(shuffle[restore], np.arange(n))  # restore inverts
    np.testing.assert_array_equal(np.argsort(shuffle), restore)
  # Samples in a batch differ.
  assert len({m.tobytes() for m in out.mask}) == BATCH


@pytest.mark.parametrize("strategy", samplers.STRATEGIES)
def test_same_key_same_mask_other_key_other_mask(aal3_patch_map, strategy):
  sampler = samplers.MaskSampler(aal3_patch_map, NUM_TIME, strategy, 0.5)
  a, b, c = _batch(sampler, 3), _batch(sampler, 3), _batch(sampler, 4)
  np.testing.assert_array_equal(a.mask, b.mask)
  np.testing.assert_array_equal(a.ids_restore, b.ids_restore)
  assert not np.array_equal(a.mask, c.mask)
  # jit(vmap) agrees with single un-jitted draws on the split keys.
  keys = jax.random.split(jax.random.key(3), BATCH)
  one = sampler.sample(keys[5])
  np.testing.assert_array_equal(np.asarray(one.mask), a.mask[5])
  np.testing.assert_array_equal(np.asarray(one.ids_keep), a.ids_keep[5])


def _group_cover(mask_tp, group):
  """Per group: fraction of its cells masked."""
  return {g: mask_tp[..., group == g].mean() for g in np.unique(group)}


@pytest.mark.parametrize("assignment", ["majority", "pure"])
def test_roi_masks_whole_regions_but_one(aal3_patch_map, assignment):
  pm = patches_lib.build_patch_map(aal3_patch_map.atlas, 4, assignment)
  sampler = samplers.MaskSampler(pm, NUM_TIME, "roi", 0.5)
  out = _batch(sampler, batch=16)
  region = pm.brain_region.copy()
  mixed = region < 0
  region[mixed] = 10_000 + np.flatnonzero(mixed)       # each mixed patch alone
  for mask in out.mask:
    tp = mask.reshape(NUM_TIME, -1)
    assert (tp == tp[0]).all()                          # same in every chunk
    cover = np.array(list(_group_cover(tp[0], region).values()))
    partial = ((cover > 0) & (cover < 1)).sum()
    assert partial <= 1
    assert (cover == 1).sum() >= 5
  # Partially masked regions occur, and which patches it gets varies.
  assert any(((c := np.array(list(_group_cover(m.reshape(NUM_TIME, -1)[0], region)
                                      .values()))) > 0).sum() > (c == 1).sum()
             for m in out.mask)


def test_roi_time_masks_whole_blocks_but_one(aal3_patch_map):
  sampler = samplers.MaskSampler(aal3_patch_map, NUM_TIME, "roi_time", 0.5)
  out = _batch(sampler)
  region = aal3_patch_map.brain_region
  for mask in out.mask:
    tp = mask.reshape(NUM_TIME, -1)
    partial = 0
    for t in range(NUM_TIME):
      cover = np.array(list(_group_cover(tp[t], region).values()))
      partial += ((cover > 0) & (cover < 1)).sum()
    assert partial <= 1
    assert not (tp == tp[0]).all()                      # chunks differ


def test_tube_is_constant_in_time_random_is_not(aal3_patch_map):
  tube = _batch(samplers.MaskSampler(aal3_patch_map, NUM_TIME, "tube", 0.5)).mask
  rand = _batch(samplers.MaskSampler(aal3_patch_map, NUM_TIME, "random", 0.5)).mask
  for t, r in zip(tube, rand):
    t, r = t.reshape(NUM_TIME, -1), r.reshape(NUM_TIME, -1)
    assert (t == t[0]).all()
    assert not (r == r[0]).all()
    assert 0.4 < r.mean(axis=1).min() and r.mean(axis=1).max() < 0.6


def test_weights_set_the_first_draw_probability():
  """Eight equal regions, quota = one region: P(region) = w / sum(w)."""
  pm = patches_lib.build_patch_map(toy_atlas((8, 8, 8)), 2)   # 8 regions x 8 patches
  weights = np.array([1, 2, 3, 4, 0, 1, 1, 4], np.float32)
  sampler = samplers.MaskSampler(pm, 2, "roi", 1 / 8, weights)
  masks = np.asarray(sampler.sample_batch(jax.random.key(42), 4000).mask)
  spatial = masks.reshape(4000, 2, -1)[:, 0]
  regions = pm.brain_region
  chosen = np.array([np.unique(regions[m]) for m in spatial])
  assert chosen.shape == (4000, 1)                             # one whole region each
  counts = np.bincount(chosen[:, 0], minlength=8)
  assert counts[4] == 0                                        # weight 0: never
  expected = weights / weights.sum() * 4000
  live = weights > 0
  assert stats.chisquare(counts[live], expected[live]).pvalue > 1e-3
  uniform = np.full(live.sum(), 4000 / live.sum())
  assert stats.chisquare(counts[live], uniform).pvalue < 1e-6


def test_system_weights_raise_a_system_frequency(aal3_patch_map):
  regions = aal3_patch_map.regions
  cerebellum = np.array([r.system == "cerebellum" for r in regions])
  token_cb = cerebellum[aal3_patch_map.brain_region]

  def share(weights):
    sampler = samplers.MaskSampler(aal3_patch_map, 2, "roi", 0.25, weights)
    masks = np.asarray(sampler.sample_batch(jax.random.key(7), 400).mask)
    return masks.reshape(400, 2, -1)[:, 0][:, token_cb].mean()

  base = share(None)
  boosted = share(samplers.region_weights(regions, {"cerebellum": 4.0}))
  muted = share(samplers.region_weights(regions, {}, {"Cerebellum_*": 0.0}))
  assert boosted > base + 0.15
  assert muted == 0.0


def test_region_weight_spec():
  assert samplers.parse_region_weights(" Hippocampus_*=2, Amygdala_R=0.5,") == {
      "Hippocampus_*": 2.0, "Amygdala_R": 0.5}
  regions = toy_atlas().regions
  w = samplers.region_weights(regions, {"other": 2.0}, {"Block1_*": 3.0})
  assert w[0] == 6.0 and w[1] == 2.0
  with pytest.raises(errors.InputError, match="matches no region"):
    samplers.region_weights(regions, {}, {"Nope": 2.0})
  with pytest.raises(errors.InputError, match="all zero"):
    samplers.region_weights(regions, {"other": 0.0})


def test_the_sampler_refuses_a_ratio_it_cannot_draw(aal3_patch_map):
  with pytest.raises(errors.InputError, match="ratio"):
    samplers.MaskSampler(aal3_patch_map, 4, "roi", 1.0)


@pytest.mark.parametrize("strategy", samplers.STRATEGIES)
def test_sharded_over_eight_devices_matches_one(aal3_patch_map, strategy):
  assert jax.device_count() == 8
  # Auto axes: XLA propagates shardings through the sampler's gathers.
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  batch_sharding = NamedSharding(mesh, P("data"))
  sampler = samplers.MaskSampler(aal3_patch_map, NUM_TIME, strategy, 0.5)
  keys = jax.random.split(jax.random.key(11), 16)
  sharded = jax.jit(jax.vmap(sampler.sample), in_shardings=batch_sharding,
                    out_shardings=batch_sharding)(jax.device_put(keys, batch_sharding))
  assert len(sharded.mask.sharding.device_set) == 8
  assert sharded.mask.addressable_shards[0].data.shape[0] == 2
  single = jax.vmap(sampler.sample)(keys)
  for a, b in zip(sharded, single):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_zero_weight_groups_stay_ordered_even_on_a_zero_draw(monkeypatch):
  """An exponential draw of exactly 0 over weight 0 must not give NaN."""
  pm = patches_lib.build_patch_map(toy_atlas((8, 8, 8)), 2)
  weights = np.array([0, 1, 1, 1, 1, 1, 1, 0], np.float32)
  monkeypatch.setattr(jax.random, "exponential",
                      lambda key, shape: jnp.zeros(shape).at[..., 1].set(1.0))
  sampler = samplers.MaskSampler(pm, 1, "roi", 0.5, weights)
  mask = np.asarray(sampler.sample(jax.random.key(0)).mask)
  assert mask.sum() == 32
  chosen = set(pm.brain_region[mask].tolist())
  assert chosen.isdisjoint({0, 7}) and len(chosen) == 4
