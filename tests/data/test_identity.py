"""A run knows which prepared dataset it trains on; nobody re-prepares a folder being read."""

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import REPO, load_config, prepare_config
from roi_mae_jax import errors
from roi_mae_jax import tasks
from roi_mae_jax.data import identity


def _manifest(path, scans):
  path.write_text("path,subject,site,label\n" + "".join(
      f"{scan},s{i},X,{i % 2}\n" for i, scan in enumerate(scans)))
  return path


@pytest.fixture
def dataset(athena_dir, tmp_path):
  """A prepared folder of 6 scans and the config that prepares 4 others into it."""
  scans = sorted(str(p) for p in athena_dir.glob("*/*/*.nii.gz"))
  folder = tmp_path / "prepared"
  config = prepare_config(tmp_path, source="manifest",
                          manifest=str(_manifest(tmp_path / "a.csv", scans[:6])))
  tasks.run_task(config, str(folder))
  other = prepare_config(tmp_path, source="manifest", overwrite=True,
                         manifest=str(_manifest(tmp_path / "b.csv", scans[4:])))
  return folder, other


def _pretrain(folder, **changes):
  config = load_config("pretrain_aal3", "test")
  config.data.shards = str(folder)
  config.update(changes)
  return config


@pytest.mark.slow
def test_resume_onto_a_re_prepared_dataset_is_refused_naming_both(dataset, tmp_path):
  folder, other = dataset
  run = tmp_path / "run"
  config = _pretrain(folder, total_steps=4)
  tasks.run_task(config, str(run))
  first = json.loads((run / identity.RECORD_FILE).read_text())
  assert first["scans"] == 6 and first["path"] == str(folder)
  tasks.run_task(other, str(folder))  # prepare --overwrite=True with other scans
  longer = _pretrain(folder, total_steps=4, checkpoint_every=1)
  with pytest.raises(errors.InputError) as info:
    tasks.run_task(longer, str(run))
  message = str(info.value)
  assert "\n" not in message and f"fingerprint {first['fingerprint']}, 6 scans" in message
  assert "4 scans" in message and "--config.resume_onto_changed_data=True" in message
  allowed = _pretrain(folder, total_steps=4, resume_onto_changed_data=True)
  tasks.run_task(allowed, str(run))
  record = json.loads((run / identity.RECORD_FILE).read_text())
  assert record["scans"] == 4 and record["history"][0]["fingerprint"] == first["fingerprint"]


@pytest.mark.slow
def test_prepare_refuses_a_folder_a_pretraining_is_reading(dataset, tmp_path):
  folder, other = dataset
  log = tmp_path / "log.txt"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  reader = subprocess.Popen(
      [sys.executable, "-m", "roi_mae_jax.main", "--config=configs/pretrain_aal3.py:test",
       f"--workdir={tmp_path / 'run'}", f"--config.data.shards={folder}",
       "--config.total_steps=100000", "--config.checkpoint_every=100000"],
      cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
  try:
    deadline = time.time() + 240
    while "step 10/" not in log.read_text():
      assert reader.poll() is None and time.time() < deadline, log.read_text()[-3000:]
      time.sleep(0.2)
    before = sorted(os.listdir(folder / "shards"))
    with pytest.raises(errors.InputError) as info:
      tasks.run_task(other, str(folder))
    assert f"PID {reader.pid}" in str(info.value) and "task pretrain reading" in str(info.value)
    assert sorted(os.listdir(folder / "shards")) == before  # nothing deleted
  finally:
    reader.kill()
    reader.wait()
  tasks.run_task(other, str(folder))  # the reader is gone: allowed again
