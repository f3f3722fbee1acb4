r"""The one entry point: `config.task` picks the job.

    python -m roi_mae_jax.main --config=configs/show_masks.py --workdir=runs/masks
    python -m roi_mae_jax.main --config=configs/show_masks.py:paper \
        --workdir=runs/masks_paper --config.mask.ratio=0.75

The tasks are listed in tasks.py. Bad input (an unknown task, a missing key, a bad file)
is printed as one line and the process exits with status 2; a run that has
to stop (a non-finite loss) exits with status 1.
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from roi_mae_jax import errors
from roi_mae_jax import tasks

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/show_masks.py[:arg].",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for all outputs.")


class _LibraryChatter:
  """Drops INFO lines of checkpointing/input libraries; warnings still show."""

  NOISY = ("/orbax/", "/grain/")

  def filter(self, record) -> bool:
    return record.levelno > 20 or not any(n in record.pathname for n in self.NOISY)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _CONFIG.value is None:
    raise app.UsageError("--config=configs/NAME.py is required")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir=DIR is required")
  logging.get_absl_handler().addFilter(_LibraryChatter())
  try:
    tasks.run_task(_CONFIG.value, _WORKDIR.value)
  except errors.InputError as e:
    logging.flush()
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except errors.TrainingError as e:
    logging.flush()
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
