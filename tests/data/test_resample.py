"""Resampling in world coordinates and time, normalisation, header TR rules."""

import nibabel as nib
import numpy as np
import pytest

from roi_mae_jax.brain import grids
from roi_mae_jax.data import nifti
from roi_mae_jax.data import resample


def _linear_field(grid, coefficients=(0.5, -1.0, 2.0), offset=3.0):
  return grid.world_coords() @ np.array(coefficients) + offset


@pytest.mark.parametrize("orientation", ["RAS", "LAS"])
def test_trilinear_is_exact_for_linear_fields_in_world_space(orientation):
  source = grids.mni_grid(4.0, (49, 58, 47), orientation=orientation)
  target = grids.mni_grid(3.0, (40, 50, 40))
  frames = np.stack([_linear_field(source), 2 * _linear_field(source)], axis=-1)
  points = target.world_coords().reshape(-1, 3)
  sampler = resample.TrilinearSampler(source.affine, source.shape, points)
  values = sampler(frames.astype(np.float32))
  expected = _linear_field(target).reshape(-1)
  inside = sampler.covered
  assert inside.mean() > 0.9
  np.testing.assert_allclose(values[inside, 0], expected[inside], rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(values[inside, 1], 2 * expected[inside], rtol=1e-4, atol=1e-3)
  far = np.array([[500.0, 0.0, 0.0]])
  outside = resample.TrilinearSampler(source.affine, source.shape, far)
  assert not outside.covered[0] and outside(frames.astype(np.float32))[0, 0] == 0


def test_touches_marks_points_near_a_bad_voxel():
  grid = grids.mni_grid(2.0, (10, 10, 10))
  bad = np.zeros(grid.shape, bool)
  bad[5, 5, 5] = True
  points = grid.world_coords(np.array([[5.5, 5.0, 5.0], [5.0, 5.0, 5.0], [7.0, 7.0, 7.0]]))
  touched = resample.TrilinearSampler(grid.affine, grid.shape, points).touches(bad)
  assert touched.tolist() == [True, True, False]


def test_resample_time_interpolates_a_ramp():
  ramp = np.arange(10, dtype=np.float32)[None] * 2.5   # seconds at TR 2.5
  out = resample.resample_time(ramp, source_tr=2.5, target_tr=2.0)
  assert out.shape == (1, 12)                            # 22.5 s -> frames at 0..22 s
  np.testing.assert_allclose(out[0], np.arange(12) * 2.0, atol=1e-5)
  assert resample.resample_time(ramp, 2.0, 2.0) is ramp
  assert nifti.frames_at_tr(10, 2.5, 2.0) == 12 and nifti.frames_at_tr(10, 1.5, 2.0) == 7


def test_normalise_global_and_voxel():
  rng = np.random.default_rng(0)
  run = rng.normal(5, 2, (50, 30)).astype(np.float32) + np.arange(50)[:, None]
  valid = np.ones(50, bool)
  valid[:5] = False
  g = resample.normalise(run, valid, "global")
  assert np.all(g[:5] == 0)
  np.testing.assert_allclose([g[5:].mean(), g[5:].std()], [0, 1], atol=1e-5)
  v = resample.normalise(run, valid, "voxel")
  np.testing.assert_allclose(v[5:].mean(1), 0, atol=1e-5)
  np.testing.assert_allclose(v[5:].std(1), 1, atol=1e-4)
  with pytest.raises(ValueError, match="normalise"):
    resample.normalise(run, valid, "median")


@pytest.mark.parametrize("value,unit,expected", [
    (2.0, "sec", 2.0), (2000.0, "msec", 2.0), (2000.0, "sec", 2.0), (2000.0, "unknown", 2.0),
    (2.5e6, "usec", 2.5), (0.0, "sec", None)])
def test_header_tr_units(value, unit, expected):
  header = nib.Nifti1Header()
  header.set_data_shape((2, 2, 2, 5))
  header.set_xyzt_units("mm", unit)
  header["pixdim"][4] = value
  assert nifti.header_tr(header) == expected


def test_tr_rules(tmp_path):
  grid = grids.mni_grid(4.0, (45, 54, 45))
  image = nib.Nifti1Image(np.ones(grid.shape + (8,), np.float32), grid.affine)
  path = str(tmp_path / "no_tr.nii.gz")
  nib.save(image, path)  # pixdim[4] = 1 by default: a 1 s TR
  brain = grid.world_coords(np.array([[22, 27, 22]]))
  rules = nifti.ScanRules(target_tr=2.0, min_frames=4)
  assert nifti.open_scan(path, rules, brain).tr == 1.0
  assert nifti.open_scan(path, rules, brain, tr=2.5).tr_source == "given"
  image.header["pixdim"][4] = 0
  nib.save(image, path)
  with pytest.raises(nifti.ScanRejected, match="no TR in the header"):
    nifti.open_scan(path, rules, brain)
  scan = nifti.open_scan(path, nifti.ScanRules(2.0, 4, default_tr=2.0), brain)
  assert (scan.tr, scan.tr_source) == (2.0, "config.default_tr")
