"""Region-aware objectives beyond the mask: a region-weighted loss, adaptive region samplers.

Both follow the paper's future work and are off by default.

  loss.system_weights / loss.region_weights: each masked token's squared error
      is weighted by its region's weight (system weight x region weight, as for
      mask draws), so chosen regions count more in the reconstruction loss.
  mask.adaptive: regions are drawn in proportion to their current
      reconstruction error, an exponential moving average (`mask.adaptive_decay`)
      of the mean error of each region's masked tokens, kept in the train state.

    weights = token_loss_weights(config, patch_map, num_time)   # (N,) or None
    tracker = AdaptiveRegions.from_config(config, patch_map, num_time)
    error = tracker.update(error, token_error, mask)            # inside the jitted step
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from roi_mae_jax.brain import atlas as atlas_lib
from roi_mae_jax.brain import patches as patches_lib
from roi_mae_jax.masking import samplers


def loss_config() -> ml_collections.ConfigDict:
  """The `config.loss` block: per-system and per-region weights of the reconstruction
  loss, and the weight of the visible tokens' reconstruction (0: masked tokens only)."""
  return ml_collections.ConfigDict({
      "system_weights": {s: 1.0 for s in atlas_lib.SYSTEMS},
      "region_weights": "",
      "visible_weight": 0.0})


def visible_weight(config: ml_collections.ConfigDict) -> float:
  """`loss.visible_weight` (absent: 0, the masked tokens only): the weight of the
  visible tokens' reconstruction error in the loss.

  Masking a whole region leaves nothing in the loss that a region's own
  fluctuation (the part its network does not predict) could lower, so the
  encoder may drop it; reconstructing the visible tokens too asks it to keep it.
  """
  return float(config.get("loss", {}).get("visible_weight", 0.0))


def token_regions(patch_map: patches_lib.PatchMap, num_time: int) -> np.ndarray:
  """(N,) region index of each token (time-major, as the sampler); -1: a mixed patch."""
  return np.tile(patch_map.brain_region.astype(np.int32), num_time)


def token_loss_weights(config: ml_collections.ConfigDict, patch_map: patches_lib.PatchMap,
                       num_time: int) -> np.ndarray | None:
  """(N,) loss weight per token from `config.loss`, or None when every weight is 1.

  Tokens of mixed patches (`pure` assignment) weigh 1.
  """
  loss = config.get("loss")
  if loss is None:
    return None
  systems = dict(loss.get("system_weights", {}))
  names = samplers.parse_region_weights(loss.get("region_weights", ""), what="loss")
  per_region = samplers.region_weights(patch_map.regions, systems, names, what="loss")
  regions = token_regions(patch_map, num_time)
  weights = np.where(regions >= 0, per_region[np.maximum(regions, 0)], 1.0)
  if np.all(weights == 1.0):
    return None
  return weights.astype(np.float32)


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: static under jit
class AdaptiveRegions:
  """Tracks each region's reconstruction error; the sampler draws in proportion to it."""

  regions: np.ndarray       # (N,) region of each token, -1 for mixed patches
  num_regions: int
  decay: float

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, patch_map: patches_lib.PatchMap,
                  num_time: int) -> "AdaptiveRegions | None":
    if not config.mask.get("adaptive", False):
      return None
    return cls(token_regions(patch_map, num_time), patch_map.atlas.num_regions,
               float(config.mask.get("adaptive_decay", 0.9)))

  def initial(self) -> jax.Array:
    """Equal errors: the first draws are the plain (weighted) roi draws."""
    return jnp.ones((self.num_regions,), jnp.float32)

  def update(self, error: jax.Array, token_error: jax.Array, mask: jax.Array) -> jax.Array:
    """New (R,) error estimate from a batch's per-token errors (B, N) and masks (B, N).

    Regions with no masked token in the batch keep their estimate.
    """
    valid = mask & (self.regions >= 0)[None]
    ids = jnp.broadcast_to(jnp.maximum(jnp.asarray(self.regions), 0), mask.shape).ravel()
    sums = jax.ops.segment_sum(jnp.where(valid, token_error, 0.0).ravel(), ids,
                               self.num_regions)
    counts = jax.ops.segment_sum(valid.astype(jnp.float32).ravel(), ids, self.num_regions)
    batch_mean = sums / jnp.maximum(counts, 1.0)
    moved = self.decay * error + (1 - self.decay) * batch_mean
    # Positive and finite: a weight of 0 would mean "never drawn".
    return jnp.clip(jnp.where(counts > 0, moved, error), 1e-6, 1e6)
