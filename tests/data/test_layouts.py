"""Dataset layouts: nilearn's ADHD download, fMRIPrep derivatives, CSV manifests."""

import json
import os
import shutil

import pytest

from conftest import prepare_config
from roi_mae_jax import errors
from roi_mae_jax import tasks
from roi_mae_jax.data import layouts
from roi_mae_jax.data import shards


@pytest.fixture(scope="module")
def scan_files(athena_dir):
  return sorted(str(p) for p in athena_dir.glob("*/*/*.nii.gz"))


def _copy(src, dst):
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  shutil.copy(src, dst)


def test_nilearn_adhd_layout(scan_files, tmp_path):
  for sid, src in (("0010042", scan_files[0]), ("0010064", scan_files[1])):
    _copy(src, tmp_path / "data" / sid / f"{sid}_rest_tshift_RPI_voreg_mni.nii.gz")
  (tmp_path / layouts.NILEARN_PHENOTYPES).write_text(
      'Subject,site,adhd,age\n10042,"NYU",1,9.1\n10064,"Peking",0,11.2\n10099,"NYU",1,8\n')
  entries, _ = layouts.find_scans(prepare_config(tmp_path, source="nilearn_adhd"))
  by_subject = {e.subject: e for e in entries}
  assert by_subject["0010042"].label == 1 and by_subject["0010042"].site == "NYU"
  assert by_subject["0010064"].label == 0 and by_subject["0010064"].site == "Peking"
  assert not os.path.exists(by_subject["0010099"].path)  # reported as missing by prepare
  with pytest.raises(errors.InputError, match="adhd"):
    layouts.find_scans(prepare_config(tmp_path / "data", source="nilearn_adhd"))


def test_fmriprep_layout_reads_participants_and_sidecar_tr(scan_files, tmp_path):
  func = "space-MNI152NLin2009cAsym_res-2_desc-preproc_bold"
  _copy(scan_files[0], tmp_path / "sub-01" / "func" / f"sub-01_task-rest_{func}.nii.gz")
  _copy(scan_files[0], tmp_path / "sub-01" / "func" /
        "sub-01_task-rest_space-MNI152NLin6Asym_desc-preproc_bold.nii.gz")
  _copy(scan_files[1], tmp_path / "sub-02" / "ses-1" / "func" /
        f"sub-02_ses-1_task-rest_run-1_{func}.nii.gz")
  _copy(scan_files[2], tmp_path / "sub-03" / "func" / f"sub-03_task-nback_{func}.nii.gz")
  (tmp_path / "sub-02" / "ses-1" / "func" / f"sub-02_ses-1_task-rest_run-1_{func}.json"
   ).write_text(json.dumps({"RepetitionTime": 2.5}))
  (tmp_path / "participants.tsv").write_text(
      "participant_id\tdiagnosis\tsite\nsub-01\tADHD\tA\nsub-02\tTD\tB\n")
  config = prepare_config(tmp_path, source="fmriprep", label_column="diagnosis",
                          label_values="ADHD=1,TD=0")
  # sub-01 has the run in two templates: which one must not depend on sort order.
  with pytest.raises(errors.InputError, match=r"1 fMRIPrep runs have several candidate files: "
                     r".*sub-01_task-rest_space-MNI152NLin2009cAsym_res-2_desc-preproc_bold"
                     r".*sub-01_task-rest_space-MNI152NLin6Asym_desc-preproc_bold.*config.space"):
    layouts.find_scans(config)
  config.space = "MNI152NLin2009cAsym"
  entries, skipped = layouts.find_scans(config)
  assert [e.subject for e in entries] == ["sub-01", "sub-02"]  # no n-back
  assert [(e.label, e.site) for e in entries] == [(1, "A"), (0, "B")]
  assert "space-MNI152NLin2009cAsym_res-2" in entries[0].path
  assert entries[0].tr is None and entries[1].tr == 2.5
  assert [(s.status, os.path.basename(s.path)) for s in skipped] == [
      ("ignored", "sub-01_task-rest_space-MNI152NLin6Asym_desc-preproc_bold.nii.gz")]
  config.space = "MNI152NLin6Asym"  # sub-02 has no such file: skipped, saying what it has
  entries, skipped = layouts.find_scans(config)
  assert [os.path.basename(e.path) for e in entries] == [
      "sub-01_task-rest_space-MNI152NLin6Asym_desc-preproc_bold.nii.gz"]
  [missing] = [s for s in skipped if s.status == "skipped"]
  assert missing.subject == "sub-02" and "no space-MNI152NLin6Asym file for this run (found " \
      f"sub-02_ses-1_task-rest_run-1_{func}.nii.gz)" in missing.reason


def test_manifest_prepares_with_given_tr(scan_files, tmp_path):
  manifest = tmp_path / "scans.csv"
  relative = os.path.relpath(scan_files[0], tmp_path)
  manifest.write_text(f"path,subject,site,label,tr\n{relative},s1,X,1,2.5\n"
                      f"{scan_files[1]},s2,Y,,\n{scan_files[2]},s1,X,0,\n")
  workdir = tmp_path / "out"
  tasks.run_task(prepare_config(tmp_path, source="manifest", manifest=str(manifest)),
                    str(workdir))
  rows = {r["scan"]: r for r in shards.PreparedDataset(str(workdir)).rows}
  assert set(rows) == {"s1", "s2", "s1_2"}
  assert rows["s1"]["source_tr"] == "2.5" and rows["s1"]["tr_source"] == "given"
  assert rows["s1"]["frames"] == 19  # 16 frames over 37.5 s: 0, 2, ..., 36 s at TR 2
  assert rows["s2"]["label"] == -1
  bad = tmp_path / "bad.csv"
  bad.write_text("file,subject\nx.nii.gz,s1\n")
  with pytest.raises(errors.InputError, match="needs columns path, subject, site, label"):
    layouts.find_scans(prepare_config(tmp_path, source="manifest", manifest=str(bad)))


def test_label_values_and_require_label(athena_dir):
  assert layouts.parse_label_values("0=0, 1=1,pending_no=0") == {"0": 0, "1": 1, "pending_no": 0}
  config = prepare_config(athena_dir, require_label=True)
  entries, _ = layouts.find_scans(config)
  assert len(entries) == 8 and all(e.label in (0, 1) for e in entries)
  with pytest.raises(errors.InputError, match="not a folder"):
    layouts.find_scans(prepare_config(athena_dir / "nowhere"))


def _athena_subject(root, site, sid, names=None):
  folder = root / site / sid
  folder.mkdir(parents=True)
  for name in names or [f"sfnwmrda{sid}_session_1_rest_1.nii.gz"]:
    (folder / name).write_bytes(b"")  # listing only: never opened here


def test_athena_tables_that_cannot_be_trusted_skip_their_scans_and_say_why(tmp_path):
  # ';' table: detected, so its labels and failed QC are applied.
  for sid in ("1", "2"):
    _athena_subject(tmp_path, "Semi", sid)
  (tmp_path / "Semi" / "Semi_phenotypic.csv").write_text(
      "ScanDir ID;Site;DX;QC_Rest_1\n1;1;1;0\n2;1;0;1\n")
  # One ID on two rows: different DX -> skipped naming the lines; same values -> used.
  for sid in ("3", "4"):
    _athena_subject(tmp_path, "Dup", sid)
  (tmp_path / "Dup" / "Dup_phenotypic.csv").write_text(
      "ScanDir ID,DX,QC_Rest_1\n3,0,1\n4,1,1\n3,1,1\n4,1,1\n")
  _athena_subject(tmp_path, "NoDX", "5")
  (tmp_path / "NoDX" / "NoDX_phenotypic.csv").write_text("ScanDir ID,Diagnosis,QC_Rest_1\n5,1,1\n")
  _athena_subject(tmp_path, "Latin1", "6")
  (tmp_path / "Latin1" / "Latin1_phenotypic.csv").write_bytes(
      "ScanDir ID,DX,QC_Rest_1,Site\n6,1,1,Z\xfcrich\n".encode("latin-1"))
  # Three candidate files: one used, the others listed as ignored.
  _athena_subject(tmp_path, "Many", "7", ["sfnwmrda7_session_1_rest_1.nii.gz",
                                          "snwmrda7_session_1_rest_1.nii.gz",
                                          "sfnwmrda7_session_1_rest_2.nii.gz"])
  entries, skipped = layouts.find_scans(prepare_config(tmp_path))
  labels = {e.subject: e.label for e in entries}
  assert labels == {"2": 0, "4": 1, "7": -1}
  why = {}
  for s in skipped:
    why.setdefault(s.subject, []).append((s.status, os.path.basename(s.path), s.reason))
  assert why["1"] == [("skipped", "sfnwmrda1_session_1_rest_1.nii.gz",
                       "failed quality control (QC_Rest_1 = 0) on line 2 of "
                       f"{tmp_path / 'Semi' / 'Semi_phenotypic.csv'}")]
  [(status, _, reason)] = why["3"]
  assert status == "skipped" and "Dup_phenotypic.csv lines 2, 4 all give ScanDir ID 3" in reason
  [(status, _, reason)] = why["5"]
  assert status == "skipped" and "NoDX_phenotypic.csv has no 'DX' column" in reason
  [(status, _, reason)] = why["6"]
  assert status == "skipped" and "Latin1_phenotypic.csv is not UTF-8 text" in reason
  assert sorted(why["7"]) == [
      ("ignored", name, "not used: sfnwmrda7_session_1_rest_1.nii.gz is this subject's scan "
       "(one scan per subject: session_1 rest_1, sfnwmrda before snwmrda)")
      for name in ("sfnwmrda7_session_1_rest_2.nii.gz", "snwmrda7_session_1_rest_1.nii.gz")]


def test_duplicate_ids_in_other_layouts_are_reported(scan_files, tmp_path):
  (tmp_path / layouts.NILEARN_PHENOTYPES).write_text(
      "Subject;site;adhd\n10042;NYU;1\n10042;NYU;0\n10064;NYU;0\n")
  entries, skipped = layouts.find_scans(prepare_config(tmp_path, source="nilearn_adhd"))
  assert [e.subject for e in entries] == ["0010064"]
  assert [s.subject for s in skipped] == ["0010042"] and "lines 2, 3" in skipped[0].reason
  func = "task-rest_space-MNI152NLin2009cAsym_desc-preproc_bold.nii.gz"
  _copy(scan_files[0], tmp_path / "bids" / "sub-01" / "func" / f"sub-01_{func}")
  (tmp_path / "bids" / "participants.tsv").write_text(
      "participant_id\tdx\nsub-01\t1\nsub-01\t0\n")
  entries, skipped = layouts.find_scans(prepare_config(tmp_path / "bids", source="fmriprep",
                                                       label_column="dx"))
  assert not entries and "lines 2, 3 all give participant sub-01" in skipped[0].reason
