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
  entries, skipped = layouts.find_scans(config)
  assert [e.subject for e in entries] == ["sub-01", "sub-02"]  # no n-back
  assert [(e.label, e.site) for e in entries] == [(1, "A"), (0, "B")]
  assert entries[0].tr is None and entries[1].tr == 2.5
  assert len(skipped) == 1 and "another space" in skipped[0].reason


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
  with pytest.raises(errors.InputError, match="VALUE=0 or VALUE=1"):
    layouts.parse_label_values("ADHD=2")
  config = prepare_config(athena_dir, require_label=True)
  entries, _ = layouts.find_scans(config)
  assert len(entries) == 8 and all(e.label in (0, 1) for e in entries)
  with pytest.raises(errors.InputError, match="not a folder"):
    layouts.find_scans(prepare_config(athena_dir / "nowhere"))
