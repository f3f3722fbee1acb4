"""Training metrics: WORKDIR/metrics.jsonl, TensorBoard events, a console line.

    log = MetricsLog(workdir, total_steps, resumed_from=0)
    log.write(step, {"loss": 0.8, "grad_norm": 1.2})  # one JSON line + TB scalars
    log.progress(step, seconds_per_step=0.4, extra="loss 0.800")
    log.close()

Process 0 writes metrics.jsonl and TensorBoard; in a multi-process run every
other process p writes metrics.process<p>.jsonl, the loss as that process saw
it (equal in all of them: a check that the processes ran in lockstep). On
resume, lines for steps past the restored checkpoint (work that was lost with
the crash) are dropped from the JSONL so the file reads as one run.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import resource
import sys
import time
from typing import Mapping

import jax
from absl import logging

METRICS_FILE = "metrics.jsonl"


def metrics_file(process: int = 0) -> str:
  return METRICS_FILE if process == 0 else f"metrics.process{process}.jsonl"


def read_metrics(workdir: str, process: int = 0) -> list[dict]:
  path = os.path.join(workdir, metrics_file(process))
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def duration(seconds: float) -> str:
  """'3m04s', '1h02m'."""
  seconds = int(round(seconds))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def progress_bar(done: int, total: int, width: int = 20) -> str:
  """'[#####...............]' for done/total."""
  filled = int(width * done / max(total, 1))
  return "[" + "#" * filled + "." * (width - filled) + "]"


class MetricsLog:
  """Appends metrics for one run (possibly resumed) of `total_steps` steps."""

  def __init__(self, workdir: str, total_steps: int, resumed_from: int = 0):
    self.total_steps = total_steps
    self.start_step = resumed_from
    self.start_time = time.time()
    process = jax.process_index()
    self.path = os.path.join(workdir, metrics_file(process))
    self._tb = None
    kept = [r for r in read_metrics(workdir, process) if r["step"] <= resumed_from]
    tmp = self.path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(tmp, self.path)
    if process == 0:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resumed_from + 1)

  def write(self, step: int, values: Mapping[str, float]) -> None:
    record = {"step": int(step), **{k: float(v) for k, v in values.items()}}
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is None:
      return
    for name, value in values.items():
      self._tb.add_scalar(f"train/{name}", float(value), int(step))
    self._tb.flush()

  def progress(self, step: int, seconds_per_step: float, extra: str = "") -> None:
    """A console line: step, share done, speed and time left."""
    remaining = (self.total_steps - step) * seconds_per_step
    logging.info("step %d/%d (%.0f%%) %s | %.2f s/step | eta %s", step, self.total_steps,
                 100.0 * step / max(self.total_steps, 1), extra, seconds_per_step,
                 duration(remaining))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def peak_rss_mib() -> float:
  """Peak resident memory of this process (MiB).

  Linux's VmHWM, not getrusage: a spawned worker's ru_maxrss still counts the
  parent's pages from before its exec.
  """
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  scale = 1 / 2**20 if sys.platform == "darwin" else 1 / 1024  # bytes vs KiB
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def release_freed_host_memory() -> None:
  """Hands the heap the compiler freed back to the OS (glibc's malloc_trim), so
  that it does not count in the peak RSS of the steps that follow; a no-op
  where glibc is absent."""
  gc.collect()  # first, so that Python's garbage (lowering, traces) is freed too
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass
