"""What the autoencoder reconstructs of a window's tokens.

    target = reconstruction_target(tokens, spec, centre=True, pool="patch")  # (B, N, pt)
    width = target_dim(spec, "patch")                 # values the head predicts per token
    filled = voxel_values(prediction, spec)           # (B, N, p^3 pt), for figures

Tokens are (B, N, p^3 * pt): each voxel's pt frames, time-major over the
window's chunks (brain.tokens.patchify). The target is

  voxel  (default) every voxel and frame, as MAE does;
  patch  each token's mean over its voxels per frame: the region-level course,
         without the voxel detail (anatomy within a patch, smooth noise) that no
         context predicts;

and with `centre` each voxel's mean over the window's frames is removed first
(the loss then counts fluctuation, not static anatomy); `norm` is MAE's
per-token normalisation (voxel targets only).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from roi_mae_jax import errors

POOLS = ("voxel", "patch")


def check(pool: str, norm: bool) -> None:
  """An InputError for a pool this module does not know or a pool `norm` cannot take."""
  if pool not in POOLS:
    raise errors.InputError(f"model.target_pool must be one of {', '.join(POOLS)}, got {pool!r}")
  if pool == "patch" and norm:
    raise errors.InputError("model.norm_target normalises each token's voxels; with "
                            "target_pool 'patch' a token's target is one value per frame")


def fluctuation(tokens, spec):
  """tokens (B, N, D) -> each voxel's value minus its mean over the window's frames."""
  by_voxel = tokens.reshape(tokens.shape[0], spec.num_time, spec.num_patches, -1,
                            spec.patch_frames)
  return (by_voxel - by_voxel.mean(axis=(1, 4), keepdims=True)).reshape(tokens.shape)


def reconstruction_target(tokens, spec, centre: bool = False, pool: str = "voxel",
                          norm: bool = False):
  """tokens (B, N, p^3 pt) -> the target (B, N, target_dim(spec, pool))."""
  if centre:
    tokens = fluctuation(tokens, spec)
  if pool == "patch":
    return tokens.reshape(tokens.shape[:-1] + (-1, spec.patch_frames)).mean(-2)
  if not norm:
    return tokens
  mean = tokens.mean(-1, keepdims=True)
  var = tokens.var(-1, keepdims=True)
  return (tokens - mean) / jnp.sqrt(var + 1e-6)


def target_dim(spec, pool: str = "voxel") -> int:
  """Values the head predicts per token: every voxel and frame, or (patch) one per frame."""
  return spec.patch_frames if pool == "patch" else spec.token_dim


def voxel_values(prediction: np.ndarray, spec) -> np.ndarray:
  """A prediction (..., target_dim) as token values (..., p^3 pt): a patch target's
  value of each frame on every voxel of its patch."""
  if prediction.shape[-1] == spec.token_dim:
    return prediction
  voxels = spec.token_dim // spec.patch_frames
  per_voxel = np.broadcast_to(prediction[..., None, :],
                              prediction.shape[:-1] + (voxels, spec.patch_frames))
  return per_voxel.reshape(prediction.shape[:-1] + (spec.token_dim,))
