"""AAL3 loading, label files, world-coordinate resampling, region metadata."""

import gzip
import os

import nibabel as nib
import numpy as np
import pytest

from roi_mae_jax import atlas as atlas_lib
from roi_mae_jax import errors
from roi_mae_jax import grids


def test_wheel_aal3_has_166_regions_of_170_indices(aal3):
  labels_path = atlas_lib.wheel_aal3_paths()[1]
  assert len(atlas_lib.read_label_file(labels_path)) == 170
  assert aal3.num_regions == 166
  ids = {r.id for r in aal3.regions}
  assert not ids & {35, 36, 81, 82}  # listed, absent from the volume: dropped
  assert aal3.grid.voxel_size_mm == (1.0, 1.0, 1.0)


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


def test_majority_rule_on_a_coarser_grid(tmp_path):
  # Source 1 mm; one 2 mm target voxel covers a 2x2x2 block of sources.
  labels = np.zeros((4, 4, 4))
  block = np.array([5, 5, 5, 7, 7, 0, 0, 0]).reshape(2, 2, 2)  # 0 x3, 5 x3, 7 x2
  labels[:2, :2, :2] = block
  labels[2:, :2, :2] = np.array([7, 7, 7, 7, 5, 5, 5, 5]).reshape(2, 2, 2)  # tie
  labels[:2, 2:, :2] = np.array([7, 7, 7, 7, 7, 5, 5, 0]).reshape(2, 2, 2)
  source = atlas_lib.Atlas(labels.astype(np.int16), grids.Grid((4, 4, 4), np.eye(4)),
                           tuple(atlas_lib.Region(i, f"R{i}", "midline", "other")
                                 for i in (5, 7)))
  target = grids.Grid((2, 2, 2), np.array([[2., 0, 0, 0.5], [0, 2, 0, 0.5],
                                            [0, 0, 2, 0.5], [0, 0, 0, 1]]))
  out = source.on_grid(target).labels
  assert out[0, 0, 0] == 0   # 0 and 5 tie on three votes: the lower label
  assert out[1, 0, 0] == 5   # 5 and 7 tie: the lower label
  assert out[0, 1, 0] == 7   # plain majority


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
  with pytest.raises(errors.InputError, match="orientation"):
    grids.mni_grid(2.0, orientation="LPI")
