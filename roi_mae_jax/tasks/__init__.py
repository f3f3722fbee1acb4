"""The tasks `config.task` can name, and running one (the CLI's core, importable).

    from roi_mae_jax import tasks
    tasks.run_task(config, workdir)      # checks the config, locks workdir, runs

Each task module exposes `REQUIRED_KEYS` (dotted config keys) and
`run(config, workdir)`. Every value is checked (config.validation) before any
work; the task then runs holding the workdir's lock (workdir_lock), in a
workdir that holds no other task's run (outputs.check_task), and a shared
lock on each prepared dataset it reads (`data.shards`, compare's
`pretrain.data.shards`), so no prepare rewrites one under it. A workdir that
is a file or cannot be written is refused with one line.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import os

import ml_collections

from roi_mae_jax import console
from roi_mae_jax import errors
from roi_mae_jax import outputs
from roi_mae_jax import workdir_lock
from roi_mae_jax.config import blocks
from roi_mae_jax.config import validation

LIBRARY_ERRORS = "library_errors.log"  # the libraries' own tracebacks (console.library_errors_to)

# Task name -> module; imported only when chosen, so the CLI starts fast.
TASKS = {
    "prepare": "roi_mae_jax.tasks.prepare",
    "attribute": "roi_mae_jax.tasks.attribute",
    "compare": "roi_mae_jax.tasks.compare",
    "finetune": "roi_mae_jax.tasks.finetune",
    "probe": "roi_mae_jax.tasks.probe",
    "pair_probes": "roi_mae_jax.tasks.pair_probes",
    "pretrain": "roi_mae_jax.tasks.pretrain",
    "show_masks": "roi_mae_jax.tasks.show_masks",
    "synthesize": "roi_mae_jax.tasks.synthesize",
}


def run_task(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Checks `config` for its task and runs it; raises `InputError`."""
  task = config.get("task")
  if task not in TASKS:
    raise errors.InputError(
        f"unknown task {task!r}; config.task must be one of: {', '.join(sorted(TASKS))}")
  module = importlib.import_module(TASKS[task])
  blocks.require(config, module.REQUIRED_KEYS, task)
  validation.validate(config)
  make_workdir(workdir)
  process = _process_index(config)
  console.library_errors_to(os.path.join(
      workdir, LIBRARY_ERRORS if process == 0 else f"{LIBRARY_ERRORS}.process{process}"))
  with contextlib.ExitStack() as locks:
    locks.enter_context(workdir_lock.WorkdirLock(workdir, task, process))
    for folder in _datasets_read(config, workdir):
      locks.enter_context(workdir_lock.ReadLock(folder, task))
    outputs.check_task(workdir, task)
    module.run(config, workdir)


def make_workdir(workdir: str) -> None:
  """Creates `workdir`; `InputError` when it is a file or cannot be written."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise errors.InputError(f"--workdir {workdir} is a file, not a folder: choose a folder "
                            "for the outputs")
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_test.{os.getpid()}")
    with open(probe, "w", encoding="utf-8"):
      pass
    os.remove(probe)
  except OSError as e:
    if errors.is_disk_full(e):
      raise
    why = {errno.EROFS: "is on a read-only file system", errno.EACCES: "is not writable",
           errno.EPERM: "is not writable", errno.ENOTDIR: "is inside a file, not a folder",
           errno.EEXIST: "is a file, not a folder"}.get(e.errno, f"cannot be written ({e})")
    raise errors.InputError(f"--workdir {workdir} {why}: choose a folder you can write "
                            "to") from None


def _datasets_read(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
  """Prepared folders this task reads (not its own workdir)."""
  found = []
  for block in (config.get("data"), (config.get("pretrain") or {}).get("data")):
    shards = block.get("shards") if block is not None else None
    if shards and os.path.isdir(shards) and \
        os.path.realpath(shards) != os.path.realpath(workdir) and shards not in found:
      found.append(shards)
  return found


def _process_index(config: ml_collections.ConfigDict) -> int:
  """This process's index; joins a multi-process run first, so each process locks its own."""
  if "distributed" not in config:
    return 0
  import jax  # pylint: disable=g-import-not-at-top  (only tasks that may be distributed)
  from roi_mae_jax.devices import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(config.distributed)
  return jax.process_index() if jax.distributed.is_initialized() else 0
