"""SIGTERM and Ctrl-C sent to real processes: a sealed checkpoint of the step reached,
one line saying how to resume, the documented status, and no worker left behind."""

import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO, load_config, write_athena_layout
from roi_mae_jax import errors
from roi_mae_jax import tasks
from roi_mae_jax.data import shards
from roi_mae_jax.tasks import prepare
from roi_mae_jax.training import seals


def _start(*args, log):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = open(log, "w")
  return subprocess.Popen([sys.executable, "-m", "roi_mae_jax.main", *args], cwd=REPO,
                          stdout=out, stderr=subprocess.STDOUT, env=env,
                          start_new_session=True)  # our signal only, as a scheduler sends it


def _wait_for(log, text, process, timeout=240):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if text in open(log).read():
      return
    assert process.poll() is None, open(log).read()[-3000:]
    time.sleep(0.1)
  raise AssertionError(f"{text!r} not seen: {open(log).read()[-3000:]}")


def _children(pid):
  found = []
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        with open(f"/proc/{entry}/stat") as f:
          fields = f.read().rsplit(")", 1)[1].split()
      except OSError:
        continue
      if int(fields[1]) == pid:
        found.append(int(entry))
  return found


def _alive(pid):
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False


def _gone_within(pids, seconds):
  deadline = time.time() + seconds
  while time.time() < deadline and any(_alive(p) for p in pids):
    time.sleep(0.1)
  return [p for p in pids if _alive(p)]


def test_both_signals_become_a_stop_request_with_their_status():
  """In-process: SIGTERM and SIGINT set the flag and give 128 + signum; handlers restored.
  The end-to-end tests below send one signal each (Ctrl-C to pretraining, a scheduler's
  SIGTERM to prepare and to a two-process run)."""
  from roi_mae_jax import preemption  # pylint: disable=g-import-not-at-top
  for sig in preemption.SIGNALS:
    before = signal.getsignal(sig)
    with preemption.StopOnSignal() as stop:
      assert not stop.requested
      signal.raise_signal(sig)  # handled at once: the handler runs before this returns
      assert stop.requested and stop.name == signal.Signals(sig).name
      stopped = stop.stopped("stopped at step 3")
      assert stopped.status == 128 + sig and str(stopped).startswith(stop.name + ": ")
      with pytest.raises(errors.Stopped, match="stopped in the test; kept"):
        preemption.check("in the test", "kept")
    assert signal.getsignal(sig) is before


@pytest.mark.slow
def test_signal_in_pretraining_saves_a_sealed_checkpoint_of_the_step_reached(
    tmp_path, sig=signal.SIGINT):
  workdir, log = tmp_path / "run", tmp_path / "log.txt"
  run = _start("--config=configs/pretrain_aal3.py:test", f"--workdir={workdir}",
               "--config.total_steps=100000", "--config.checkpoint_every=100000",
               "--config.log_every=1", "--config.data.prefetch_workers=2", log=log)
  try:
    _wait_for(log, "step 5/", run)
    workers = _children(run.pid)
    assert len(workers) >= 2  # the prefetch workers (and Python's resource tracker)
    run.send_signal(sig)
    status = run.wait(timeout=120)
  finally:
    if run.poll() is None:
      run.kill()
  text = open(log).read()
  assert status == 128 + sig, text[-3000:]
  lines = [line for line in text.splitlines() if line.startswith("stopped:")]
  assert len(lines) == 1 and "Traceback" not in text and "KeyboardInterrupt" not in text
  assert "leaked shared_memory" not in text
  step = int(lines[0].split("stopped at step ")[1].split()[0])
  assert lines[0].startswith(f"stopped: {signal.Signals(sig).name}: stopped at step {step} ")
  assert f"checkpoint step {step} is saved and sealed in {workdir / 'checkpoints'}" in lines[0]
  assert "re-run the same command to resume" in lines[0]
  assert seals.verify(str(workdir / "checkpoints" / str(step))) is None
  assert _gone_within(workers, 10) == []


@pytest.mark.slow
def test_a_killed_pretraining_leaves_no_prefetch_worker(tmp_path):
  log = tmp_path / "log.txt"
  run = _start("--config=configs/pretrain_aal3.py:test", f"--workdir={tmp_path / 'run'}",
               "--config.total_steps=100000", "--config.checkpoint_every=100000",
               "--config.log_every=1", "--config.data.prefetch_workers=2", log=log)
  try:
    _wait_for(log, "step 3/", run)
    workers = _children(run.pid)
    run.kill()  # SIGKILL: no clean-up in the parent at all
    run.wait(timeout=30)
  finally:
    if run.poll() is None:
      run.kill()
  assert _gone_within(workers, 10) == []


@pytest.fixture(scope="module")
def many_scans(tmp_path_factory):
  root = tmp_path_factory.mktemp("many")
  write_athena_layout(root, num_subjects=16, run_frames=40)
  return root


@pytest.mark.slow
def test_signal_in_prepare_stops_workers_writes_what_is_done_and_resumes(
    many_scans, tmp_path, sig=signal.SIGTERM):
  workdir, log = tmp_path / "out", tmp_path / "log.txt"
  args = ("--config=configs/prepare.py", f"--workdir={workdir}",
          f"--config.input_dir={many_scans}", "--config.workers=2")
  run = _start(*args, log=log)
  try:
    _wait_for(log, " 2/16 scans", run)
    workers = [p for p in _children(run.pid)]
    run.send_signal(sig)
    start = time.time()
    status = run.wait(timeout=60)
    seconds = time.time() - start
  finally:
    if run.poll() is None:
      run.kill()
  text = open(log).read()
  assert status == 128 + sig and seconds < 10, text[-3000:]
  [line] = [line for line in text.splitlines() if line.startswith("stopped:")]
  assert "Traceback" not in text and "re-run the same command to prepare the rest" in line
  assert _gone_within(workers, 10) == []
  report = prepare.read_report(str(workdir))
  statuses = [r["status"] for r in report]
  done = statuses.count("used")
  assert done >= 2 and statuses.count("pending") == 16 - done
  assert len(shards.PreparedDataset(str(workdir)).rows) == done
  resumed = subprocess.run([sys.executable, "-m", "roi_mae_jax.main", *args], cwd=REPO,
                           capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  # A worker ended by the stop may have sealed its shard after the report was written:
  # the resumed run reuses it, so at least `done` scans are already prepared.
  found = re.search(r"16 scans found \((\d+) already prepared, (\d+) to do\)", resumed.stderr)
  assert found, resumed.stderr[-3000:]
  reused, todo = map(int, found.groups())
  assert reused >= done and reused + todo == 16
  assert len(shards.PreparedDataset(str(workdir)).rows) == 16


@pytest.mark.slow
@pytest.mark.parametrize("stop_after", [3, 4])  # 4: a checkpoint step, its save in flight
def test_stop_request_in_the_loop_saves_the_step_reached(pretrained_dir, tmp_path, stop_after):
  """In-process: the same path as a signal, for the message and the numbers after resume."""
  from roi_mae_jax import preemption  # pylint: disable=g-import-not-at-top
  from roi_mae_jax.downstream import pretrained  # pylint: disable=g-import-not-at-top
  config = load_config("pretrain_aal3", "test")
  reference = pretrained_dir  # the same config, run without a stop
  original = preemption.StopOnSignal.agreed
  calls = []

  def stop_at_third_step(self):
    calls.append(1)
    if len(calls) == stop_after:
      self.received = signal.SIGTERM
    return original(self)

  stopped = tmp_path / "stopped"
  preemption.StopOnSignal.agreed = stop_at_third_step
  try:
    with pytest.raises(errors.Stopped) as info:
      tasks.run_task(config, str(stopped))
  finally:
    preemption.StopOnSignal.agreed = original
  assert info.value.status == 143 and f"stopped at step {stop_after} of 6" in str(info.value)
  assert seals.verify(str(stopped / "checkpoints" / str(stop_after))) is None
  tasks.run_task(config, str(stopped))
  for a, b in zip(jax.tree.leaves(jax.device_get(pretrained.load_pretrained(str(reference)).params)),
                  jax.tree.leaves(jax.device_get(pretrained.load_pretrained(str(stopped)).params))):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_fine_tuning_stops_between_steps_with_one_line(pretrained_dir, tmp_path, monkeypatch):
  from roi_mae_jax import preemption  # pylint: disable=g-import-not-at-top
  from roi_mae_jax.downstream import end_to_end  # pylint: disable=g-import-not-at-top
  config = load_config("finetune", "test")
  config.checkpoint = str(pretrained_dir)
  original, calls = end_to_end.Trainer.step, []

  def step_then_signal(self, *args):
    calls.append(1)
    if len(calls) == 2:  # what the handler does when SIGTERM arrives
      preemption._ACTIVE[-1].received = signal.SIGTERM  # pylint: disable=protected-access
    return original(self, *args)

  monkeypatch.setattr(end_to_end.Trainer, "step", step_then_signal)
  with pytest.raises(errors.Stopped) as info:
    tasks.run_task(config, str(tmp_path / "out"))
  assert info.value.status == 143
  assert str(info.value).startswith("SIGTERM: stopped in fine-tuning at step 2 of ")
  assert "\n" not in str(info.value) and not preemption._ACTIVE  # pylint: disable=protected-access


@pytest.mark.slow
def test_sigterm_to_one_process_of_two_stops_both_after_the_same_step(tmp_path):
  workdir = tmp_path / "pod"
  env = dict(os.environ, JAX_PLATFORMS="cpu", DEVICES_PER_PROCESS="1",
             PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
  launcher = subprocess.Popen(
      ["bash", "launch/local_multiprocess.sh", "2", "--config=configs/pretrain_aal3.py:test",
       f"--workdir={workdir}", "--config.batch_size=4", "--config.total_steps=100000",
       "--config.log_every=1", "--config.checkpoint_every=100000", "--config.mesh.data=-1",
       "--config.data.streams=2"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL, start_new_session=True)
  try:
    log = workdir / "logs" / "process_1.log"
    deadline = time.time() + 240
    while not (log.exists() and "step 5/" in log.read_text()):
      assert launcher.poll() is None and time.time() < deadline
      time.sleep(0.2)
    [second] = [p for p in _descendants(launcher.pid) if b"JAX_PROCESS_ID=1" in
                _proc(p, "environ") and b"roi_mae_jax.main" in _proc(p, "cmdline")]
    os.kill(second, signal.SIGTERM)  # as a preempted host's process gets it, alone
    assert launcher.wait(timeout=120) == 143
  finally:
    if launcher.poll() is None:
      os.killpg(launcher.pid, signal.SIGKILL)
  lines = [[line for line in (workdir / "logs" / f"process_{i}.log").read_text().splitlines()
            if line.startswith("stopped:")] for i in range(2)]
  assert len(lines[0]) == 1 and lines[0] == lines[1]  # the same step on both
  step = int(lines[0][0].split("stopped at step ")[1].split()[0])
  assert seals.verify(str(workdir / "checkpoints" / str(step))) is None


def _proc(pid, name):
  """/proc/PID/NAME, or b"" for a process that has ended meanwhile."""
  try:
    with open(f"/proc/{pid}/{name}", "rb") as f:
      return f.read()
  except OSError:
    return b""


def _descendants(pid):
  found, todo = [], [pid]
  while todo:
    children = _children(todo.pop())
    found += children
    todo += children
  return found


@pytest.mark.slow
def test_a_killed_prepare_leaves_no_worker(many_scans, tmp_path):
  log = tmp_path / "log.txt"
  run = _start("--config=configs/prepare.py", f"--workdir={tmp_path / 'out'}",
               f"--config.input_dir={many_scans}", "--config.workers=2", log=log)
  try:
    _wait_for(log, " 1/16 scans", run)
    workers = _children(run.pid)
    run.kill()  # SIGKILL: the pool's clean-up never runs
    run.wait(timeout=30)
  finally:
    if run.poll() is None:
      run.kill()
  assert workers and _gone_within(workers, 10) == []


@pytest.mark.slow
def test_compare_stops_before_its_next_evaluation_keeping_the_finished_ones(tmp_path,
                                                                            monkeypatch):
  from roi_mae_jax import outputs  # pylint: disable=g-import-not-at-top
  from roi_mae_jax import preemption  # pylint: disable=g-import-not-at-top
  from roi_mae_jax.tasks import compare  # pylint: disable=g-import-not-at-top
  config = load_config("compare_masking", "test")
  config.strategies, config.seeds, config.baseline = "roi", "0", "roi"
  config.run_finetune, config.run_attribute = True, False

  def evaluate_then_signal(config, evaluation, *args):
    preemption._ACTIVE[-1].received = signal.SIGINT  # pylint: disable=protected-access
    return {"done": evaluation}

  monkeypatch.setattr(compare, "evaluate_run", evaluate_then_signal)
  with pytest.raises(errors.Stopped) as info:
    tasks.run_task(config, str(tmp_path))
  assert info.value.status == 130
  assert str(info.value).startswith("SIGINT: stopped before run 1/1 (roi, seed 0): finetune;")
  kept = outputs.read_json(str(tmp_path / "runs" / "roi" / "seed0" / compare.RUN_RESULTS))
  assert kept == {"probe": {"done": "probe"}}  # the finished evaluation is kept
