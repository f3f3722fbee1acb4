"""What the CLI prints while it works: short lines by default, absl's full ones on request.

    console.configure(verbose=False)   # "10:36:52 grid 40x48x44 at 4x4x4 mm ..."
    console.configure(verbose=True)    # "I1130 10:36:52.225648 1400915638 show_masks.py:45] ..."

The short form is the time and the message (warnings and errors say so);
INFO lines of the libraries underneath (JAX's backend probing, such as
"Unable to initialize backend 'tpu'", Orbax's and Grain's bookkeeping) are
dropped, while their warnings still show. `verbose` keeps absl's prefix
(level, date, time, thread id, file:line) and every library line.
"""

from __future__ import annotations

import logging as std_logging

from absl import logging

SHORT_FORMAT = "%(asctime)s %(message)s"
TIME_FORMAT = "%H:%M:%S"


class LibraryChatter(std_logging.Filter):
  """Drops INFO (and DEBUG) lines of the libraries below this package; warnings pass."""

  # Orbax and Grain log through absl (logger "absl"), so their file path tells them apart;
  # JAX logs through its own loggers ("jax._src.xla_bridge", ...).
  NOISY_PATHS = ("/orbax/", "/grain/", "/jax/", "/jaxlib/")
  NOISY_LOGGERS = ("jax", "jaxlib", "orbax", "grain")

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno >= std_logging.WARNING:
      return True
    if record.name.split(".")[0] in self.NOISY_LOGGERS:
      return False
    return not any(p in record.pathname for p in self.NOISY_PATHS)


class ShortFormatter(std_logging.Formatter):
  """'HH:MM:SS message'; warnings and errors carry their level."""

  def __init__(self):
    super().__init__(SHORT_FORMAT, TIME_FORMAT)

  def format(self, record: std_logging.LogRecord) -> str:
    text = super().format(record)
    if record.levelno >= std_logging.WARNING:
      time, _, message = text.partition(" ")
      text = f"{time} {record.levelname.lower()}: {message}"
    return text


def configure(verbose: bool = False) -> None:
  """Sets the format of absl's handler (which also prints the Python loggers' records)."""
  handler = logging.get_absl_handler()
  for existing in list(handler.filters):
    if isinstance(existing, LibraryChatter):
      handler.removeFilter(existing)
  if verbose:
    handler.setFormatter(logging.PythonFormatter())
    return
  handler.setFormatter(ShortFormatter())
  handler.addFilter(LibraryChatter())
