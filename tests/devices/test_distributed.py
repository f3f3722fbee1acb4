"""Multi-process runs: where the process layout comes from, and a 2-process
CPU pretraining that is killed, resumed, and equals one process."""

import json
import os
import signal
import subprocess
import sys

import grain
import jax
import jax.numpy as jnp
import pytest

from conftest import REPO
from roi_mae_jax import errors
from roi_mae_jax import metrics as metrics_lib
from roi_mae_jax.devices import distributed
from roi_mae_jax.training import checkpoint as checkpoint_lib


def _cfg(**values):
  cfg = distributed.distributed_config()
  cfg.update(values)
  return cfg


def test_layout_from_config_then_environment_then_cluster():
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
         "JAX_PROCESS_ID": "3"}
  assert distributed.plan(_cfg(), {}) is None  # a laptop: one process, nothing to join
  assert distributed.plan(_cfg(), env) == {"coordinator_address": "10.0.0.1:1234",
                                           "num_processes": 4, "process_id": 3}
  explicit = _cfg(coordinator="h:1", num_processes=2, process_id=0)
  assert distributed.plan(explicit, env)["coordinator_address"] == "h:1"  # config wins
  assert distributed.plan(_cfg(mode="off"), env) is None
  srun = {"SLURM_JOB_ID": "7", "SLURM_STEP_NUM_TASKS": "8"}
  assert distributed.plan(_cfg(), srun) == {}  # JAX reads SLURM's variables itself
  assert distributed.plan(_cfg(), {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"}) is None  # salloc shell
  assert distributed.plan(_cfg(), {"TPU_WORKER_HOSTNAMES": "w0,w1"}) == {}
  assert distributed.plan(_cfg(mode="cluster"), {}) == {}
  assert distributed.plan(_cfg(coordinator="h:1", num_processes=1, process_id=0), {}) is None


@pytest.mark.parametrize("cfg, env, message", [
    (_cfg(coordinator="h:1"), {}, "distributed.num_processes, distributed.process_id missing"),
    (_cfg(), {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"}, "JAX_PROCESS_ID missing"),
    (_cfg(coordinator="h:1", num_processes=2, process_id=2), {}, "process id 2 is outside 0..1"),
    (_cfg(), {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two",
              "JAX_PROCESS_ID": "0"}, "must be integers"),
])
def test_incomplete_or_wrong_layouts_are_named(cfg, env, message):
  with pytest.raises(errors.InputError, match=message):
    distributed.plan(cfg, env)


def _launch(workdir, num_processes, *flags, devices=1):
  """launch/local_multiprocess.sh (num_processes > 1) or one plain process."""
  args = ["--config=configs/pretrain_aal3.py:test", f"--workdir={workdir}",
          "--config.batch_size=4", "--config.total_steps=4", "--config.log_every=1",
          "--config.checkpoint_every=2", "--config.mesh.data=-1", "--config.data.streams=2", *flags]
  env = dict(os.environ, JAX_PLATFORMS="cpu", DEVICES_PER_PROCESS=str(devices),
             PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
  if num_processes > 1:
    cmd = ["bash", "launch/local_multiprocess.sh", str(num_processes), *args]
  else:
    cmd = [sys.executable, "-m", "roi_mae_jax.main", *args]
    env["JAX_NUM_CPU_DEVICES"] = str(devices)
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _losses(workdir, process=0):
  return [(r["step"], r["loss"]) for r in metrics_lib.read_metrics(str(workdir), process)]


@pytest.mark.slow
def test_two_processes_killed_and_resumed_match_one_process(tmp_path):
  pod, single = tmp_path / "pod", tmp_path / "single"
  crashed = _launch(pod, 2, "--config.fault_kill_after_step=2")
  assert crashed.returncode == 128 + signal.SIGKILL, crashed.stderr[-3000:]
  data = pod / "checkpoints" / "2" / "data"  # each process saved its own data position
  assert sorted(n for n in os.listdir(data) if n.startswith("process_")) == [
      "process_0-of-2.json", "process_1-of-2.json"]
  resumed = _launch(pod, 2)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  for process in range(2):
    log = (pod / "logs" / f"process_{process}.log").read_text()
    assert f"process {process} of 2" in log and "resumed from" in log
  # One process with two devices reading both data streams: the same global batches.
  reference = _launch(single, 1, devices=2)
  assert reference.returncode == 0, reference.stderr[-3000:]
  expected = _losses(single)
  assert [step for step, _ in expected] == [1, 2, 3, 4]
  assert _losses(pod, 0) == _losses(pod, 1)  # one replicated loss, read by both processes
  assert [s for s, _ in _losses(pod)] == [1, 2, 3, 4]
  # Same partitioned program on two devices; only the collectives differ (gloo
  # across processes here, in-process there): equal here, allow rounding elsewhere.
  assert [loss for _, loss in _losses(pod)] == pytest.approx([loss for _, loss in expected],
                                                               rel=1e-6)
  assert json.loads((pod / "config.json").read_text())["data"]["streams"] == 2


def test_data_positions_saved_by_one_process_are_refused_by_two(tmp_path, monkeypatch):
  """Each process saves its own data position: another process count cannot resume them."""
  iterator = iter(grain.MapDataset.range(8).to_iter_dataset())
  next(iterator)
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "ckpt"), async_save=False)
  ckpt.save(1, {"step": jnp.int32(1)}, iterator)
  abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32)}
  monkeypatch.setattr(jax, "process_count", lambda: 2)  # the check runs before any read
  with pytest.raises(errors.InputError, match=r"process_0-of-1\.json, not process_0-of-2\.json: "
                     "resume with the number of processes that wrote the checkpoint"):
    ckpt.restore(abstract, data_iterator=iterator)
  monkeypatch.undo()
  state, moved = ckpt.restore(abstract, data_iterator=iterator)
  assert int(state["step"]) == 1 and moved
  ckpt.close()


FAKE_SRUN = """#!/usr/bin/env bash
# Stands in for srun: two tasks on this host with the variables SLURM sets.
while [[ "$1" == --* ]]; do shift; done
for i in 0 1; do
  SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NTASKS=2 SLURM_STEP_NUM_TASKS=2 SLURM_JOB_ID=$JOB \\
      SLURM_STEP_NODELIST=localhost "$@" > "$LOGS/task_$i.log" 2>&1 &
done
status=0
for pid in $(jobs -p); do wait "$pid" || status=$?; done
exit $status
"""


@pytest.mark.slow
def test_slurm_launcher_joins_its_tasks_through_slurm_variables(tmp_path):
  """launch/slurm_gpu.sbatch under a stand-in srun: JAX finds the coordinator from SLURM."""
  (tmp_path / "bin").mkdir()
  srun = tmp_path / "bin" / "srun"
  srun.write_text(FAKE_SRUN)
  srun.chmod(0o755)
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1", LOGS=str(tmp_path),
             JOB=str(os.getpid()),  # JAX derives the coordinator port from the job id
             PATH=os.pathsep.join([str(tmp_path / "bin"), os.path.dirname(sys.executable),
                                   os.environ["PATH"]]))
  run = subprocess.run(
      ["bash", "launch/slurm_gpu.sbatch", "--config=configs/pretrain_aal3.py:test",
       f"--workdir={tmp_path / 'run'}", "--config.batch_size=4", "--config.total_steps=1",
       "--config.mesh.data=-1", "--config.log_every=1"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  logs = [(tmp_path / f"task_{i}.log").read_text() for i in range(2)]
  assert run.returncode == 0, logs[0][-2000:] + logs[1][-2000:]
  for i, log in enumerate(logs):
    assert f"process {i} of 2: 1 local devices, 2 in all" in log
  assert _losses(tmp_path / "run", 0) == _losses(tmp_path / "run", 1) != []


def test_launchers_parse_and_refuse_missing_arguments(tmp_path):
  for script in ("launch/local_multiprocess.sh", "launch/tpu_pod.sh", "launch/slurm_gpu.sbatch"):
    assert subprocess.run(["bash", "-n", script], cwd=REPO).returncode == 0, script
  env = dict(os.environ, TPU_NAME="t", ZONE="z")
  for cmd in (["launch/local_multiprocess.sh", "2", "--config=x.py"], ["launch/tpu_pod.sh", "run"],
              ["launch/slurm_gpu.sbatch"]):
    done = subprocess.run(["bash", *cmd], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 2 and ("usage" in done.stderr or "required" in done.stderr), cmd
