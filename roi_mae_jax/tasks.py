"""The tasks `config.task` can name, and running one (the CLI's core, importable).

    from roi_mae_jax import tasks
    tasks.run_task(config, workdir)      # checks the config's keys, then runs

Each task module exposes `REQUIRED_KEYS` (dotted config keys) and
`run(config, workdir)`.
"""

from __future__ import annotations

import importlib
import os

import ml_collections

from roi_mae_jax import config_lib
from roi_mae_jax import errors

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
  os.makedirs(workdir, exist_ok=True)
  module.run(config, workdir)
