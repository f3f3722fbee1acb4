r"""The one entry point: `config.task` picks the job.

    python -m roi_mae_jax.main --config=configs/show_masks.py --workdir=runs/masks
    python -m roi_mae_jax.main --config=configs/show_masks.py:paper \
        --workdir=runs/masks_paper --config.mask.ratio=0.75

The tasks are listed in tasks.py. Bad input (an unknown task, a missing or
misspelt key, a bad value, a bad file, a workdir another run holds) is printed
as one line and the process exits with status 2; a run that has to stop (a
non-finite loss, a full disk) exits with status 1. SIGTERM or Ctrl-C (SIGINT)
stops a task that can keep its work (pretraining saves a sealed checkpoint of
the step it reached, prepare writes its index and report) with one line
`stopped: ...` saying how to resume, and status 128 + the signal (143, 130).
Log lines are short (time and
message, console.py); `--verbose` prints absl's full prefix and the libraries'
INFO lines.
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from roi_mae_jax import console
from roi_mae_jax import errors
from roi_mae_jax import tasks
from roi_mae_jax.config import validation

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/show_masks.py[:arg].",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for all outputs.")
_VERBOSE = flags.DEFINE_bool(
    "verbose", False, "absl's full log prefix (level, date, thread id, file:line) and the "
    "libraries' INFO lines (JAX backends, Orbax, Grain).")


def main(argv) -> None:
  console.configure(_VERBOSE.value)
  console.route_thread_stderr()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:  # the config file is loaded here, on first use
    config = _CONFIG.value
    if config is not None:
      config.get("task")  # a file that failed to load raises on first access
  except (OSError, SyntaxError, ImportError, AttributeError, ValueError) as e:
    _fail(f"--config: {validation.flag_error(e, argv)}", 2)
  if config is None:
    raise app.UsageError("--config=configs/NAME.py is required")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir=DIR is required")
  logging.info("task %s, workdir %s", config.get("task"), _WORKDIR.value)
  try:
    tasks.run_task(config, _WORKDIR.value)
  except errors.InputError as e:
    _fail(str(e), 2)
  except errors.TrainingError as e:
    _fail(str(e), 1)
  except errors.Stopped as e:
    _fail(str(e), e.status, prefix="stopped")
  except KeyboardInterrupt:  # Ctrl-C where the task keeps nothing to resume from
    _fail(f"SIGINT (Ctrl-C): task {config.get('task')} interrupted; nothing was kept to "
          "resume from, re-run the same command to start it again", 130, prefix="stopped")
  except OSError as e:
    if not errors.is_disk_full(e):
      raise
    _fail(f"no space left on device ({e}); what was written before is kept: free space "
          "and re-run the same command to resume", 1)


def _fail(message: str, status: int, prefix: str = "error") -> None:
  logging.flush()
  # sys.__stderr__: the console even when a full disk diverted the libraries' output.
  print(f"{prefix}: {message}", file=sys.__stderr__ or sys.stderr, flush=True)
  sys.exit(status)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, but a bad flag (e.g. a misspelt --config.key) is one line and status 2."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, KeyError, AttributeError, TypeError, ValueError, OSError) as e:
    _fail(validation.flag_error(e, argv), 2)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
