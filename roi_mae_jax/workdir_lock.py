"""One writer per workdir: a lock file held for as long as a task runs.

    with WorkdirLock(workdir, task="pretrain"):
      ...                                   # only this process writes to workdir

    with ReadLock(prepared_dir, task="pretrain"):
      ...                                   # no prepare writes to prepared_dir meanwhile

The lock is an advisory `flock` on WORKDIR/.workdir_lock (process i > 0 of a
multi-process run: .workdir_lock.process_<i>), so the kernel drops it when the
holder dies, even by SIGKILL: a lock file left by a dead run is taken over,
and a live holder is never displaced. The file names the holder (PID, host,
task, start time) so a refused run can say who is writing.

A run that reads another task's folder (pretraining reads a prepared dataset)
holds a shared lock on that folder's lock file: any number of readers, but a
prepare into the folder (a resume, or --config.overwrite=True that deletes the
shards) is refused while one reads, and a reader is refused while a prepare
writes. Readers name themselves in FOLDER/.readers/HOST-PID.json.
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
READERS_DIR = ".readers"


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


def _alive(holder: dict) -> bool:
  if holder.get("host") != socket.gethostname():
    return True  # cannot tell from here
  try:
    os.kill(int(holder.get("pid", 0)), 0)
    return True
  except (OSError, ValueError):
    return False


def _live_reader(folder: str) -> dict:
  """The record of a live reader of `folder` ({} when none is found)."""
  readers = os.path.join(folder, READERS_DIR)
  for name in sorted(os.listdir(readers)) if os.path.isdir(readers) else []:
    holder = read_holder(os.path.join(readers, name))
    if holder and _alive(holder):
      return dict(holder, task=f"{holder.get('task')} reading this folder")
  return {}


class ReadLock:
  """A shared lock on `folder` while this process reads it (see the module doc).

  A folder this process cannot write to (a read-only copy) cannot be
  prepared into either: it is read without a lock.
  """

  def __init__(self, folder: str, task: str):
    self.folder = folder
    self.task = task
    self._fd: int | None = None
    self._record: str | None = None

  def acquire(self) -> "ReadLock":
    path = lock_path(self.folder)
    try:
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
      return self
    try:
      fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise errors.InputError(
          f"{self.folder} is being written by {_describe(read_holder(path))}: wait for it to "
          "finish before reading it") from None
    self._fd = fd
    record = os.path.join(self.folder, READERS_DIR, f"{socket.gethostname()}-{os.getpid()}.json")
    try:
      os.makedirs(os.path.dirname(record), exist_ok=True)
      with open(record, "w", encoding="utf-8") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "task": self.task,
                   "started": time.time()}, f)
      self._record = record
    except OSError:
      pass  # the lock holds without the name
    return self

  def release(self) -> None:
    if self._record:
      try:
        os.remove(self._record)
      except OSError:
        pass
      self._record = None
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> "ReadLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


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
      if not holder or not _alive(holder):  # held shared, by runs reading the folder
        holder = _live_reader(os.path.dirname(self.path)) or holder
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
