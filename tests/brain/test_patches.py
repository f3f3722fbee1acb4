"""Patch maps: brain patches, majority / pure / any assignment."""

import nibabel as nib
import numpy as np
import pytest

from configs import show_masks
from roi_mae_jax import errors
from roi_mae_jax.brain import atlas as atlas_lib
from roi_mae_jax.brain import grids
from roi_mae_jax.brain import patches as patches_lib
from tests.conftest import toy_atlas


def test_grid_must_tile_into_patches():
  on_grid = toy_atlas((8, 8, 8)).on_grid(grids.mni_grid(4.0, (91, 109, 91)))
  with pytest.raises(errors.InputError, match=r"\(91, 109, 91\).*\(96, 114, 96\)"):
    patches_lib.build_patch_map(on_grid, 6)


def test_octant_atlas_patch_assignment():
  toy = toy_atlas((8, 8, 8))
  aligned = patches_lib.build_patch_map(toy, 4)            # patches = octants
  assert aligned.patch_grid == (2, 2, 2)
  np.testing.assert_array_equal(aligned.region, np.arange(8))
  np.testing.assert_array_equal(aligned.brain_fraction, 1.0)
  # Patches of 8 voxels cover all octants: a tie, broken by the lowest id.
  whole = patches_lib.build_patch_map(toy_atlas((8, 8, 8)), 8, "majority")
  assert whole.region.tolist() == [0]
  assert whole.membership.sum() == 8
  pure = patches_lib.build_patch_map(toy, 8, "pure")
  assert pure.region.tolist() == [-1]
  anyp = patches_lib.build_patch_map(toy, 8, "any")
  assert anyp.membership[0].all()


def test_majority_picks_the_larger_share():
  toy = toy_atlas((8, 8, 8))
  labels = toy.labels.copy()
  labels[:4, :4, :4] = 1
  labels[:3, :4, :4] = 2          # region 2 owns 3/4 of the first octant
  shifted = atlas_lib.Atlas(labels, toy.grid, toy.regions)
  pm = patches_lib.build_patch_map(shifted, 4, "pure")
  assert pm.region[0] == -1       # mixed
  pm = patches_lib.build_patch_map(shifted, 4, "majority")
  assert pm.region[0] == 1        # index of id 2


def test_white_matter_is_brain_and_takes_the_nearest_region():
  toy = toy_atlas((12, 12, 12))
  labels = toy.labels.copy()
  labels[4:8, 4:8, 4:8] = 0       # an unlabelled core enclosed by labels
  labels[:, :, :1] = labels[:, :, -1:] = 0
  hollow = atlas_lib.Atlas(labels, toy.grid, toy.regions)
  pm = patches_lib.build_patch_map(hollow, 4)
  core = np.ravel_multi_index((1, 1, 1), pm.patch_grid)
  assert pm.brain_fraction[core] == 1.0          # filled in as brain
  assert pm.voxel_counts[core].sum() == 0        # no labelled voxel
  # Centre voxel (6, 6, 6): its nearest labelled voxels are all in octant id 8.
  assert pm.region[core] == 7
  assert pm.membership[core].sum() == 1


def test_aal3_patch_map_threshold_and_volume(aal3_patch_map, small_grid):
  pm = aal3_patch_map
  assert pm.patch_grid == (10, 12, 11)
  assert 0 < pm.num_brain_patches < pm.num_patches
  assert (pm.brain_region >= 0).all()
  stricter = patches_lib.build_patch_map(pm.atlas, 4, brain_threshold=0.5)
  assert stricter.num_brain_patches < pm.num_brain_patches
  assert set(stricter.brain_patches) <= set(pm.brain_patches)
  vol = pm.to_volume(np.arange(1, pm.num_brain_patches + 1))
  assert vol.shape == small_grid.shape
  origin = pm.patch_origin_voxels(pm.brain_patches[:1])[0]
  assert vol[tuple(origin)] == 1
  # A right-hemisphere point lies in a patch whose region is on the right.
  ijk = np.floor(small_grid.voxel_index(np.array([40.0, -20.0, 55.0]))).astype(int)
  patch = np.ravel_multi_index(tuple(ijk // 4), pm.patch_grid)
  assert pm.regions[pm.region[patch]].hemisphere == "R"


def test_cavity_open_to_the_outside_is_still_brain():
  """Like the ventricles, which open through the unlabelled brainstem."""
  toy = toy_atlas((16, 16, 16))
  labels = toy.labels.copy()
  labels[4:12, 4:12, :12] = 0     # core + a wide channel out through the bottom
  pm_labels = atlas_lib.Atlas(labels, toy.grid, toy.regions)
  brain = patches_lib.brain_envelope(pm_labels.labels, 4.0)
  assert brain[8, 8, 8] and brain[8, 8, 2]


def test_patch_map_from_config_with_a_user_atlas_and_derived_shape(tmp_path):
  # A two-region atlas over the MNI box at 4 mm, split at x = 0.
  grid = grids.mni_grid(4.0, (46, 55, 46))
  x = grid.world_coords()[..., 0]
  labels = np.where(x > 0, 2, 1).astype(np.int16)
  labels[:, :, :3] = 0
  path = tmp_path / "halves.nii.gz"
  nib.save(nib.Nifti1Image(labels, grid.affine), str(path))
  (tmp_path / "halves.nii.txt").write_text("1 Half_L\n2 Half_R\n")
  config = show_masks.get_config()
  config.atlas.path = str(path)
  config.grid.shape = None
  config.grid.voxel_size_mm = 6.0
  config.patches.size = 3
  pm = patches_lib.patch_map_from_config(config)
  assert all(s % 3 == 0 for s in pm.atlas.grid.shape)
  assert [r.name for r in pm.regions] == ["Half_L", "Half_R"]
  centres = pm.atlas.grid.world_coords(pm.patch_origin_voxels(pm.brain_patches) + 1.0)
  names = np.array([r.name for r in pm.regions])[pm.brain_region]
  assert (names[centres[:, 0] > 10] == "Half_R").all()
  assert (names[centres[:, 0] < -10] == "Half_L").all()
