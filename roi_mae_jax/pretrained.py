"""A pretrained encoder loaded from a pretraining workdir, and pooled features.

    pre = load_pretrained("runs/demo")               # newest checkpoint; config.json beside it
    feats = pre.features(windows, pool="region")     # (B, F) float32, no masking
    pre.config.frames, pre.spec.num_tokens, pre.patch_map.regions

Features see every brain token (no masking). Pools:
  mean    the mean of the encoded tokens (width)
  region  the mean per AAL3 region that owns a patch, concatenated
          (regions x width); `pre.pooled_regions` names them in order
  cls     a class token: this encoder has none, so it is refused
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from roi_mae_jax import checkpoint as checkpoint_lib
from roi_mae_jax import errors
from roi_mae_jax import masking
from roi_mae_jax import model as model_lib
from roi_mae_jax import outputs
from roi_mae_jax import patches as patches_lib
from roi_mae_jax import sharding
from roi_mae_jax import train_step

POOLS = ("mean", "region", "cls")


@dataclasses.dataclass(eq=False)
class Pretrained:
  """Encoder parameters and what is needed to feed them."""

  config: ml_collections.ConfigDict
  spec: model_lib.TokenSpec
  patch_map: patches_lib.PatchMap
  graphdef: nnx.GraphDef
  params: dict
  step: int

  @functools.cached_property
  def brain(self) -> np.ndarray:
    """(X, Y, Z) bool: the atlas brain on the grid (for figures)."""
    atlas = self.patch_map.atlas
    return patches_lib.brain_envelope(atlas.labels, min(atlas.grid.voxel_size_mm))

  @functools.cached_property
  def pooled_regions(self) -> np.ndarray:
    """Region indices (into patch_map.regions) that own at least one patch."""
    return np.unique(self.spec.patch_region[self.spec.patch_region >= 0])

  @functools.cached_property
  def region_pooling(self) -> np.ndarray:
    """(N, R') token -> region averaging matrix (time-major tokens)."""
    per_patch = (self.spec.patch_region[:, None] == self.pooled_regions[None]).astype(np.float32)
    per_token = np.tile(per_patch, (self.spec.num_time, 1))
    return per_token / np.maximum(per_token.sum(0, keepdims=True), 1.0)

  def model(self) -> model_lib.MaskedAutoencoder:
    return nnx.merge(self.graphdef, self.params)

  def encode(self, params, windows: jax.Array) -> jax.Array:
    """windows (B, X, Y, Z, T) -> (B, N, width) with every token visible."""
    model = nnx.merge(self.graphdef, params)
    tokens = self.spec.patchify(windows.astype(jnp.float32))
    ids = jnp.broadcast_to(jnp.arange(self.spec.num_tokens), tokens.shape[:1] +
                           (self.spec.num_tokens,))
    return model.encode(tokens, ids).astype(jnp.float32)

  def pool(self, encoded: jax.Array, pool: str) -> jax.Array:
    """(B, N, width) -> (B, F)."""
    check_pool(pool)
    if pool == "mean":
      return encoded.mean(axis=1)
    pooled = jnp.einsum("bnw,nr->brw", encoded, jnp.asarray(self.region_pooling))
    return pooled.reshape(encoded.shape[0], -1)

  @functools.cached_property
  def _features_fn(self):
    return jax.jit(lambda params, w, pool: self.pool(self.encode(params, w), pool),
                   static_argnums=2)

  def features(self, windows, pool: str = "mean") -> np.ndarray:
    """(B, X, Y, Z, T) windows -> (B, F) pooled features (numpy)."""
    return np.asarray(self._features_fn(self.params, jnp.asarray(windows), pool))


def check_pool(pool: str) -> None:
  if pool == "cls":
    raise errors.InputError("pool 'cls' needs a class token; this encoder has none: use "
                            "'mean' or 'region'")
  if pool not in POOLS:
    raise errors.InputError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, outputs.CONFIG_FILE)
  if not os.path.exists(path):
    raise errors.InputError(f"{path} is missing: checkpoint must name a pretraining workdir")
  with open(path, encoding="utf-8") as f:
    return ml_collections.ConfigDict(json.load(f))


def load_pretrained(workdir: str, step: int | None = None) -> Pretrained:
  """The encoder of a pretraining run (`step`: a checkpoint; None = the newest)."""
  config = read_config(workdir)
  patch_map = patches_lib.patch_map_from_config(config)
  spec = model_lib.spec_from_config(config, patch_map)
  sampler = masking.sampler_from_config(config, patch_map)
  config.mesh = sharding.mesh_config(data=1, fsdp=1, tensor=1)
  mesh = sharding.mesh_from_config(config.mesh, jax.devices()[:1])
  setup = train_step.TrainSetup.create(config, spec, sampler, mesh)
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise errors.InputError(f"{directory} does not exist: pretrain into {workdir} first")
  ckpt = checkpoint_lib.Checkpointer(directory, async_save=False)
  try:
    if ckpt.latest_step() is None:
      raise errors.InputError(f"no checkpoint in {ckpt.directory}: pretrain first")
    if step is not None and step not in ckpt.all_steps():
      raise errors.InputError(f"no checkpoint for step {step} in {ckpt.directory}; there are "
                              f"{ckpt.all_steps()}")
    state, _ = ckpt.restore(setup.abstract_state, step=step)
  finally:
    ckpt.close()
  return Pretrained(config, spec, patch_map, setup.graphdef, state["params"],
                    int(jax.device_get(state["step"])))
