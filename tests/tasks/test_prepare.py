"""Task prepare: ADHD-200 files in LAS, bad input reported per scan, resume, overwrite."""

import csv
import dataclasses
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
from roi_mae_jax.data import denoise
from roi_mae_jax.data import layouts
from roi_mae_jax.data import nifti
from roi_mae_jax.data import shards
from roi_mae_jax.tasks import prepare


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
  from roi_mae_jax.brain import atlas as atlas_lib
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


@pytest.mark.slow
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
  rules = nifti.ScanRules(target_tr=2.0, min_frames=4)
  with pytest.raises(nifti.ScanRejected, match="not a readable NIfTI"):
    nifti.open_scan(str(path), rules, np.zeros((1, 3)))
  with pytest.raises(nifti.ScanRejected, match="missing file"):
    nifti.open_scan(str(tmp_path / "absent.nii.gz"), rules, np.zeros((1, 3)))


# --- Denoising ------------------------------------------------------------------

DENOISE_TR, DENOISE_FRAMES = 2.0, 80


def _denoise_signals(seed=0):
  """(confound, in-band sine, 0.2 Hz sine, run) on an 8 mm MNI grid: every voxel mixes them."""
  from roi_mae_jax.brain import grids
  rng = np.random.default_rng(seed)
  t = np.arange(DENOISE_FRAMES) * DENOISE_TR
  confound = np.sin(2 * np.pi * 0.03125 * t + 1.0) + 0.7 * np.sin(2 * np.pi * 0.0625 * t)
  kept, fast = np.sin(2 * np.pi * 0.05 * t), np.sin(2 * np.pi * 0.2 * t)
  grid = grids.mni_grid(8.0)
  shape = grid.shape
  gains = [rng.uniform(1, 2, shape + (1,)) for _ in range(3)]
  run = (100 + gains[0] * confound + gains[1] * kept + gains[2] * fast +
         0.05 * rng.standard_normal(shape + (DENOISE_FRAMES,)))
  return confound, kept, fast, run, grid.affine


def _drift(frames, rng):
  """(frames, 6) slow linear head drift (mm / rad)."""
  return np.outer(np.arange(frames), rng.uniform(-1e-3, 1e-3, 6))


def _fmriprep_confounds_tsv(path, confound, rng, **extra):
  """fMRIPrep's columns for the 'simple' strategy (and `extra`); `confound` planted as csf."""
  columns = {}
  # Slow head drift: random motion columns would, 24 of them in 80 frames, take most of
  # the band with them.
  drift = _drift(len(confound), rng)
  for base, v in zip(("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"), drift.T):
    d = np.r_[np.nan, np.diff(v)]
    columns.update({base: v, f"{base}_derivative1": d, f"{base}_power2": v ** 2,
                    f"{base}_derivative1_power2": d ** 2})
  columns.update(white_matter=drift[:, 0] ** 3, csf=confound,
                 non_steady_state_outlier00=np.eye(len(confound))[0], **extra)
  with open(path, "w") as f:
    f.write("\t".join(columns) + "\n")
    for t in range(len(confound)):
      f.write("\t".join("n/a" if np.isnan(c[t]) else f"{c[t]:.6g}" for c in columns.values())
              + "\n")
  with open(path.replace(".tsv", ".json"), "w") as f:
    json.dump({"csf": {"Method": "Mean"}}, f)


@pytest.fixture(scope="module")
def denoise_layouts(tmp_path_factory):
  """One run in three layouts: fMRIPrep (+ confounds tsv/json), nilearn ADHD (+ regressors
  csv; a second subject without one), Athena sfnwmrda."""
  root = tmp_path_factory.mktemp("denoise")
  confound, kept, fast, run, affine = _denoise_signals()
  rng = np.random.default_rng(1)
  func = root / "fmriprep" / "sub-01" / "func"
  bold = str(func / "sub-01_task-rest_space-MNI152NLin2009cAsym_desc-preproc_bold.nii.gz")
  _write(bold, run, affine, DENOISE_TR)
  (func / "sub-01_task-rest_space-MNI152NLin2009cAsym_desc-preproc_bold.json").write_text(
      json.dumps({"RepetitionTime": DENOISE_TR}))
  _fmriprep_confounds_tsv(str(func / "sub-01_task-rest_desc-confounds_timeseries.tsv"),
                          confound, rng)
  nilearn_root = root / "nilearn"
  for sid in ("0010042", "0010064"):
    _write(str(nilearn_root / "data" / sid / f"{sid}_rest_tshift_RPI_voreg_mni.nii.gz"), run,
           affine, DENOISE_TR)
  motion = _drift(DENOISE_FRAMES, rng)
  with open(nilearn_root / "data" / "0010042" / "0010042_regressors.csv", "w") as f:
    f.write("\t".join(["csf", "wm"] + [f"motion-{m}" for m in ("pitch", "roll", "yaw", "x", "y",
                                                              "z")]) + "\n")
    for t in range(DENOISE_FRAMES):
      f.write("\t".join(f"{v:.6g}" for v in [confound[t], 0.0] + list(motion[t])) + "\n")
  (nilearn_root / layouts.NILEARN_PHENOTYPES).write_text(
      'Subject,site,adhd\n10042,"NYU",1\n10064,"NYU",0\n')
  _write(_scan(str(root / "athena"), "1000000"), run, affine, DENOISE_TR)
  return root, confound, kept, fast


def _prepared_series(workdir):
  """(brain voxels, frames) of the first prepared scan, and its index row."""
  data = shards.PreparedDataset(str(workdir))
  run = data.frames(0, 0, data.rows[0]["frames"])
  brain = run.std(-1) > 0
  return run[brain], _index(workdir)[0]


def _corr(series, regressor):
  s = series - series.mean(1, keepdims=True)
  r = regressor - regressor.mean()
  return (s @ r) / np.linalg.norm(s, axis=1) / np.linalg.norm(r)


def _amplitude(series, frequency):
  """Mean amplitude of the `frequency` sine, fitted jointly with the other planted ones."""
  t = np.arange(series.shape[1]) * DENOISE_TR
  planted = (0.03125, 0.05, 0.0625, 0.2)
  waves = [f(2 * np.pi * hz * t) for hz in planted for f in (np.cos, np.sin)]
  design = np.stack(waves + [np.ones_like(t)], axis=1)
  coef = np.linalg.lstsq(design, series.T, rcond=None)[0]
  i = 2 * planted.index(frequency)
  return np.hypot(coef[i], coef[i + 1]).mean()


@pytest.mark.slow
def test_denoising_per_layout_removes_confounds_and_out_of_band_signal(denoise_layouts,
                                                                       tmp_path):
  root, confound, kept, fast = denoise_layouts
  runs = {"fmriprep": ("fmriprep", dict(label_column="")),
          "nilearn_adhd": ("nilearn", {}), "adhd200": ("athena", {})}
  out = {}
  for source, (folder, extra) in runs.items():
    workdir = tmp_path / source
    tasks.run_task(prepare_config(root / folder, source=source, frames=8, **extra),
                   str(workdir))
    out[source] = _prepared_series(workdir) + (prepare.read_report(str(workdir)),)
  raw, row, _ = out["adhd200"]  # Athena sfnwmrda: already denoised, left as it is
  assert row["denoise"].startswith("none (Athena sfnwmrda") and row["confounds"] == ""
  assert row["detrend"] == "False" and row["high_pass_hz"] == row["low_pass_hz"] == ""
  assert np.abs(_corr(raw, confound)).mean() > 0.4
  assert _amplitude(raw, 0.2) > 0.5 * _amplitude(raw, 0.05)
  for source, offset in (("fmriprep", 1), ("nilearn_adhd", 0)):
    series, row, report = out[source]
    aligned = confound[offset:]  # fMRIPrep marks frame 0 non-steady-state: dropped
    assert int(row["frames"]) == DENOISE_FRAMES - offset
    assert int(row["dropped_frames"]) == offset
    assert np.abs(_corr(series, aligned)).mean() < 0.05, source
    assert _amplitude(series, 0.2) < 0.05 * _amplitude(series, 0.05), source
    assert _amplitude(series, 0.05) > 0.5 * _amplitude(raw, 0.05)  # the band stays
    assert row["detrend"] == "True" and float(row["high_pass_hz"]) == 0.01
    assert float(row["low_pass_hz"]) == 0.1
    used = [r for r in report if r["status"] == "used"]
    assert [r["denoise"] for r in used] == [row["denoise"]]
    assert "band 0.01-0.1 Hz" in row["denoise"] and "detrend" in row["denoise"]
  assert out["fmriprep"][1]["confounds"] == "fmriprep:simple"
  assert int(out["fmriprep"][1]["confound_count"]) == 26   # 24 motion + wm + csf
  assert out["nilearn_adhd"][1]["confounds"] == "nilearn_adhd"
  assert int(out["nilearn_adhd"][1]["confound_count"]) == 8
  missing = {r["subject"]: r for r in out["nilearn_adhd"][2]}["0010064"]
  assert missing["status"] == "skipped"
  assert "0010064_regressors.csv is missing" in missing["reason"]


def test_denoise_plan_follows_the_file_name_and_config():
  rules = denoise.DenoiseRules()
  names = {"sub-01_task-rest_space-MNI152NLin6Asym_desc-preproc_bold.nii.gz": ("fmriprep", True),
           "0010042_rest_tshift_RPI_voreg_mni.nii.gz": ("nilearn_adhd", True),
           "sfnwmrda0010042_session_1_rest_1.nii.gz": ("", False),
           "snwmrda0010042_session_1_rest_1.nii.gz": ("", True),   # not band-passed yet
           "scan.nii.gz": ("", False)}
  for name, expected in names.items():
    plan = denoise.plan_for(f"/d/{name}", rules)
    assert (plan.confounds, plan.filter) == expected, name
  forced = dataclasses.replace(rules, apply="on")
  assert denoise.plan_for("/d/sfnwmrda1_session_1_rest_1.nii.gz", forced).filter
  assert denoise.plan_for("/d/scan.nii.gz", forced).filter
  off = dataclasses.replace(rules, apply="off")
  assert not any(denoise.plan_for(f"/d/{n}", off).active for n in names)
  # A low-pass at or over Nyquist is no low-pass (and the index says so).
  plan = denoise.plan_for("/d/snwmrda1_session_1_rest_1.nii.gz", rules)
  assert denoise.band(plan, 2.0) == (0.01, 0.1) and denoise.band(plan, 5.0) == (0.01, None)
  assert denoise.describe(plan, 5.0, denoise.Confounds(None, ""))["denoise"].startswith(
      "detrend, band 0.01-Nyquist Hz (Athena snwmrda")


def test_confound_files_missing_censoring_or_short_are_scan_reasons(denoise_layouts, tmp_path):
  root, confound, _, _ = denoise_layouts
  func = tmp_path / "sub-01" / "func"
  shutil.copytree(root / "fmriprep" / "sub-01" / "func", func)
  bold = str(next(func.glob("*_bold.nii.gz")))
  plan = denoise.plan_for(bold, denoise.DenoiseRules())
  assert denoise.load_confounds(bold, plan, DENOISE_FRAMES).values.shape == (DENOISE_FRAMES, 26)
  with pytest.raises(nifti.ScanRejected, match="confounds .* have 80 rows for 90 frames"):
    denoise.load_confounds(bold, plan, 90)
  # Scrubbing censors frames inside the run: windows need evenly spaced frames.
  spikes = np.zeros(DENOISE_FRAMES)
  spikes[40] = 2.0
  tsv = str(func / "sub-01_task-rest_desc-confounds_timeseries.tsv")
  wm_csf = {f"{c}_{s}": np.r_[np.nan, np.zeros(DENOISE_FRAMES - 1)] if "derivative" in s
            else np.zeros(DENOISE_FRAMES) for c in ("csf", "white_matter")
            for s in ("derivative1", "power2", "derivative1_power2")}
  _fmriprep_confounds_tsv(tsv, confound, np.random.default_rng(0),
                          framewise_displacement=spikes, std_dvars=np.ones(DENOISE_FRAMES),
                          **wm_csf)
  scrub = denoise.plan_for(bold, denoise.DenoiseRules(strategy="scrubbing"))
  with pytest.raises(nifti.ScanRejected, match="'scrubbing' censors .* frames inside the run"):
    denoise.load_confounds(bold, scrub, DENOISE_FRAMES)
  os.remove(tsv)
  with pytest.raises(nifti.ScanRejected, match="fMRIPrep confounds file is missing \\(expected "
                     ".*sub-01_task-rest_desc-confounds_timeseries.tsv and its .json"):
    denoise.load_confounds(bold, plan, DENOISE_FRAMES)
  bad = tmp_path / "0010042_regressors.csv"
  bad.write_text("csf\twm\n1\t2\nx\t3\n")
  with pytest.raises(nifti.ScanRejected, match="0010042_regressors.csv line 3 is not numbers"):
    denoise.read_regressors(str(bad))




def test_denoise_clean_is_nilearns_clean_on_the_rows_with_data():
  """The vectorised filter gives nilearn.signal.clean's own result; rows without data stay 0."""
  from nilearn import signal
  rng = np.random.default_rng(0)
  values = (100 + rng.standard_normal((40, DENOISE_FRAMES))).astype(np.float32)
  regressors = rng.standard_normal((DENOISE_FRAMES, 3))
  rows = np.arange(0, 40, 2)
  plan = denoise.plan_for("/d/sub-01_task-rest_desc-preproc_bold.nii.gz", denoise.DenoiseRules())
  out = denoise.clean(values, rows, DENOISE_TR, plan, denoise.Confounds(regressors, "", 2))
  expected = signal.clean(values[rows, 2:].T.astype(np.float64), detrend=True,
                          standardize=denoise._no_standardize(), confounds=regressors[2:],
                          filter="butterworth", high_pass=0.01, low_pass=0.1, t_r=DENOISE_TR).T
  assert out.shape == (40, DENOISE_FRAMES - 2)
  np.testing.assert_allclose(out[rows], expected, atol=1e-5)
  assert not out[1::2].any()
