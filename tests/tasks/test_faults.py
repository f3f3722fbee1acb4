"""Faults and bad input: workdir locks, config values, damaged checkpoints, a full disk."""

import errno
import os
import shutil
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, load_config, prepare_config
from roi_mae_jax import errors
from roi_mae_jax import outputs
from roi_mae_jax import tasks
from roi_mae_jax import workdir_lock
from roi_mae_jax.training import checkpoint as checkpoint_lib
from roi_mae_jax.training import seals


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "roi_mae_jax.main", *args], cwd=REPO,
                        capture_output=True, text=True, env=env, timeout=300)


def _error_lines(stderr):
  return [line for line in stderr.splitlines() if line.startswith("error:")]


# --- One writer per workdir ---------------------------------------------------

HOLDER = """
import sys, time
from roi_mae_jax import workdir_lock
workdir_lock.WorkdirLock(sys.argv[1], "pretrain").acquire()
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture
def held_workdir(tmp_path):
  """A workdir whose lock another live process holds; yields (workdir, that process)."""
  workdir = tmp_path / "run"
  holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "held"
  yield workdir, holder
  if holder.poll() is None:
    holder.kill()
  holder.wait()


@pytest.mark.slow
def test_second_writer_gets_one_line_naming_the_holder_then_a_dead_one_is_taken_over(
    held_workdir):
  workdir, holder = held_workdir
  done = _cli("--config=configs/pretrain_aal3.py:test", f"--workdir={workdir}")
  assert done.returncode == 2, done.stderr[-2000:]
  lines = _error_lines(done.stderr)
  assert len(lines) == 1 and "Traceback" not in done.stderr
  assert f"PID {holder.pid} on host {socket.gethostname()}" in lines[0]
  assert "task pretrain" in lines[0]
  assert sorted(os.listdir(workdir)) == [workdir_lock.LOCK_FILE]  # nothing written
  holder.kill()  # SIGKILL: the lock file still names it, but its flock is gone
  holder.wait()
  assert workdir_lock.read_holder(workdir_lock.lock_path(str(workdir)))["pid"] == holder.pid
  with workdir_lock.WorkdirLock(str(workdir), "prepare") as lock:
    assert workdir_lock.read_holder(lock.path)["pid"] == os.getpid()
  assert workdir_lock.read_holder(lock.path) == {}  # released


def test_a_refused_prepare_leaves_the_live_run_files_alone(held_workdir, athena_dir):
  workdir, holder = held_workdir
  in_flight = workdir / "shards" / "NYU_1.array_record.tmp"
  in_flight.parent.mkdir(parents=True)
  in_flight.write_bytes(b"being written")
  with pytest.raises(errors.InputError, match=f"in use by PID {holder.pid}"):
    tasks.run_task(prepare_config(athena_dir), str(workdir))
  assert in_flight.read_bytes() == b"being written"


def test_overwrite_in_another_tasks_workdir_deletes_nothing(athena_dir, tmp_path):
  workdir = tmp_path / "pretrain_run"
  workdir.mkdir()
  pretrain = load_config("pretrain_aal3", "test")
  outputs.write_config(str(workdir), pretrain)
  before = (workdir / "config.json").read_text()
  with pytest.raises(errors.InputError, match="holds a 'pretrain' run"):
    tasks.run_task(prepare_config(athena_dir, overwrite=True), str(workdir))
  assert (workdir / "config.json").read_text() == before


# --- Config values (the rules: tests/config/test_validation.py) -----------------------

@pytest.mark.slow
def test_cli_misspelt_key_and_bad_value_are_one_line_with_status_2(tmp_path):
  done = _cli("--config=configs/pretrain_aal3.py:test", f"--workdir={tmp_path}",
              "--config.mask.ratoi=0.3")
  assert done.returncode == 2 and "Traceback" not in done.stderr
  assert _error_lines(done.stderr) == [
      "error: --config.mask.ratoi: no config key 'ratoi' (did you mean \"ratio\" instead of "
      "\"ratoi\"?)"]
  done = _cli("--config=configs/pretrain_aal3.py:test", f"--workdir={tmp_path}",
              "--config.log_every=0")
  assert done.returncode == 2 and "Traceback" not in done.stderr
  assert _error_lines(done.stderr) == [
      "error: config.log_every = 0 must be a whole number >= 1"]
  done = _cli("--config=configs/nothere.py", f"--workdir={tmp_path}")
  assert done.returncode == 2 and "Traceback" not in done.stderr
  assert "configs/nothere.py" in _error_lines(done.stderr)[0]


def test_resume_with_another_total_steps_is_refused(tmp_path):
  config = load_config("pretrain_aal3", "test")
  outputs.write_config(str(tmp_path), config)  # as a 6-step run leaves it
  config.total_steps = 10
  with pytest.raises(errors.InputError, match=r"total_steps=10 differs .* \(6 steps\).*"
                     r"--config.total_steps=6"):
    tasks.run_task(config, str(tmp_path))


# --- Checkpoints ---------------------------------------------------------------

def _largest_file(folder):
  files = [os.path.join(r, n) for r, _, names in os.walk(folder) for n in names]
  return max(files, key=os.path.getsize)


def _flip_bit(path):
  raw = bytearray(open(path, "rb").read())
  raw[len(raw) // 2] ^= 0x01
  open(path, "wb").write(bytes(raw))


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


DAMAGE = {
    "flipped bit": (lambda step_dir: _flip_bit(_largest_file(step_dir / "state")),
                    "changed on disk"),
    "truncated file": (lambda step_dir: _truncate(_largest_file(step_dir / "state")),
                       "bytes, "),
    "deleted _METADATA": (lambda step_dir: os.remove(step_dir / "state" / "_METADATA"),
                          "state/_METADATA is missing"),
}


def _small_checkpoints(directory, steps=(1, 2, 3)):
  ckpt = checkpoint_lib.Checkpointer(str(directory), keep=5)
  for step in steps:
    ckpt.save(step, {"w": jnp.full((64, 64), float(step)), "step": jnp.int32(step)})
  ckpt.close()
  return {"w": jax.ShapeDtypeStruct((64, 64), jnp.float32),
          "step": jax.ShapeDtypeStruct((), jnp.int32)}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_checkpoint_is_named_and_the_newest_intact_one_used(tmp_path, damage):
  abstract = _small_checkpoints(tmp_path / "ckpt")
  for step in (1, 2, 3):
    assert seals.verify(str(tmp_path / "ckpt" / str(step))) is None
  harm, reason = DAMAGE[damage]
  harm(tmp_path / "ckpt" / "3")
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "ckpt"))
  state, _ = ckpt.restore(abstract)
  assert int(state["step"]) == 2 and float(state["w"][0, 0]) == 2.0
  [(step, folder, problem)] = ckpt.rejected
  assert step == 3 and folder == str(tmp_path / "ckpt" / "3") and reason in problem
  with pytest.raises(errors.InputError, match=f"{tmp_path / 'ckpt' / '3'} .*{reason}"):
    ckpt.restore(abstract, step=3)  # a step asked for by number is not replaced
  moved = ckpt.set_aside_rejected()
  assert moved == [str(tmp_path / "ckpt.rejected" / "3")] and os.path.isdir(moved[0])
  assert ckpt.all_steps() == [1, 2]
  ckpt.close()


def test_unsealed_newest_is_passed_over_and_all_damaged_is_an_error(tmp_path):
  abstract = _small_checkpoints(tmp_path / "ckpt")
  os.remove(tmp_path / "ckpt" / "3" / seals.MANIFEST)
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "ckpt"))
  assert int(ckpt.restore(abstract)[0]["step"]) == 2
  assert seals.UNSEALED in ckpt.rejected[0][2]
  for step in (1, 2):
    _flip_bit(_largest_file(tmp_path / "ckpt" / str(step) / "state"))
  with pytest.raises(errors.InputError, match="no usable checkpoint") as info:
    ckpt.restore(abstract)
  for step in (1, 2, 3):
    assert str(tmp_path / "ckpt" / str(step)) in str(info.value)
  ckpt.close()


def _params(workdir):
  from roi_mae_jax.downstream import pretrained  # pylint: disable=g-import-not-at-top
  return jax.device_get(pretrained.load_pretrained(str(workdir)).params)


@pytest.mark.slow
def test_run_resumes_from_the_newest_intact_checkpoint_to_the_same_numbers(
    pretrained_dir, tmp_path):
  workdir = tmp_path / "copy"
  shutil.copytree(pretrained_dir, workdir)
  expected = _params(workdir)
  _flip_bit(_largest_file(workdir / "checkpoints" / "6" / "state"))
  tasks.run_task(load_config("pretrain_aal3", "test"), str(workdir))
  assert os.path.isdir(workdir / "checkpoints.rejected" / "6")
  assert seals.verify(str(workdir / "checkpoints" / "6")) is None
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(_params(workdir))):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_disk_full_names_the_checkpoint_kept(tmp_path, monkeypatch):
  save = checkpoint_lib.Checkpointer.save

  def save_until_full(self, step, *args, **kwargs):
    if step > 2:
      raise OSError(errno.ENOSPC, "No space left on device", str(self.step_dir(step)))
    return save(self, step, *args, **kwargs)

  monkeypatch.setattr(checkpoint_lib.Checkpointer, "save", save_until_full)
  with pytest.raises(errors.TrainingError) as info:
    tasks.run_task(load_config("pretrain_aal3", "test"), str(tmp_path))
  message = str(info.value)
  assert "no space left on device" in message and "\n" not in message
  assert f"checkpoint step 2 in {tmp_path / 'checkpoints'} is kept" in message
  assert seals.verify(str(tmp_path / "checkpoints" / "2")) is None


# --- Prepare: nothing dropped or mislabelled silently ------------------------------

def _header_only_scan(path, srow):
  """A small 4D scan whose sform is `srow` (3x4), written without nibabel's checks."""
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  data = np.random.default_rng(0).random((4, 4, 4, 6)).astype(np.float32)
  header = nib.Nifti1Header()
  header.set_data_shape(data.shape)
  header.set_data_dtype(np.float32)
  header["srow_x"], header["srow_y"], header["srow_z"] = np.asarray(srow, float)
  header["sform_code"], header["qform_code"] = 1, 0
  header["pixdim"][4] = 2.0
  nib.save(nib.Nifti1Image(data, None, header), str(path))


def test_manifest_keys_constant_scans_and_affines_are_all_accounted_for(athena_dir, tmp_path):
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  from roi_mae_jax.data import shards  # pylint: disable=g-import-not-at-top
  from roi_mae_jax.tasks import prepare  # pylint: disable=g-import-not-at-top
  good = sorted(str(p) for p in athena_dir.glob("*/*/*.nii.gz"))
  image = nib.load(good[0])
  run = np.asarray(image.dataobj, np.float32)
  constant, static = tmp_path / "constant.nii.gz", tmp_path / "static.nii.gz"
  nib.save(nib.Nifti1Image(np.full(run.shape, 100.0, np.float32), image.affine,
                           image.header), str(constant))
  nib.save(nib.Nifti1Image(np.repeat(run[..., :1], run.shape[-1], -1), image.affine,
                           image.header), str(static))
  _header_only_scan(tmp_path / "nan_affine.nii.gz", np.full((3, 4), np.nan))
  _header_only_scan(tmp_path / "singular.nii.gz", [[4, 0, 0, 0], [0, 0, 0, 0], [0, 0, 4, 0]])
  lines = ["path,subject,site,label"]
  lines += [f"{path},{subject},X,0" for path, subject in zip(good, ["s 1", "s_1", "s/1", "s_1_2"])]
  lines += [f"{good[0]},again,X,1",  # the same file twice
            f"{constant},c,X,0", f"{static},st,X,0", f"{tmp_path / 'nan_affine.nii.gz'},n,X,0",
            f"{tmp_path / 'singular.nii.gz'},z,X,0"]
  (tmp_path / "scans.csv").write_text("\n".join(lines) + "\n")
  workdir = tmp_path / "out"
  tasks.run_task(prepare_config(tmp_path, source="manifest",
                                manifest=str(tmp_path / "scans.csv")), str(workdir))
  used = {r["scan"]: r for r in shards.PreparedDataset(str(workdir)).rows}
  assert sorted(used) == ["s_1", "s_1_2", "s_1_3", "s_1_4"]
  assert {r["subject"] for r in used.values()} == {"s 1", "s_1", "s/1", "s_1_2"}
  assert {r["path"] for r in used.values()} == set(good[:4])
  assert used["s_1_2"]["subject"] == "s_1_2"  # its own key, not taken by a renamed scan
  assert len(list((workdir / "shards").glob("*.array_record"))) == 4
  report = {r["subject"]: r for r in prepare.read_report(str(workdir))}
  assert len(prepare.read_report(str(workdir))) == 9  # every manifest line
  assert "scan key s_1_3" in report["s_1"]["reason"]
  assert "scan key s_1_4" in report["s/1"]["reason"]
  expected = {"again": "the same file as line 2",
              "c": "constant values: every brain voxel is 100 in every frame",
              "st": "the signal changes over time in only 0%",
              "n": "the affine (sform/qform) has NaN or inf entries",
              "z": "the affine is singular"}
  for subject, reason in expected.items():
    assert report[subject]["status"] == "skipped" and reason in report[subject]["reason"], \
        report[subject]
  assert "voxel sizes" not in report["n"]["reason"]


# --- Damaged shards -------------------------------------------------------------

def _first_shard(workdir):
  return sorted((workdir / "shards").glob("*.array_record"))[0]


@pytest.mark.slow
def test_truncated_or_short_shard_stops_with_one_line_naming_it(prepared_dir, tmp_path):
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  from roi_mae_jax.data import shards  # pylint: disable=g-import-not-at-top
  truncated = tmp_path / "truncated"
  shutil.copytree(prepared_dir, truncated)
  _truncate(_first_shard(truncated))
  done = _cli("--config=configs/pretrain_aal3.py:test", f"--workdir={tmp_path / 'run'}",
              f"--config.data.shards={truncated}")
  assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
  [line] = _error_lines(done.stderr)
  assert f"{_first_shard(truncated)} is not a readable shard" in line
  short = tmp_path / "short"
  shutil.copytree(prepared_dir, short)
  shard = _first_shard(short)
  writer = array_record_module.ArrayRecordWriter(str(shard), "group_size:1")
  for _ in range(3):
    writer.write(b"\0" * 8)
  writer.close()
  with pytest.raises(errors.InputError, match=f"{shard} holds 3 frames but .*index.csv says 16"):
    shards.PreparedDataset(str(short))


def test_damaged_bytes_in_a_shard_are_named_when_read(prepared_dir, tmp_path):
  from roi_mae_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "flipped"
  shutil.copytree(prepared_dir, workdir)
  shard = _first_shard(workdir)
  raw = bytearray(shard.read_bytes())
  raw[len(raw) // 3] ^= 0xFF
  shard.write_bytes(bytes(raw))
  source = pipeline.ShardWindows(str(workdir), frames=4)
  iterator = pipeline.make_iterator(pipeline.training_dataset(source, 8, seed=0))
  with pytest.raises(errors.InputError, match=f"{shard}: frames .* are unreadable"):
    for _ in range(4):  # 8 scans per batch: every scan is read
      next(iterator)


def test_disk_full_during_prepare_stops_and_keeps_finished_scans(athena_dir, tmp_path,
                                                                 monkeypatch):
  from roi_mae_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  real, calls = preprocess.prepare_scan, []

  def fill_disk_after_two(entry, job, workdir):
    calls.append(entry.scan)
    if len(calls) > 2:
      raise OSError(errno.ENOSPC, "No space left on device", workdir)
    return real(entry, job, workdir)

  monkeypatch.setattr(preprocess, "prepare_scan", fill_disk_after_two)
  workdir = tmp_path / "out"
  with pytest.raises(errors.TrainingError, match="no space left on device .* the 2 finished "
                     "scans are kept: free space and re-run"):
    tasks.run_task(prepare_config(athena_dir), str(workdir))
  assert len(calls) == 3  # stopped at the first failure, not one 'skipped' per scan
  assert len(list((workdir / "shards").glob("*.json"))) == 2


# --- Uploaded archives (the notebook) -------------------------------------------------

def test_archives_never_write_outside_their_folder(tmp_path):
  import io  # pylint: disable=g-import-not-at-top
  import tarfile  # pylint: disable=g-import-not-at-top
  import zipfile  # pylint: disable=g-import-not-at-top
  from roi_mae_jax import archives  # pylint: disable=g-import-not-at-top
  good = tmp_path / "run.zip"
  with zipfile.ZipFile(good, "w") as z:
    z.writestr("run/config.json", "{}")
    z.writestr("run/checkpoints/6/state/_METADATA", "x")
  dest = archives.extract(str(good), str(tmp_path / "ok"))
  assert (tmp_path / "ok" / "run" / "config.json").read_text() == "{}" and os.path.isdir(dest)
  evil_zip = tmp_path / "evil.zip"
  with zipfile.ZipFile(evil_zip, "w") as z:
    z.writestr("run/config.json", "{}")
    z.writestr("../../escaped.txt", "owned")
  with pytest.raises(errors.InputError, match=r"evil.zip: member '../../escaped.txt'"):
    archives.extract(str(evil_zip), str(tmp_path / "a" / "b"))
  for name, kind in (("../escaped.txt", tarfile.REGTYPE), ("/tmp/escaped.txt", tarfile.REGTYPE),
                     ("link", tarfile.SYMTYPE)):
    evil_tar = tmp_path / "evil.tar.gz"
    with tarfile.open(evil_tar, "w:gz") as tar:
      member = tarfile.TarInfo(name)
      member.type = kind
      member.linkname = "/etc/passwd" if kind == tarfile.SYMTYPE else ""
      member.size = 0 if kind == tarfile.SYMTYPE else 5
      tar.addfile(member, None if kind == tarfile.SYMTYPE else io.BytesIO(b"owned"))
    with pytest.raises(errors.InputError, match=f"member {name!r}"):
      archives.extract(str(evil_tar), str(tmp_path / "t" / "u"))
  assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "a" / "escaped.txt").exists()
  assert not (tmp_path / "t" / "escaped.txt").exists() and not os.listdir(tmp_path / "t" / "u")
  notebook = open(os.path.join(REPO, "notebooks", "probe_from_checkpoint.ipynb")).read()
  assert "unpack_archive" not in notebook and "archives.extract(archive" in notebook


def test_a_reader_leaves_a_writers_in_flight_save_alone(tmp_path):
  abstract = _small_checkpoints(tmp_path / "ckpt", steps=(1,))
  in_flight = tmp_path / "ckpt" / "2.orbax-checkpoint-tmp-123"
  shutil.copytree(tmp_path / "ckpt" / "1", in_flight)
  reader = checkpoint_lib.Checkpointer(str(tmp_path / "ckpt"))  # e.g. a probe's
  assert int(reader.restore(abstract)[0]["step"]) == 1
  reader.close()
  assert in_flight.is_dir()
  writer = checkpoint_lib.Checkpointer(str(tmp_path / "ckpt"))  # a resumed run
  writer.save(3, {"w": jnp.zeros((64, 64)), "step": jnp.int32(3)})
  writer.close()
  assert not in_flight.exists() and writer.all_steps() == [1, 3]


# --- Exit statuses docs/reliability.md promises ------------------------------------

STOPPING = """
import errno, sys
from absl import app
from roi_mae_jax import errors
from roi_mae_jax import main
from roi_mae_jax import tasks
def stop(config, workdir):
  if sys.argv[1] == "disk":
    raise OSError(errno.ENOSPC, "No space left on device", workdir)
  raise errors.TrainingError("loss was not finite at step 3")
tasks.run_task = stop
app.run(main.main, argv=["main", "--config=configs/show_masks.py", "--workdir=" + sys.argv[2]],
        flags_parser=main.parse_flags)
"""


@pytest.mark.parametrize("fault, message", [
    ("disk", "error: no space left on device ([Errno 28] No space left on device: "),
    ("loss", "error: loss was not finite at step 3"),
])
def test_a_run_that_must_stop_exits_1_with_one_line(tmp_path, fault, message):
  done = subprocess.run([sys.executable, "-c", STOPPING, fault, str(tmp_path)], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
  [line] = _error_lines(done.stderr)
  assert line.startswith(message)


@pytest.mark.slow
def test_resume_after_the_manifest_changed_relabels_and_redoes_moved_keys(athena_dir, tmp_path):
  from roi_mae_jax.data import shards  # pylint: disable=g-import-not-at-top
  from roi_mae_jax.tasks import prepare  # pylint: disable=g-import-not-at-top
  good = sorted(str(p) for p in athena_dir.glob("*/*/*.nii.gz"))
  manifest = tmp_path / "scans.csv"
  config = prepare_config(tmp_path, source="manifest", manifest=str(manifest))
  manifest.write_text(f"path,subject,site,label\n{good[0]},a,X,0\n{good[1]},b,X,0\n")
  tasks.run_task(config, str(tmp_path / "out"))
  # Edited between runs: a's label, and key b now names another file.
  manifest.write_text(f"path,subject,site,label\n{good[0]},a,Y,1\n{good[2]},b,X,0\n")
  tasks.run_task(config, str(tmp_path / "out"))
  rows = {r["scan"]: r for r in shards.PreparedDataset(str(tmp_path / "out")).rows}
  assert (rows["a"]["label"], rows["a"]["site"], rows["a"]["path"]) == (1, "Y", good[0])
  assert rows["b"]["path"] == good[2]
  report = {r["scan"]: r["reason"] for r in prepare.read_report(str(tmp_path / "out"))}
  assert "prepared in an earlier run" in report["a"]
  assert f"prepared again: the earlier shard b was of {good[1]}" in report["b"]
