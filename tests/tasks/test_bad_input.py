"""Bad input is one line `error: ...` with status 2; damaged manifests fall back; a full disk
prints its line once."""

import errno
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from conftest import REPO, load_config
from roi_mae_jax import errors
from roi_mae_jax import tasks
from roi_mae_jax.downstream import pretrained
from roi_mae_jax.training import checkpoint as checkpoint_lib
from roi_mae_jax.training import seals


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "roi_mae_jax.main", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))


def _one_error_line(done, status=2):
  assert done.returncode == status and "Traceback" not in done.stderr, done.stderr[-3000:]
  lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1, done.stderr[-3000:]
  return lines[0]


@pytest.mark.slow
def test_a_workdir_that_is_a_file_is_one_line(tmp_path):
  path = tmp_path / "a_file"
  path.write_text("x")
  line = _one_error_line(_cli("--config=configs/show_masks.py", f"--workdir={path}"))
  assert f"--workdir {path} is a file, not a folder" in line
  line = _one_error_line(_cli("--config=configs/show_masks.py", f"--workdir={path}/run"))
  assert f"--workdir {path}/run is inside a file" in line


def test_a_read_only_workdir_is_one_line(tmp_path, monkeypatch):
  real = os.makedirs

  def read_only(path, *args, **kwargs):
    if str(path).startswith(str(tmp_path)):
      raise OSError(errno.EROFS, "Read-only file system", str(path))
    return real(path, *args, **kwargs)

  monkeypatch.setattr(os, "makedirs", read_only)
  with pytest.raises(errors.InputError, match=r"is on a read-only file system: choose a folder"):
    tasks.run_task(load_config("show_masks"), str(tmp_path / "run"))


@pytest.mark.slow
@pytest.mark.parametrize("config", ["probe", "attribute"])
def test_a_checkpoint_that_is_not_a_pretraining_run_is_one_line(prepared_dir, pretrained_dir,
                                                                tmp_path, config):
  line = _one_error_line(_cli(f"--config=configs/{config}.py:test",
                              f"--workdir={tmp_path / 'out'}",
                              f"--config.checkpoint={prepared_dir}"))
  assert f"{prepared_dir} holds a 'prepare' run" in line
  assert "--config.checkpoint must name a pretraining workdir" in line
  with pytest.raises(errors.InputError, match=f"pass --config.checkpoint={pretrained_dir}"):
    pretrained.read_config(str(pretrained_dir / "checkpoints" / "6"))
  with pytest.raises(errors.InputError, match="does not exist"):
    pretrained.read_config(str(tmp_path / "nowhere"))


def _checkpoints(directory):
  ckpt = checkpoint_lib.Checkpointer(str(directory), keep=5)
  for step in (1, 2):
    ckpt.save(step, {"w": jnp.full((8, 8), float(step))})
  ckpt.close()
  return {"w": jax.ShapeDtypeStruct((8, 8), jnp.float32)}


@pytest.mark.parametrize("damage", ["renamed key", "wrong type", "not a table", "no files"])
def test_a_damaged_manifest_of_any_kind_is_a_damaged_checkpoint(tmp_path, damage):
  abstract = _checkpoints(tmp_path / "ckpt")
  path = tmp_path / "ckpt" / "2" / seals.MANIFEST
  manifest = json.loads(path.read_text())
  entry = next(iter(manifest["files"]))
  if damage == "renamed key":  # one flipped bit: "bytes" -> "bydes", still valid JSON
    manifest["files"][entry]["bydes"] = manifest["files"][entry].pop("bytes")
  elif damage == "wrong type":
    manifest["files"][entry]["bytes"] = "12"
  elif damage == "not a table":
    manifest["files"] = list(manifest["files"])
  else:
    manifest = {"filez": manifest["files"]}
  path.write_text(json.dumps(manifest))
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "ckpt"))
  state, _ = ckpt.restore(abstract)
  assert float(state["w"][0, 0]) == 1.0
  [(step, _, problem)] = ckpt.rejected
  assert step == 2 and "manifest _CHECKSUMS.json is" in problem and "damaged" in problem
  ckpt.close()


def test_an_unsealed_only_checkpoint_is_never_restored(tmp_path):
  abstract = _checkpoints(tmp_path / "ckpt")
  for step in (1, 2):
    os.remove(tmp_path / "ckpt" / str(step) / seals.MANIFEST)
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "ckpt"))
  with pytest.raises(errors.InputError) as info:
    ckpt.restore(abstract)
  message = str(info.value)
  assert "no usable checkpoint" in message and "cannot be verified" in message
  assert "earlier version" not in message
  ckpt.close()


def test_a_save_is_sealed_as_soon_as_it_is_committed(tmp_path):
  import time  # pylint: disable=g-import-not-at-top
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "ckpt"))
  ckpt.save(1, {"w": jnp.ones((64, 64))})
  deadline = time.time() + 30
  while seals.verify(ckpt.step_dir(1)) is not None:  # no next save, no wait
    assert time.time() < deadline, seals.verify(ckpt.step_dir(1))
    time.sleep(0.05)
  ckpt.close()


def _mount_small_tmpfs(path):
  path.mkdir()
  done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(path)],
                        capture_output=True)
  return done.returncode == 0


@pytest.mark.slow
def test_a_full_disk_prints_its_line_once_and_keeps_tracebacks_in_a_file(tmp_path):
  disk = tmp_path / "disk"
  if shutil.which("mount") is None or os.geteuid() != 0 or not _mount_small_tmpfs(disk):
    pytest.skip("needs a small tmpfs (root)")
  try:
    done = _cli("--config=configs/pretrain_aal3.py:test", f"--workdir={disk / 'run'}",
                "--config.total_steps=400", "--config.checkpoint_every=1",
                "--config.keep_checkpoints=100")
    line = _one_error_line(done, status=1)
    assert line.startswith("error: no space left on device") and "is kept" in line
    assert len(done.stderr.splitlines()) < 15, done.stderr[-3000:]  # progress lines + the one
    assert "Task exception was never retrieved" not in done.stderr
    assert f"the libraries' tracebacks are in {disk / 'run' / 'library_errors.log'}" in line
  finally:
    subprocess.run(["umount", str(disk)], check=False)
