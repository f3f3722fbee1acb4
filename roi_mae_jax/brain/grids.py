"""Voxel grids in MNI world coordinates.

A `Grid` is a shape plus a 4x4 voxel-to-world affine, exactly what a NIfTI
header holds. Atlas and data only ever meet through world coordinates, so a
grid in LAS orientation (negative x step, as FSL's MNI templates) and one in
RAS give the same anatomy at the same millimetre.

    grid = mni_grid(voxel_size_mm=2.0, shape=(96, 96, 96))      # the paper's box
    grid = mni_grid(4.0, orientation="LAS")                     # FSL-style axes
    xyz = grid.world_coords()                                   # (X, Y, Z, 3) mm
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import nibabel as nib
import numpy as np

from roi_mae_jax import errors
from roi_mae_jax.config import validation

# Centre and extent of the MNI152 template box (91x109x91 at 2 mm): the box that
# preprocessed fMRI in MNI space normally arrives in.
MNI_BOX_CENTRE_MM = (0.0, -18.0, 18.0)
MNI_BOX_EXTENT_MM = (182.0, 218.0, 182.0)


@dataclasses.dataclass(frozen=True)
class Grid:
  """A 3D voxel grid: `shape` and the voxel-to-world (mm) `affine`."""

  shape: tuple[int, int, int]
  affine: np.ndarray

  def __post_init__(self):
    object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
    affine = np.asarray(self.affine, dtype=np.float64)
    if len(self.shape) != 3 or affine.shape != (4, 4):
      raise errors.InputError(f"a grid needs a 3D shape and a 4x4 affine, got "
                              f"shape {self.shape} and affine {affine.shape}")
    object.__setattr__(self, "affine", affine)

  @property
  def voxel_size_mm(self) -> tuple[float, float, float]:
    return tuple(float(v) for v in nib.affines.voxel_sizes(self.affine))

  @property
  def orientation(self) -> str:
    return "".join(nib.aff2axcodes(self.affine))

  def world_coords(self, index: np.ndarray | None = None) -> np.ndarray:
    """World (mm) coordinates of voxel indices, or of every voxel centre."""
    if index is None:
      index = np.stack(np.meshgrid(*[np.arange(s) for s in self.shape],
                                   indexing="ij"), axis=-1)
    return nib.affines.apply_affine(self.affine, index)

  def voxel_index(self, world_mm: np.ndarray) -> np.ndarray:
    """Continuous voxel indices of world (mm) coordinates."""
    return nib.affines.apply_affine(np.linalg.inv(self.affine), world_mm)

  def key(self) -> tuple:
    """A hashable identity, for caches."""
    return self.shape, tuple(np.round(self.affine, 6).ravel().tolist())

  def describe(self) -> str:
    v = "x".join(f"{s:g}" for s in self.voxel_size_mm)
    return f"{'x'.join(map(str, self.shape))} at {v} mm ({self.orientation})"


def mni_grid(voxel_size_mm: float,
             shape: Sequence[int] | None = None,
             orientation: str = "RAS",
             centre_mm: Sequence[float] = MNI_BOX_CENTRE_MM,
             multiple_of: int = 1) -> Grid:
  """An axis-aligned MNI grid centred on `centre_mm`.

  Args:
    voxel_size_mm: isotropic voxel size.
    shape: voxels per axis; by default the smallest shape that covers the MNI152
      template box, rounded up to a multiple of `multiple_of` (a patch size).
    orientation: "RAS" (x grows to the right) or "LAS" (x grows to the left,
      as FSL's MNI152 templates).
    centre_mm: world position of the grid centre.
    multiple_of: round a derived shape up to a multiple of this.

  Example: `mni_grid(2.0, (96, 96, 96))` is the 192 mm cube of the paper.
  """
  if voxel_size_mm <= 0:
    raise errors.InputError(f"grid.voxel_size_mm must be positive, got {voxel_size_mm}")
  validation.refuse("grid.orientation", orientation)
  orientation = orientation.upper()
  if shape is None:
    shape = [math.ceil(e / voxel_size_mm / multiple_of) * multiple_of
             for e in MNI_BOX_EXTENT_MM]
  validation.refuse("grid.shape", shape)
  shape = tuple(int(s) for s in shape)
  steps = np.array([voxel_size_mm] * 3)
  if orientation == "LAS":
    steps[0] = -voxel_size_mm
  affine = np.diag([*steps, 1.0])
  # Place the grid's middle (index (n-1)/2) on the requested centre.
  affine[:3, 3] = np.asarray(centre_mm) - steps * (np.asarray(shape) - 1) / 2.0
  return Grid(shape, affine)


def grid_from_config(grid_config, multiple_of: int = 1) -> Grid:
  """Builds the target grid from a `config.grid` block."""
  shape = grid_config.get("shape")
  return mni_grid(float(grid_config.voxel_size_mm),
                  shape=tuple(shape) if shape else None,
                  orientation=grid_config.get("orientation", "RAS"),
                  centre_mm=tuple(grid_config.get("centre_mm", MNI_BOX_CENTRE_MM)),
                  multiple_of=multiple_of)
