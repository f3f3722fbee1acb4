"""The tasks `config.task` can name, and running one (the CLI's core, importable).

    from roi_mae_jax import tasks
    tasks.run_task(config, workdir)      # checks the config, locks workdir, runs

Each task module exposes `REQUIRED_KEYS` (dotted config keys) and
`run(config, workdir)`. Every value is checked (config_validation) before any
work; the task then runs holding the workdir's lock (workdir_lock), in a
workdir that holds no other task's run (outputs.check_task).
"""

from __future__ import annotations

import importlib
import os

import ml_collections

from roi_mae_jax import config_lib
from roi_mae_jax import config_validation
from roi_mae_jax import errors
from roi_mae_jax import outputs
from roi_mae_jax import workdir_lock

# Task name -> module; imported only when chosen, so the CLI starts fast.
TASKS = {
    "prepare": "roi_mae_jax.prepare",
    "attribute": "roi_mae_jax.attribution",
    "compare": "roi_mae_jax.compare",
    "finetune": "roi_mae_jax.finetune",
    "probe": "roi_mae_jax.probe",
    "pretrain": "roi_mae_jax.train",
    "show_masks": "roi_mae_jax.show_masks",
}


def run_task(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Checks `config` for its task and runs it; raises `InputError`."""
  task = config.get("task")
  if task not in TASKS:
    raise errors.InputError(
        f"unknown task {task!r}; config.task must be one of: {', '.join(sorted(TASKS))}")
  module = importlib.import_module(TASKS[task])
  config_lib.require(config, module.REQUIRED_KEYS, task)
  config_validation.validate(config)
  os.makedirs(workdir, exist_ok=True)
  with workdir_lock.WorkdirLock(workdir, task, _process_index(config)):
    outputs.check_task(workdir, task)
    module.run(config, workdir)


def _process_index(config: ml_collections.ConfigDict) -> int:
  """This process's index; joins a multi-process run first, so each process locks its own."""
  if "distributed" not in config:
    return 0
  import jax  # pylint: disable=g-import-not-at-top  (only tasks that may be distributed)
  from roi_mae_jax import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(config.distributed)
  return jax.process_index() if jax.distributed.is_initialized() else 0
