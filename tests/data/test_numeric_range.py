"""Any finite value range prepares to the same shard: 1e30 and 1e-30 scales, scaled int16, float16."""

import nibabel as nib
import numpy as np
import pytest

from conftest import prepare_config
from roi_mae_jax import tasks
from roi_mae_jax.data import resample
from roi_mae_jax.data import shards


def _prepare_one(path, tmp_path, name, **overrides):
  manifest = tmp_path / f"{name}.csv"
  manifest.write_text(f"path,subject,site,label\n{path},{name},X,0\n")
  workdir = tmp_path / f"out_{name}"
  tasks.run_task(prepare_config(tmp_path, source="manifest", manifest=str(manifest),
                                **overrides), str(workdir))
  data = shards.PreparedDataset(str(workdir))
  return data.rows[0], data.frames(0, 0, data.rows[0]["frames"])


@pytest.fixture(scope="module")
def original(athena_dir):
  path = sorted(athena_dir.glob("*/*/*.nii.gz"))[0]
  image = nib.load(str(path))
  return image, np.asarray(image.dataobj, np.float32)


def _save(image, data, path, dtype=None):
  header = image.header.copy()
  header.set_data_dtype(dtype or data.dtype)
  nib.save(nib.Nifti1Image(data, image.affine, header), str(path))
  return path


@pytest.mark.parametrize("scale", [1e30, 1e-30])
def test_extreme_scales_give_the_same_shard(original, tmp_path, scale):
  image, data = original
  row0, reference = _prepare_one(_save(image, data, tmp_path / "ref.nii.gz"), tmp_path, "ref")
  scaled = _save(image, (data.astype(np.float64) * scale).astype(np.float32),
                 tmp_path / "scaled.nii.gz")
  row, frames = _prepare_one(scaled, tmp_path, "scaled")
  assert np.abs(frames).max() > 0.5  # not the all-zero shard of float32 squares
  np.testing.assert_allclose(frames, reference, atol=2e-3)  # float16 storage
  assert row["brain_with_data"] == row0["brain_with_data"]


def test_int16_with_slope_keeps_zero_background(original, tmp_path):
  image, data = original
  # Background exactly 0, stored as int16 with a slope and an intercept that put no
  # level exactly at 0 (as converters do): 0 decodes to the nearest level, e.g. -1e-7.
  inside = data != 0
  values = np.where(inside, data - 0.5 * data[inside].mean(), 0).astype(np.float64)
  slope = float(np.ptp(values)) / 60000
  inter = float(values.min()) + 30000.3 * slope
  raw = np.round((values - inter) / slope).astype(np.int16)
  path = tmp_path / "int16.nii"
  _save(image, raw, path, dtype=np.int16)
  with open(path, "r+b") as f:  # the scaling, written into the header as the file's own
    header = nib.Nifti1Header.from_fileobj(f)
    header["scl_slope"], header["scl_inter"] = slope, inter
    f.seek(0)
    header.write_to(f)
  stored = nib.load(str(path))
  assert stored.get_data_dtype() == np.int16 and stored.dataobj.slope == np.float32(slope)
  values = np.asarray(stored.dataobj, np.float32)
  background = values[~inside]
  assert np.all(background != 0) and np.abs(background).max() < slope  # the fault's input
  row_ref, reference = _prepare_one(
      _save(image, np.where(inside, values, 0).astype(np.float32), tmp_path / "f32.nii.gz"),
      tmp_path, "f32")
  row, frames = _prepare_one(path, tmp_path, "int16")
  assert float(row["brain_with_data"]) == float(row_ref["brain_with_data"]) < 1.0
  brain = reference != 0
  assert np.all(frames[~brain.any(-1)] == 0)
  assert np.corrcoef(frames[brain], reference[brain])[0, 1] > 0.999


def test_float16_values_match_float32(original, tmp_path):
  # NIfTI has no float16 type (nibabel refuses to write one): float16 data arrive as
  # float16 values in a float32 file, here near float16's largest value (65504).
  image, data = original
  _, reference = _prepare_one(_save(image, data, tmp_path / "f32.nii.gz"), tmp_path, "f32")
  half = (data * (60000 / np.abs(data).max())).astype(np.float16)
  assert np.isfinite(half).all() and np.abs(half).max() > 30000
  _, frames = _prepare_one(_save(image, half.astype(np.float32), tmp_path / "f16.nii.gz"),
                           tmp_path, "f16")
  brain = reference != 0
  assert np.corrcoef(frames[brain], reference[brain])[0, 1] > 0.999


def test_normalise_is_scale_free_in_both_modes():
  rng = np.random.default_rng(0)
  run = rng.normal(3, 1, (200, 20)).astype(np.float32)
  run[:10] = 7.0  # constant points
  valid = np.ones(200, bool)
  for mode in resample.NORMALISATIONS:
    expected = resample.normalise(run, valid, mode)
    for scale in (1e30, 1e-30, 1e-38):
      got = resample.normalise((run * np.float64(scale)).astype(np.float32), valid, mode)
      np.testing.assert_allclose(got, expected, atol=1e-4, err_msg=f"{mode} {scale}")


@pytest.mark.parametrize("scale", [1e300, 1e-300])
@pytest.mark.slow
def test_float64_files_beyond_float32_range_give_the_same_shard(original, tmp_path, scale):
  image, data = original
  _, reference = _prepare_one(_save(image, data, tmp_path / "ref.nii.gz"), tmp_path, "ref")
  _, frames = _prepare_one(_save(image, data.astype(np.float64) * scale,
                                 tmp_path / "f64.nii.gz", dtype=np.float64), tmp_path, "f64")
  np.testing.assert_allclose(frames, reference, atol=2e-3)
