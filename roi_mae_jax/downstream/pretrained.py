"""A pretrained encoder loaded from a pretraining workdir, and its time courses.

    pre = load_pretrained("runs/demo")                # newest checkpoint; config.json beside it
    tokens, regions = pre.courses(pre.params, windows)  # (B, t, width), (B, t, R', width)
    tokens, regions = pre.courses(pre.params, windows, layers=(1, 2))  # + a layer axis after t
    init = random_init(pre)                           # the same encoder before pretraining
    pre.config.frames, pre.spec.num_tokens, pre.patch_map.regions

The encoder sees every brain token (no masking). `regions` holds the mean
embedding of each AAL3 region that owns a patch (`pre.pooled_regions`, in
order) at each time step; features.py pools these over a scan.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from roi_mae_jax import errors
from roi_mae_jax import outputs
from roi_mae_jax.brain import patches as patches_lib
from roi_mae_jax.model import mae as model_lib
from roi_mae_jax.training import build
from roi_mae_jax.training import checkpoint as checkpoint_lib

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

  def model(self) -> model_lib.MaskedAutoencoder:
    return nnx.merge(self.graphdef, self.params)

  @property
  def depth(self) -> int:
    """Encoder blocks: `layers` may name 0 (the embedded tokens) .. depth (the output)."""
    return model_lib.SIZES[self.config.model.size].depth

  def encode(self, params, windows: jax.Array, layers: tuple[int, ...] | None = None
             ) -> jax.Array:
    """windows (B, X, Y, Z, T) -> (B, N, width) with every token visible; with `layers`,
    (B, L, N, width) of those blocks' outputs (model.encode_layers)."""
    model = nnx.merge(self.graphdef, params)
    tokens = self.spec.patchify(windows.astype(jnp.float32))
    ids = jnp.broadcast_to(jnp.arange(self.spec.num_tokens), tokens.shape[:1] +
                           (self.spec.num_tokens,))
    if layers is None:
      return model.encode(tokens, ids).astype(jnp.float32)
    return jnp.moveaxis(model.encode_layers(tokens, ids, tuple(layers)), 0, 1
                        ).astype(jnp.float32)

  @functools.cached_property
  def patch_pooling(self) -> np.ndarray:
    """(P, R') brain patch -> region averaging matrix (one time step)."""
    per_patch = (self.spec.patch_region[:, None] == self.pooled_regions[None]).astype(np.float32)
    return per_patch / np.maximum(per_patch.sum(0, keepdims=True), 1.0)

  def courses(self, params, windows: jax.Array, layers: tuple[int, ...] | None = None
              ) -> tuple[jax.Array, jax.Array]:
    """windows (B, X, Y, Z, T) -> time courses of the encoding at token resolution.

    Returns (tokens (B, t, width), regions (B, t, R', width)): the mean of all
    tokens and of each pooled region's tokens at each of the window's t =
    T / patches.frames time steps. With `layers` (block outputs, see `encode`)
    each gains a layer axis after t: (B, t, L, width), (B, t, L, R', width).
    """
    encoded = self.encode(params, windows, layers)
    if layers is None:
      encoded = encoded[:, None]
    b, n_layers, width = encoded.shape[0], encoded.shape[1], encoded.shape[-1]
    by_time = encoded.reshape(b, n_layers, self.spec.num_time, self.spec.num_patches, width)
    regions = jnp.einsum("bltpw,pr->btlrw", by_time, jnp.asarray(self.patch_pooling))
    tokens = jnp.moveaxis(by_time.mean(axis=3), 1, 2)
    if layers is None:
      return tokens[:, :, 0], regions[:, :, 0]
    return tokens, regions

def random_init(pre: Pretrained) -> Pretrained:
  """The same encoder before pretraining: the run's own initial parameters (step 0)."""
  return dataclasses.replace(pre, params=build.initial_params(pre.config, pre.spec), step=0)


# What a pretraining config.json holds that the encoder is built from.
_PRETRAIN_KEYS = ("seed", "grid", "patches", "model", "mask", "frames")
_NAME_IT = ("--config.checkpoint must name a pretraining workdir (the --workdir given to "
            "task pretrain)")


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config.json of a pretraining workdir; `InputError` naming what `workdir` is instead."""
  if not os.path.exists(workdir):
    raise errors.InputError(f"{workdir} does not exist: {_NAME_IT}")
  if not os.path.isdir(workdir):
    raise errors.InputError(f"{workdir} is a file: {_NAME_IT}")
  path = os.path.join(workdir, outputs.CONFIG_FILE)
  if not os.path.exists(path):
    parent = os.path.dirname(os.path.normpath(workdir))
    for up in (parent, os.path.dirname(parent)):  # a checkpoints/ or checkpoints/STEP folder
      if os.path.exists(os.path.join(up, outputs.CONFIG_FILE)) and \
          os.path.isdir(os.path.join(up, "checkpoints")):
        raise errors.InputError(f"{workdir} is inside the pretraining workdir {up}: pass "
                                f"--config.checkpoint={up} (and --config.checkpoint_step=N "
                                "for another step than the newest)")
    raise errors.InputError(f"{path} is missing: {workdir} is not a pretraining workdir; "
                            f"{_NAME_IT}")
  config = outputs.read_json(path)
  task = config.get("task") if isinstance(config, dict) else None
  if task != "pretrain" or any(k not in config for k in _PRETRAIN_KEYS):
    what = f"a '{task}' run" if task else "not a pretraining run"
    raise errors.InputError(f"{workdir} holds {what} ({path}), not a pretraining run: "
                            f"{_NAME_IT}")
  return ml_collections.ConfigDict(config)


def load_pretrained(workdir: str, step: int | None = None) -> Pretrained:
  """The encoder of a pretraining run (`step`: a checkpoint; None = the newest).

  Only the parameters and the step are read from the checkpoint: no optimizer
  state, no mask sampler.
  """
  config = read_config(workdir)
  parts = build.parts(config)
  graphdef, abstract_params = build.abstract_encoder(config, parts.spec)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = {"params": jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract_params),
              "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=device)}
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
    state, _ = ckpt.restore(abstract, step=step, partial=True)
  finally:
    ckpt.close()
  return Pretrained(config, parts.spec, parts.patch_map, graphdef, state["params"],
                    int(jax.device_get(state["step"])))
