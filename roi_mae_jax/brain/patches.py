"""Which patches are brain, and which AAL3 region each patch belongs to.

    on_grid = atlas.atlas_on_grid(mni_grid(2.0, (96, 96, 96)))
    pm = build_patch_map(on_grid, patch_size=6, assignment="majority")
    pm.num_brain_patches, pm.num_patches      # tokens per frame vs the full box
    pm.brain_region                           # (P,) region index of each token

The brain is the atlas's labelled voxels, closed (6 mm ball) and hole-filled
in 3D and slice by slice: AAL3 labels grey matter only, and the white matter
and ventricles it encloses are brain too (the unlabelled brainstem is not).
A patch is a brain patch when its brain fraction is above `brain_threshold`.

Region assignment per patch (indices into `atlas.regions`):
  majority  the most frequent region among the patch's labelled voxels; ties
            go to the lower region id.
  pure      that region only when every labelled voxel agrees, else -1
            (mixed; the mask samplers treat each mixed patch on its own).
  any       every region the patch touches (`membership`); the single-label
            `region` is the majority one.
A brain patch with no labelled voxel (deep white matter) takes the region of
the labelled voxel nearest to its centre, so every brain token has a region.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
from scipy import ndimage

from roi_mae_jax import errors
from roi_mae_jax.brain import atlas as atlas_lib
from roi_mae_jax.config import validation

ASSIGNMENTS = ("majority", "pure", "any")
CLOSING_RADIUS_MM = 6.0


class PatchGridError(errors.InputError):
  """The grid does not tile into patches."""


def brain_envelope(labels: np.ndarray, voxel_size_mm: float,
                   radius_mm: float = CLOSING_RADIUS_MM) -> np.ndarray:
  """Labelled voxels closed with a ball and hole-filled: a whole-brain mask."""
  r = max(1, int(round(radius_mm / voxel_size_mm)))
  ball = np.linalg.norm(np.mgrid[-r:r + 1, -r:r + 1, -r:r + 1], axis=0) <= r
  padded = np.pad(labels > 0, r)
  closed = ndimage.binary_closing(padded, structure=ball)[r:-r, r:-r, r:-r]
  brain = ndimage.binary_fill_holes(closed | (labels > 0))
  # Ventricles reach the outside through the unlabelled brainstem, so 3D
  # filling misses them; filling each slice along each axis does not.
  filled = brain.copy()
  for axis in range(3):
    planes = np.moveaxis(brain, axis, 0)
    filled |= np.moveaxis(np.stack([ndimage.binary_fill_holes(p) for p in planes]), 0, axis)
  return filled


@dataclasses.dataclass(frozen=True, eq=False)
class PatchMap:
  """Per-patch facts for one grid and patch size (patches in C order)."""

  atlas: atlas_lib.Atlas      # the atlas on the target grid
  patch_size: int
  assignment: str
  brain_threshold: float
  patch_grid: tuple[int, int, int]  # patches per axis
  brain_fraction: np.ndarray  # (num_patches,) share of brain voxels
  region: np.ndarray          # (num_patches,) region index, -1 = none / mixed
  membership: np.ndarray      # (num_patches, R) bool: patch touches region
  voxel_counts: np.ndarray    # (num_patches, R) labelled voxels per region

  @property
  def num_patches(self) -> int:
    return int(np.prod(self.patch_grid))

  @functools.cached_property
  def brain_patches(self) -> np.ndarray:
    """Indices (into all patches) of the brain patches: the tokens."""
    return np.flatnonzero(self.brain_fraction > self.brain_threshold)

  @property
  def num_brain_patches(self) -> int:
    return len(self.brain_patches)

  @property
  def brain_region(self) -> np.ndarray:
    """(P,) region index of each brain patch (-1: mixed, `pure` only)."""
    return self.region[self.brain_patches]

  @property
  def brain_membership(self) -> np.ndarray:
    return self.membership[self.brain_patches]

  @property
  def regions(self) -> tuple[atlas_lib.Region, ...]:
    return self.atlas.regions

  def patch_origin_voxels(self, patch_index: np.ndarray) -> np.ndarray:
    """(n, 3) voxel index of each patch's first corner."""
    return np.stack(np.unravel_index(patch_index, self.patch_grid), -1) * self.patch_size

  def to_volume(self, values: np.ndarray, fill=0) -> np.ndarray:
    """Paints one value per brain patch back onto the voxel grid."""
    values = np.asarray(values)
    full = np.full(self.num_patches, fill, dtype=values.dtype)
    full[self.brain_patches] = values
    vol = full.reshape(self.patch_grid)
    for axis in range(3):
      vol = np.repeat(vol, self.patch_size, axis=axis)
    return vol


def _patches_of(volume: np.ndarray, p: int) -> np.ndarray:
  nx, ny, nz = (s // p for s in volume.shape)
  v = volume.reshape(nx, p, ny, p, nz, p).transpose(0, 2, 4, 1, 3, 5)
  return v.reshape(nx * ny * nz, p ** 3)


def check_divisible(shape: tuple[int, ...], patch_size: int) -> None:
  if any(s % patch_size for s in shape):
    suggestion = tuple(-(-s // patch_size) * patch_size for s in shape)
    raise PatchGridError(
        f"grid.shape {tuple(shape)} does not tile into patches of "
        f"{patch_size} voxels; use a multiple such as {suggestion}")


def build_patch_map(on_grid: atlas_lib.Atlas, patch_size: int,
                    assignment: str = "majority",
                    brain_threshold: float = 0.0) -> PatchMap:
  """Patch facts for an atlas already resampled onto the target grid."""
  validation.refuse("patches.assignment", assignment)
  validation.refuse("patches.brain_threshold", brain_threshold)
  labels = on_grid.labels
  check_divisible(labels.shape, patch_size)
  p = patch_size
  patch_grid = tuple(s // p for s in labels.shape)
  num_regions = on_grid.num_regions

  # Atlas ids -> region index + 1 (0 = background), via a lookup table.
  lookup = np.zeros(int(labels.max()) + 1, dtype=np.int32)
  for index, region in enumerate(on_grid.regions):
    lookup[region.id] = index + 1
  compact = lookup[labels]

  brain = brain_envelope(labels, min(on_grid.grid.voxel_size_mm))
  brain_fraction = _patches_of(brain, p).mean(axis=1)

  # Deep white matter: borrow the label of the nearest labelled voxel.
  _, nearest = ndimage.distance_transform_edt(compact == 0, return_indices=True)
  nearest_label = compact[tuple(nearest)]

  patch_labels = _patches_of(compact, p)
  n = patch_labels.shape[0]
  counts = np.bincount(
      (np.arange(n)[:, None] * (num_regions + 1) + patch_labels).ravel(),
      minlength=n * (num_regions + 1)).reshape(n, num_regions + 1)[:, 1:]
  labelled = counts.sum(axis=1) > 0
  majority = np.where(labelled, np.argmax(counts, axis=1), -1)
  centre = (p // 2) * (p * p + p + 1)  # flat index of voxel (p/2, p/2, p/2)
  centres = _patches_of(nearest_label, p)[:, centre] - 1
  majority = np.where(labelled, majority, centres)

  membership = counts > 0
  membership[~labelled, :] = False
  membership[~labelled, np.maximum(majority[~labelled], 0)] = True
  if assignment == "pure":
    pure = membership.sum(axis=1) == 1
    region = np.where(pure, majority, -1)
  else:
    region = majority
  return PatchMap(on_grid, p, assignment, float(brain_threshold), patch_grid,
                  brain_fraction.astype(np.float32), region.astype(np.int32),
                  membership, counts.astype(np.int32))


def patch_map_from_config(config) -> PatchMap:
  """The patch map of `config.grid`, `config.atlas` and `config.patches`."""
  on_grid = atlas_lib.atlas_from_config(config, multiple_of=int(config.patches.size))
  return build_patch_map(on_grid, int(config.patches.size),
                         config.patches.get("assignment", "majority"),
                         float(config.patches.get("brain_threshold", 0.0)))
