"""A scan is used only where the atlas says it is: form codes and brain overlap with MNI152."""

import nibabel as nib
import numpy as np
import pytest

from conftest import prepare_config
from roi_mae_jax import tasks
from roi_mae_jax.data import registration
from roi_mae_jax.data import shards
from roi_mae_jax.tasks import prepare


def _variant(image, path, affine, sform_code=4, qform_code=4):
  out = nib.Nifti1Image(np.asarray(image.dataobj, np.float32), affine, image.header.copy())
  out.set_sform(affine, int(sform_code))
  out.set_qform(affine, int(qform_code))
  if not sform_code and not qform_code:  # nibabel would otherwise keep a code for itself
    out.header["sform_code"], out.header["qform_code"] = 0, 0
  nib.save(out, str(path))
  return str(path)


def _shifted(affine, dx=0.0, dz=0.0):
  out = affine.copy()
  out[:3, 3] += (dx, 0.0, dz)
  return out


@pytest.fixture(scope="module")
def variants(athena_dir, tmp_path_factory):
  """Scan name -> path: the same run placed correctly and wrongly."""
  root = tmp_path_factory.mktemp("registration")
  good = sorted(athena_dir.glob("*/*/*.nii.gz"))
  image = nib.load(str(good[0]))
  affine = image.affine
  shape = np.array(image.shape[:3])
  native = np.diag([3.5, 3.5, 4.0, 1.0])  # a scanner affine: centred on the array
  native[:3, 3] = -(shape - 1) / 2 * np.array([3.5, 3.5, 4.0])
  return {
      "correct": str(good[1]),                                    # written by the layout
      "qform_only": _variant(image, root / "q.nii.gz", affine, 0, 4),
      "aligned_code": _variant(image, root / "a.nii.gz", affine, 2, 0),   # nibabel / SPM
      "shift_x10": _variant(image, root / "x10.nii.gz", _shifted(affine, dx=10)),
      "shift_x20": _variant(image, root / "x20.nii.gz", _shifted(affine, dx=20)),
      "shift_z30": _variant(image, root / "z30.nii.gz", _shifted(affine, dz=30)),
      "native": _variant(image, root / "native.nii.gz", native, 1, 0),
      "no_codes": _variant(image, root / "nocode.nii.gz", affine, 0, 0),
  }


@pytest.fixture(scope="module")
def prepared(variants, tmp_path_factory):
  root = tmp_path_factory.mktemp("registration_run")
  manifest = root / "scans.csv"
  manifest.write_text("path,subject,site,label\n" + "".join(
      f"{path},{name},X,0\n" for name, path in variants.items()))
  workdir = root / "out"
  tasks.run_task(prepare_config(root, source="manifest", manifest=str(manifest)), str(workdir))
  report = {r["subject"]: r for r in prepare.read_report(str(workdir))}
  index = {r["subject"]: r for r in shards.PreparedDataset(str(workdir)).rows}
  return report, index


def test_misplaced_scans_are_skipped_with_the_figure(prepared):
  report, index = prepared
  for name in ("shift_x20", "shift_z30", "native"):
    row = report[name]
    assert row["status"] == "skipped", row
    assert "not in template (MNI) space" in row["reason"] and "inside the template brain" in \
        row["reason"] and "Dice" in row["reason"], row["reason"]
    assert name not in index
  assert report["no_codes"]["status"] == "skipped"
  assert "sform and qform codes are both 0" in report["no_codes"]["reason"]
  # The figure that shows why: x+20 mm leaves about a fifth of the brain outside.
  assert "79% of its brain inside" in report["shift_x20"]["reason"]


def test_correct_scans_pass_and_carry_their_figures(prepared):
  report, index = prepared
  for name in ("correct", "qform_only", "aligned_code"):
    assert report[name]["status"] == "used", report[name]
    row = index[name]
    assert float(row["brain_inside_template"]) > 0.95 and float(row["brain_dice"]) > 0.9
    assert row["warning"] == ""
  assert (index["correct"]["sform_code"], index["correct"]["qform_code"]) == ("4", "4")


def test_a_scan_near_the_threshold_is_used_with_a_warning(prepared):
  report, index = prepared
  assert report["shift_x10"]["status"] == "used"
  assert "registration near the threshold" in report["shift_x10"]["reason"]
  assert "registration near the threshold" in index["shift_x10"]["warning"]
  assert 0.88 <= float(index["shift_x10"]["brain_inside_template"]) < 0.92


def test_form_codes():
  header = nib.Nifti1Header()
  header["sform_code"], header["qform_code"] = 0, 0
  assert "both 0" in registration.form_code_problem(header)
  header["sform_code"] = 1
  assert registration.form_code_problem(header) is None
  assert "scanner" in registration.form_code_note(header)
  header["qform_code"] = 4
  assert registration.form_code_note(header) == ""


def test_a_scan_filling_its_field_of_view_is_not_judged_by_overlap():
  rules = registration.RegistrationRules()
  template = np.zeros((10, 10, 10), bool)
  template[3:7, 3:7, 3:7] = True
  fit = registration.measure(np.ones((10, 10, 10)), np.eye(4), template, np.eye(4), rules)
  problem, warning = registration.verdict(fit, rules)
  assert problem is None and "fills 100% of its field of view" in warning
