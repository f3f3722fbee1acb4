"""Task prepare: ADHD-200 files in LAS, bad input reported per scan, resume, overwrite."""

import csv
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path as nibabel_data

from conftest import REPO, prepare_config
from roi_mae_jax import errors
from roi_mae_jax import tasks
from roi_mae_jax import prepare
from roi_mae_jax.data import shards


def _index(workdir):
  with open(os.path.join(workdir, shards.INDEX_FILE), newline="") as f:
    return list(csv.DictReader(f))


def test_prepared_athena_files_keep_left_and_right(athena_dir, prepared_dir):
  """LAS input, RAS target: the right-hemisphere effect stays in right regions."""
  rows = _index(prepared_dir)
  assert len(rows) == 8 and {r["site"] for r in rows} == {"NYU", "OHSU", "Pittsburgh"}
  assert {r["tr"] for r in rows} == {"2.0"}
  assert nib.load(next(athena_dir.glob("*/*/*.nii.gz"))).affine[0, 0] < 0  # LAS input
  labels = np.asarray(nib.load(prepared_dir / "atlas_labels.nii.gz").dataobj)
  from roi_mae_jax import atlas as atlas_lib
  names = {r.id: r.name for r in atlas_lib.load_atlas().regions}
  data = shards.PreparedDataset(str(prepared_dir))
  ratios = {0: [], 1: []}
  for i, row in enumerate(data.rows):
    std = data.frames(i, 0, row["frames"]).std(axis=-1)
    per_side = {"L": [], "R": []}
    for rid in np.unique(labels[labels > 0]):
      name = names[int(rid)]
      partner = name[:-1] + ("L" if name.endswith("R") else "R")
      if name[-2:] in ("_L", "_R") and partner in names.values():
        per_side[name[-1]].append(std[labels == rid].mean())
    ratios[row["label"]].append(np.mean(per_side["R"]) / np.mean(per_side["L"]))
  assert min(ratios[1]) > 1.3, ratios      # ADHD: the planted right-hemisphere effect
  assert max(abs(np.log(ratios[0]))) < 0.15, ratios  # controls: symmetric
  # Atlas outputs: patch map rows are brain patches with regions and world positions.
  with open(prepared_dir / "patch_map.csv", newline="") as f:
    patch_rows = list(csv.DictReader(f))
  assert patch_rows and all(r["region"] for r in patch_rows)
  assert {r["hemisphere"] for r in patch_rows} >= {"L", "R"}
  assert (prepared_dir / prepare.EXAMPLE_FIGURE).stat().st_size > 10_000


def _write(path, volume, affine, tr=2.0):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image = nib.Nifti1Image(volume.astype(np.float32), affine)
  image.header.set_xyzt_units("mm", "sec")
  image.header["pixdim"][4] = tr
  nib.save(image, path)


def _scan(root, sid):
  return os.path.join(root, "NYU", sid, f"sfnwmrda{sid}_session_1_rest_1.nii.gz")


@pytest.fixture(scope="module")
def bad_layout(athena_dir, tmp_path_factory):
  """One site with two good scans and one scan per kind of bad input."""
  root = tmp_path_factory.mktemp("bad")
  good = sorted(athena_dir.glob("NYU/*/*.nii.gz"))
  image = nib.load(good[0])
  run, affine = np.asarray(image.dataobj), image.affine
  for i, path in enumerate(good[:2]):
    sid = f"100000{i}"
    os.makedirs(os.path.dirname(_scan(root, sid)))
    shutil.copy(path, _scan(root, sid))
  blob = open(good[0], "rb").read()
  os.makedirs(os.path.dirname(_scan(root, "2000001")))
  with open(_scan(root, "2000001"), "wb") as f:  # truncated gzip
    f.write(blob[:len(blob) * 6 // 10])
  _write(_scan(root, "2000002"), run[..., 0], affine)             # 3D
  _write(_scan(root, "2000003"), run[..., :2], affine)            # too few frames
  nan_frame = run.copy()
  nan_frame[..., 3] = np.nan
  _write(_scan(root, "2000004"), nan_frame, affine)               # a NaN frame
  shifted = affine.copy()
  shifted[0, 3] += 150.0
  _write(_scan(root, "2000005"), run, shifted)                    # not on MNI
  os.makedirs(os.path.dirname(_scan(root, "2000006")))
  shutil.copy(os.path.join(nibabel_data, "example4d.nii.gz"), _scan(root, "2000006"))
  pending = _scan(root, "2000008")
  os.makedirs(os.path.dirname(pending))
  shutil.copy(good[1], pending)                                   # DX pending
  qc = _scan(root, "2000009")
  os.makedirs(os.path.dirname(qc))
  shutil.copy(good[1], qc)                                        # failed QC
  few_nans = run.copy()
  few_nans[23:25, 29:31, 23:25, 5] = np.nan
  _write(_scan(root, "2000010"), few_nans, affine)                # a few NaN voxels: kept
  with open(os.path.join(root, "NYU", "NYU_phenotypic.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["ScanDir ID", "Site", "Gender", "Age", "DX", "QC_Rest_1"])
    for sid, dx, qc_value in [("1000000", 0, 1), ("1000001", 1, 1), ("2000001", 1, 1),
                              ("2000002", 0, 1), ("2000003", 0, 1), ("2000004", 1, 1),
                              ("2000005", 0, 1), ("2000006", 0, 1), ("2000007", 1, 1),
                              ("2000008", "pending", 1), ("2000009", 1, 0),
                              ("2000010", 2, 1)]:
      w.writerow([sid, 1, 0, 10.0, dx, qc_value])
  return root


def test_bad_scans_are_reported_and_the_rest_prepared(bad_layout, tmp_path):
  workdir = tmp_path / "out"
  tasks.run_task(prepare_config(bad_layout), str(workdir))
  report = {r["subject"]: r for r in prepare.read_report(str(workdir))}
  expected = {
      "2000001": "corrupt or truncated gzip",
      "2000002": "single 3D volume",
      "2000003": "too few frames: 2",
      "2000004": "frame 3 is NaN/inf in every voxel",
      "2000005": "field of view covers",
      "2000006": "too few frames: 2",
      "2000007": "missing file",
      "2000009": "failed quality control (QC_Rest_1 = 0)",
  }
  for sid, reason in expected.items():
    assert report[sid]["status"] == "skipped", report[sid]
    assert reason in report[sid]["reason"], report[sid]
  assert sid in report[sid]["path"]
  # nibabel's real oblique 2-frame EPI: every header problem is named.
  for reason in ("oblique affine", "field of view covers"):
    assert reason in report["2000006"]["reason"]
  used = {r["subject"]: r for r in _index(workdir)}
  assert set(used) == {"1000000", "1000001", "2000008", "2000010"}
  assert used["2000008"]["label"] == "-1" and "pending" in report["2000008"]["reason"]
  assert used["2000010"]["label"] == "1"  # DX 2 is an ADHD subtype
  assert 0 < float(used["2000010"]["nonfinite_voxels"]) < 0.01
  data = shards.PreparedDataset(str(workdir))
  for i in range(len(data)):
    assert np.isfinite(data.frames(i, 0, data.rows[i]["frames"])).all()
  assert not list((workdir / "shards").glob("*.tmp"))


def test_nothing_usable_is_an_input_error(bad_layout, tmp_path):
  root = tmp_path / "only_bad"
  shutil.copytree(bad_layout / "NYU" / "2000002", root / "NYU" / "2000002")
  with pytest.raises(errors.InputError, match="no usable scan"):
    tasks.run_task(prepare_config(root), str(tmp_path / "out"))
  assert "single 3D volume" in prepare.read_report(str(tmp_path / "out"))[0]["reason"]


def _prepare_cli(input_dir, workdir, *overrides):
  cmd = [sys.executable, "-m", "roi_mae_jax.main", "--config=configs/prepare.py:test",
         f"--workdir={workdir}", f"--config.input_dir={input_dir}", *overrides]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_interrupted_prepare_resumes_to_the_same_shards(athena_dir, prepared_dir, tmp_path):
  workdir = tmp_path / "resumed"
  crashed = _prepare_cli(athena_dir, workdir, "--config.fault_kill_after_scans=3")
  assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
  assert len(list((workdir / "shards").glob("*.json"))) == 3
  assert not (workdir / shards.INDEX_FILE).exists()
  (workdir / "shards" / "KKI_leftover.array_record.tmp").write_bytes(b"cut off")
  tasks.run_task(prepare_config(athena_dir, workers=2), str(workdir))  # processes
  report = prepare.read_report(str(workdir))
  assert sum("earlier run" in r["reason"] for r in report) == 3
  assert (workdir / shards.INDEX_FILE).read_text() == (prepared_dir / shards.INDEX_FILE).read_text()
  for shard in (prepared_dir / "shards").glob("*.array_record"):
    assert (workdir / "shards" / shard.name).read_bytes() == shard.read_bytes(), shard.name
  assert not list((workdir / "shards").glob("*.tmp"))


def test_other_settings_are_refused_unless_overwrite(athena_dir, tmp_path):
  root = tmp_path / "two"
  for path in sorted(athena_dir.glob("NYU/*"))[:2]:
    shutil.copytree(path, root / "NYU" / path.name)
  workdir = str(tmp_path / "out")
  tasks.run_task(prepare_config(root), workdir)
  before = _index(workdir)
  # The same config over shards made with another atlas on the grid (an earlier
  # resampling wrote no fingerprint): refused, nothing touched.
  info_path = os.path.join(workdir, shards.DATASET_FILE)
  info = json.loads(open(info_path).read())
  del info["atlas_sha1"]
  open(info_path, "w").write(json.dumps(info))
  with pytest.raises(errors.InputError, match=r"dataset.json: the 2 scans .* another atlas_sha1"):
    tasks.run_task(prepare_config(root), workdir)
  assert _index(workdir) == before
  with pytest.raises(errors.InputError, match="different settings"):
    tasks.run_task(prepare_config(root, normalise="voxel"), workdir)
  assert _index(workdir) == before
  tasks.run_task(prepare_config(root, normalise="voxel", overwrite=True), workdir)
  assert shards.read_info(workdir).normalise == "voxel"
  data = shards.PreparedDataset(workdir)
  run = data.frames(0, 0, data.rows[0]["frames"])
  brain = run.std(-1) > 0
  np.testing.assert_allclose(run[brain].mean(-1), 0, atol=2e-3)  # voxel-wise z
  np.testing.assert_allclose(run[brain].std(-1), 1, atol=2e-2)


def test_gzip_error_types_are_named(tmp_path):
  path = tmp_path / "x.nii.gz"
  with gzip.open(path, "wb") as f:
    f.write(b"not a nifti header at all" * 20)
  from roi_mae_jax.data import nifti
  rules = nifti.ScanRules(target_tr=2.0, min_frames=4)
  with pytest.raises(nifti.ScanRejected, match="not a readable NIfTI"):
    nifti.open_scan(str(path), rules, np.zeros((1, 3)))
  with pytest.raises(nifti.ScanRejected, match="missing file"):
    nifti.open_scan(str(tmp_path / "absent.nii.gz"), rules, np.zeros((1, 3)))
