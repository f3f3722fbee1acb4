"""One writer per workdir: a lock file held for as long as a task runs.

    with WorkdirLock(workdir, task="pretrain"):
      ...                                   # only this process writes to workdir

The lock is an advisory `flock` on WORKDIR/.workdir_lock (process i > 0 of a
multi-process run: .workdir_lock.process_<i>), so the kernel drops it when the
holder dies, even by SIGKILL: a lock file left by a dead run is taken over,
and a live holder is never displaced. The file names the holder (PID, host,
task, start time) so a refused run can say who is writing.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time

from absl import logging

from roi_mae_jax import errors

LOCK_FILE = ".workdir_lock"


def lock_path(workdir: str, process_index: int = 0) -> str:
  """WORKDIR/.workdir_lock (process 0) or .workdir_lock.process_<i>."""
  name = LOCK_FILE if process_index == 0 else f"{LOCK_FILE}.process_{process_index}"
  return os.path.join(workdir, name)


def read_holder(path: str) -> dict:
  """What the lock file at `path` says about its holder ({} when empty or unreadable)."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def _describe(holder: dict) -> str:
  if not holder:
    return "another process (its details are not written yet)"
  since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
  return (f"PID {holder.get('pid')} on host {holder.get('host')} (task "
          f"{holder.get('task')}, since {since})")


class WorkdirLock:
  """Holds the lock of `workdir` between `acquire()` and `release()` (or a `with`)."""

  def __init__(self, workdir: str, task: str, process_index: int = 0):
    self.path = lock_path(workdir, process_index)
    self.task = task
    self._fd: int | None = None

  def acquire(self) -> "WorkdirLock":
    """Takes the lock; raises `InputError` naming the holder when another run has it."""
    os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      holder = read_holder(self.path)
      if not holder:  # the holder is between taking the lock and writing its name
        time.sleep(0.2)
        holder = read_holder(self.path)
      raise errors.InputError(
          f"{os.path.dirname(self.path)} is in use by {_describe(holder)}: one run writes "
          f"to a workdir at a time ({self.path}); wait for it or choose another "
          "--workdir") from None
    previous = read_holder(self.path)
    if previous:  # the flock is free, so that process is gone
      logging.warning("taking over the lock of a run that is no longer running: %s",
                      _describe(previous))
    record = {"pid": os.getpid(), "host": socket.gethostname(), "task": self.task,
              "started": time.time()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    self._fd = fd
    return self

  def release(self) -> None:
    """Empties the lock file and drops the lock (the file stays: removing it would race)."""
    if self._fd is None:
      return
    try:
      os.ftruncate(self._fd, 0)
    finally:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
