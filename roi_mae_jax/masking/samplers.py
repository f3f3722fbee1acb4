"""Jitted mask samplers with static shapes: random, tube, roi, roi_time.

Tokens are laid out time-major: token `t * P + p` is brain patch `p` in time
chunk `t` (P brain patches, T time chunks, N = T * P tokens). Every strategy
masks a fixed number of tokens, so shapes never depend on the draw:

  random    n_mask = N - int(N * (1 - ratio)) tokens, uniformly (MAE).
  tube      P - int(P * (1 - ratio)) patches, masked in every time chunk.
  roi       the same patch quota as tube, filled by whole atlas regions drawn at
            random (weighted, without replacement) until the quota is met; the
            last region drawn is masked partially (a random subset of its
            patches). Masked patches are masked in every time chunk.
  roi_time  the token quota of random, filled by (region, time chunk) blocks.

Region draws are weighted: block b comes before block b' with the exponential
race `E_b / w_b` (Efraimidis-Spirakis), so the first block drawn is b with
probability w_b / sum(w); weight 0 means "only when nothing else is left".

    sampler = MaskSampler(patch_map, num_time=10, strategy="roi", ratio=0.5)
    m = sampler.sample(jax.random.key(0))            # one sample
    mb = sampler.sample_batch(jax.random.key(0), 16) # jitted, vmapped
    mb.ids_keep.shape == (16, sampler.num_keep)
"""

from __future__ import annotations

import fnmatch
from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from roi_mae_jax import errors
from roi_mae_jax.brain import patches as patches_lib
from roi_mae_jax.config import validation

STRATEGIES = ("random", "tube", "roi", "roi_time")
_PAIRWISE_RANK_MAX = 512


class MaskSample(NamedTuple):
  """One draw; every field gains a leading batch axis when batched."""

  ids_keep: jax.Array     # (n_keep,) visible token indices, ascending
  ids_mask: jax.Array     # (n_mask,) masked token indices, ascending
  ids_restore: jax.Array  # (N,) position of each token in concat(keep, mask)
  mask: jax.Array         # (N,) bool, True where masked


def parse_region_weights(spec: str, what: str = "mask") -> dict[str, float]:
  """'Hippocampus_*=2, Amygdala_R=0.5' -> {pattern: weight}; `what` names the config block."""
  validation.refuse("region_weights", spec, path=f"{what}.region_weights")
  items = (item.partition("=") for item in filter(None, (s.strip() for s in spec.split(","))))
  return {name.strip(): float(value) for name, _, value in items}


def region_weights(regions, system_weights: Mapping[str, float] | None = None,
                   name_weights: Mapping[str, float] | None = None,
                   what: str = "mask") -> np.ndarray:
  """(R,) draw weight per region: system weight x region weight (default 1).

  `name_weights` keys are region names or shell patterns ('Cerebellum_*').
  """
  system_weights = dict(system_weights or {})
  name_weights = dict(name_weights or {})
  w = np.array([float(system_weights.get(r.system, 1.0)) for r in regions])
  for pattern, value in name_weights.items():
    hits = [i for i, r in enumerate(regions) if fnmatch.fnmatchcase(r.name, pattern)]
    if not hits:
      raise errors.InputError(f"{what}.region_weights: {pattern!r} matches no region of the atlas")
    w[hits] *= value
  if np.any(w < 0) or not np.all(np.isfinite(w)):
    raise errors.InputError(f"{what} weights must be finite and non-negative")
  if not np.any(w > 0):
    raise errors.InputError(f"{what} weights are all zero")
  return w.astype(np.float32)


def _draw_order(race: jax.Array):
  """(order, rank) of a 1D race, ascending; ties broken by index."""
  n = race.shape[0]
  idx = jnp.arange(n, dtype=jnp.int32)
  if n <= _PAIRWISE_RANK_MAX:
    # XLA's CPU sort costs ~0.2 us per element; n^2 comparisons are cheaper
    # for the ~170 regions of an atlas.
    before = (race[None, :] < race[:, None]) | (
        (race[None, :] == race[:, None]) & (idx[None, :] < idx[:, None]))
    rank = before.sum(axis=1, dtype=jnp.int32)
    order = jnp.zeros_like(rank).at[rank].set(idx, unique_indices=True)
  else:
    order = jnp.argsort(race).astype(jnp.int32)
    rank = jnp.zeros_like(order).at[order].set(idx, unique_indices=True)
  return order, rank


def _block_mask(key, members, member_valid, group_weight, num_blocks: int,
                quota: int, max_unit: int) -> jax.Array:
  """(num_blocks, P) mask of `quota` cells, filled unit by unit.

  A unit is (block, group). Units are drawn by the weighted race; each patch
  joins, per block, the earliest-drawn group among its `members`; units are
  masked whole in draw order and the last one partially.
  """
  num_patches, k = members.shape
  num_groups = group_weight.shape[0]
  k_race, k_pick = jax.random.split(key)
  race = jax.random.exponential(k_race, (num_blocks, num_groups))
  # where, not a bare division: a zero draw over a zero weight would be NaN.
  race = jnp.where(group_weight > 0, race / group_weight, jnp.inf)
  if k == 1:
    group = jnp.broadcast_to(members[:, 0], (num_blocks, num_patches))
  else:
    cand = jnp.where(member_valid, race[:, members], jnp.inf)  # (B, P, K)
    first = jnp.argmin(cand, axis=-1)
    group = jnp.take_along_axis(
        jnp.broadcast_to(members, cand.shape), first[..., None], -1)[..., 0]
  unit = (jnp.arange(num_blocks)[:, None] * num_groups + group).ravel()
  num_units = num_blocks * num_groups
  unit_size = jnp.zeros(num_units, jnp.int32).at[unit].add(1)
  order, rank = _draw_order(race.ravel())
  filled = jnp.cumsum(unit_size[order])
  cut = jnp.searchsorted(filled, quota, side="left")  # unit that meets the quota
  need = quota - jnp.where(cut > 0, filled[cut - 1], 0)
  whole = rank[unit] < cut
  # The cut unit: a uniformly random `need` of its cells.
  in_cut = unit == order[cut]
  score = jnp.where(in_cut, jax.random.uniform(k_pick, unit.shape), 2.0)
  _, lowest = jax.lax.top_k(-score, max_unit)
  partial = jnp.zeros(unit.shape, bool).at[lowest].set(jnp.arange(max_unit) < need)
  return (whole | partial).reshape(num_blocks, num_patches)


def _uniform_mask(key, shape: tuple[int, int], quota: int) -> jax.Array:
  """A mask of exactly `quota` cells, uniformly (top-k beats a full sort)."""
  size = shape[0] * shape[1]
  _, chosen = jax.lax.top_k(jax.random.uniform(key, (size,)), quota)
  return jnp.zeros(size, bool).at[chosen].set(True).reshape(shape)


def _indices(mask: jax.Array, num_keep: int):
  """keep / mask / restore indices of a 1D mask (keep and mask ascending)."""
  m = mask.astype(jnp.int32)
  masked_before = jnp.cumsum(m) - m
  kept_before = jnp.arange(m.shape[0], dtype=jnp.int32) - masked_before
  restore = jnp.where(mask, num_keep + masked_before, kept_before)
  shuffle = jnp.zeros_like(restore).at[restore].set(
      jnp.arange(m.shape[0], dtype=jnp.int32), unique_indices=True)
  return shuffle[:num_keep], shuffle[num_keep:], restore


def _spread_over_time(spatial: jax.Array, num_time: int, num_keep_p: int) -> MaskSample:
  """A spatial (P,) mask repeated in every time chunk, with token indices."""
  num_patches = spatial.shape[0]
  num_mask_p = num_patches - num_keep_p
  keep_p, mask_p, pos = _indices(spatial, num_keep_p)
  t = jnp.arange(num_time, dtype=jnp.int32)[:, None]
  restore = jnp.where(spatial[None], num_time * num_keep_p + t * num_mask_p
                      + (pos[None] - num_keep_p), t * num_keep_p + pos[None])
  return MaskSample((t * num_patches + keep_p[None]).ravel(),
                    (t * num_patches + mask_p[None]).ravel(), restore.ravel(),
                    jnp.broadcast_to(spatial[None], (num_time, num_patches)).ravel())


def _region_groups(patch_map: patches_lib.PatchMap):
  """(members (P, K), valid (P, K), num_groups) for the brain patches.

  Groups 0..R-1 are atlas regions; under `pure` assignment each mixed patch
  is a group of its own (R + i).
  """
  num_regions = patch_map.atlas.num_regions
  if patch_map.assignment == "any":
    membership = patch_map.brain_membership
    k = int(membership.sum(axis=1).max())
    members = np.zeros((membership.shape[0], k), np.int32)
    valid = np.zeros_like(members, dtype=bool)
    for i, row in enumerate(membership):
      ids = np.flatnonzero(row)
      members[i, :len(ids)], valid[i, :len(ids)] = ids, True
    return members, valid, num_regions
  region = patch_map.brain_region.astype(np.int32).copy()
  mixed = np.flatnonzero(region < 0)
  region[mixed] = num_regions + np.arange(len(mixed), dtype=np.int32)
  return region[:, None], np.ones((len(region), 1), bool), num_regions + len(mixed)


class MaskSampler:
  """A pure, jit-able mask sampler for one patch map and window length."""

  def __init__(self, patch_map: patches_lib.PatchMap, num_time: int,
               strategy: str = "roi", ratio: float = 0.5,
               weights: np.ndarray | None = None):
    """`weights`: (R,) per-region draw weights (see `region_weights`)."""
    validation.refuse("mask.strategy", strategy)
    if not 0.0 < ratio < 1.0:
      raise errors.InputError(f"mask.ratio must be in (0, 1), got {ratio}")
    self.strategy, self.ratio, self.num_time = strategy, float(ratio), int(num_time)
    self.patch_map = patch_map
    self.num_patches = patch_map.num_brain_patches
    self.num_tokens = self.num_time * self.num_patches
    spatial = strategy in ("tube", "roi")
    units = self.num_patches if spatial else self.num_tokens
    keep_units = int(units * (1.0 - ratio))
    if keep_units < 1 or keep_units >= units:
      raise errors.InputError(f"mask.ratio={ratio} leaves {keep_units} of {units} "
                              f"{'patches' if spatial else 'tokens'} visible")
    self._spatial = spatial
    self._keep_units = keep_units
    self.num_keep = keep_units * (self.num_time if spatial else 1)
    self.num_mask = self.num_tokens - self.num_keep

    num_regions = patch_map.atlas.num_regions
    if weights is None:
      weights = np.ones(num_regions, np.float32)
    weights = np.asarray(weights, np.float32)
    if weights.shape != (num_regions,):
      raise errors.InputError(f"mask weights need one value per region ({num_regions}), "
                              f"got shape {weights.shape}")
    self._quota = units - keep_units
    if strategy in ("roi", "roi_time"):  # random and tube need no regions
      members, valid, num_groups = _region_groups(patch_map)
      # A mixed patch (pure assignment) weighs the mean of the regions it touches.
      touched = patch_map.brain_membership[patch_map.brain_region < 0]
      mixed_w = (touched * weights).sum(1) / np.maximum(touched.sum(1), 1)
      group_weight = np.concatenate([weights, mixed_w]).astype(np.float32)
      assert group_weight.shape == (num_groups,)
      self._members = jnp.asarray(members)
      self._valid = jnp.asarray(valid)
      self._group_weight = jnp.asarray(group_weight)
      self._max_unit = int(np.bincount(members[valid], minlength=num_groups).max())
    self.sample_batch = jax.jit(self._sample_batch, static_argnums=1)

  def sample(self, key: jax.Array, region_scale: jax.Array | None = None) -> MaskSample:
    """One mask; pure in `key`. `region_scale` (R,) > 0 multiplies the regions'
    draw weights (adaptive masking; mixed patches of `pure` keep theirs)."""
    blocks = 1 if self._spatial else self.num_time
    if self.strategy in ("random", "tube"):
      cells = _uniform_mask(key, (blocks, self.num_patches), self._quota)
    else:
      weight = self._group_weight
      if region_scale is not None:
        extra = weight.shape[0] - region_scale.shape[0]
        weight = weight * jnp.concatenate([region_scale, jnp.ones((extra,), weight.dtype)])
      cells = _block_mask(key, self._members, self._valid, weight,
                          blocks, self._quota, self._max_unit)
    if self._spatial:
      return _spread_over_time(cells[0], self.num_time, self._keep_units)
    mask = cells.ravel()
    keep, masked, restore = _indices(mask, self.num_keep)
    return MaskSample(keep, masked, restore, mask)

  def _sample_batch(self, key: jax.Array, batch_size: int,
                    region_scale: jax.Array | None = None) -> MaskSample:
    return jax.vmap(lambda k: self.sample(k, region_scale))(jax.random.split(key, batch_size))


def sampler_from_config(config, patch_map: patches_lib.PatchMap,
                        strategy: str | None = None) -> MaskSampler:
  """The sampler of `config.mask` for windows of `config.frames` frames."""
  mask = config.mask
  weights = region_weights(patch_map.regions, dict(mask.get("system_weights", {})),
                           parse_region_weights(mask.get("region_weights", "")))
  return MaskSampler(patch_map, num_time_chunks(config), strategy or mask.strategy,
                     float(mask.ratio), weights)


def num_time_chunks(config) -> int:
  """Time chunks per window: `frames / patches.frames` (a whole number: the rule
  frames_per_token of config.validation)."""
  return int(config.frames) // int(config.patches.get("frames", 1))
