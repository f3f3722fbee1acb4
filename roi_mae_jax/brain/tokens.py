"""Windows <-> brain-patch tokens, and fixed sin-cos position codes.

A window is (batch, X, Y, Z, T). A token is one brain patch of p^3 voxels over
pt frames, flattened voxel-major (x, y, z, then frame). Tokens are laid out
time-major, `t * P + p`, as in `masking.samplers`:

    tok = patchify(windows, brain_patches, p=4, pt=2)   # (B, T/pt * P, 64 * 2)
    back = unpatchify(tok, brain_patches, (40, 48, 44, 8), p=4, pt=2)
    # back equals windows on brain patches and is 0 elsewhere.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np


def patchify(windows, brain_patches: np.ndarray, p: int, pt: int):
  """(B, X, Y, Z, T) -> (B, T // pt * P, p^3 * pt) over the listed patches."""
  b, x, y, z, t = windows.shape
  w = windows.reshape(b, x // p, p, y // p, p, z // p, p, t // pt, pt)
  w = w.transpose(0, 7, 1, 3, 5, 2, 4, 6, 8)
  w = w.reshape(b, t // pt, -1, p * p * p * pt)
  w = jnp.take(w, jnp.asarray(brain_patches), axis=2)
  return w.reshape(b, -1, p * p * p * pt)


def unpatchify(tokens, brain_patches: np.ndarray, window_shape: Sequence[int],
               p: int, pt: int):
  """Inverse of `patchify`; voxels outside the listed patches are 0."""
  x, y, z, t = window_shape
  b = tokens.shape[0]
  n_box = (x // p) * (y // p) * (z // p)
  tok = tokens.reshape(b, t // pt, len(brain_patches), -1)
  box = jnp.zeros((b, t // pt, n_box, tok.shape[-1]), tokens.dtype)
  box = box.at[:, :, jnp.asarray(brain_patches)].set(tok)
  box = box.reshape(b, t // pt, x // p, y // p, z // p, p, p, p, pt)
  box = box.transpose(0, 2, 5, 3, 6, 4, 7, 1, 8)
  return box.reshape(b, x, y, z, t)


def sincos_1d(positions: np.ndarray, width: int) -> np.ndarray:
  """(n,) positions -> (n, width) codes; width must be even."""
  if width % 2:
    raise ValueError(f"sin-cos width must be even, got {width}")
  omega = 1.0 / 10000 ** (np.arange(width // 2, dtype=np.float64) / (width / 2))
  angle = np.asarray(positions, np.float64)[:, None] * omega[None]
  return np.concatenate([np.sin(angle), np.cos(angle)], axis=1).astype(np.float32)


def sincos_3d(coords: np.ndarray, width: int) -> np.ndarray:
  """(n, 3) patch-grid coordinates -> (n, width); a third of the code per axis."""
  per_axis = 2 * (width // 6)
  parts = [sincos_1d(coords[:, a], per_axis) for a in range(3)]
  pad = np.zeros((coords.shape[0], width - 3 * per_axis), np.float32)
  return np.concatenate(parts + [pad], axis=1)


def patch_coordinates(brain_patches: np.ndarray, patch_grid: Sequence[int]) -> np.ndarray:
  """Patch-grid (i, j, k) of each brain patch, in the C order of `patchify`."""
  return np.stack(np.unravel_index(np.asarray(brain_patches), tuple(patch_grid)), axis=1)
