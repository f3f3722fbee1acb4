"""NIfTI outputs in mm/sec with MNI sform and qform; the label table beside the atlas."""

import nibabel as nib
import numpy as np
import pytest

from conftest import toy_atlas
from roi_mae_jax import errors
from roi_mae_jax.brain import maps


def assert_mni_nifti(path) -> nib.Nifti1Image:
  """mm and s units, sform and qform both code 4 (MNI) with the same affine; the image."""
  image = nib.load(path)
  header = image.header
  assert header.get_xyzt_units() == ("mm", "sec"), path
  sform, sform_code = header.get_sform(coded=True)
  qform, qform_code = header.get_qform(coded=True)
  assert (int(sform_code), int(qform_code)) == (4, 4), path
  np.testing.assert_allclose(sform, qform, atol=1e-4)
  np.testing.assert_allclose(image.affine, sform, atol=1e-4)
  return image


def test_saved_volumes_carry_units_codes_and_tr(tmp_path):
  atlas = toy_atlas()
  maps.save_mni(atlas.labels, atlas.grid.affine, str(tmp_path / "labels.nii.gz"), "toy")
  image = assert_mni_nifti(tmp_path / "labels.nii.gz")
  np.testing.assert_array_equal(np.asarray(image.dataobj), atlas.labels)
  assert image.header["descrip"].tobytes().rstrip(b"\0") == b"toy"
  series = np.zeros(atlas.grid.shape + (3,), np.float32)
  maps.save_mni(series, atlas.grid.affine, str(tmp_path / "run.nii.gz"), tr=2.5)
  assert assert_mni_nifti(tmp_path / "run.nii.gz").header.get_zooms()[3] == 2.5


def test_label_table_round_trips_and_nilearn_reads_it(tmp_path):
  atlas = toy_atlas()
  path = str(tmp_path / "atlas_labels.tsv")
  maps.write_label_table(path, atlas.regions)
  rows = maps.read_label_table(path)
  assert rows[0] == {"index": 0, "name": "Background", "hemisphere": "n/a", "system": "n/a"}
  assert [(r["index"], r["name"], r["hemisphere"], r["system"]) for r in rows[1:]] == [
      (r.id, r.name, r.hemisphere, r.system) for r in atlas.regions]
  from nilearn import maskers
  maps.save_mni(atlas.labels, atlas.grid.affine, str(tmp_path / "atlas_labels.nii.gz"))
  masker = maskers.NiftiLabelsMasker(str(tmp_path / "atlas_labels.nii.gz"), lut=path).fit()
  assert sorted(masker.region_names_.values()) == sorted(r.name for r in atlas.regions)


def test_a_table_without_index_and_name_is_refused(tmp_path):
  path = tmp_path / "labels.tsv"
  path.write_text("id,label\n1,Precentral_L\n")
  with pytest.raises(errors.InputError, match="labels.tsv is not a label table"):
    maps.read_label_table(str(path))


def test_prepare_and_synthetic_files_are_mni_niftis(athena_dir, prepared_dir, aal3):
  assert_mni_nifti(next(athena_dir.glob("*/*/*.nii.gz")))
  labels = assert_mni_nifti(prepared_dir / "atlas_labels.nii.gz")
  assert_mni_nifti(prepared_dir / "brain_mask.nii.gz")
  rows = maps.read_label_table(str(prepared_dir / "atlas_labels.tsv"))
  names = {r["index"]: r["name"] for r in rows}
  assert set(np.unique(np.asarray(labels.dataobj)).tolist()) <= set(names)
  names.pop(0)  # Background
  assert names.items() <= {r.id: r.name for r in aal3.regions}.items()  # AAL3's own ids


def test_the_mni_template_for_figures_needs_no_network(monkeypatch):
  import socket
  from roi_mae_jax import plots

  def refuse(*args, **kwargs):
    raise OSError("network access during a figure")

  monkeypatch.setattr(socket.socket, "connect", refuse)
  monkeypatch.setattr(socket, "create_connection", refuse)
  plots.mni_template.cache_clear()
  template = plots.mni_template()
  assert template.shape[:3] == (99, 117, 95) and abs(template.affine[0, 0]) == 2.0
