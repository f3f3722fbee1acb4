"""What the CLI prints while it works: short lines by default, absl's full ones on request.

    console.configure(verbose=False)   # "10:36:52 grid 40x48x44 at 4x4x4 mm ..."
    console.configure(verbose=True)    # "I1130 10:36:52.225648 1400915638 show_masks.py:45] ..."

The short form is the time and the message (warnings and errors say so);
INFO lines of the libraries underneath (JAX's backend probing, such as
"Unable to initialize backend 'tpu'", Orbax's and Grain's bookkeeping) are
dropped, while their warnings still show. `verbose` keeps absl's prefix
(level, date, time, thread id, file:line) and every library line.

    console.library_errors_to("runs/demo/library_errors.log")

Errors the libraries log from their own threads (Orbax's failed async save:
a traceback per thread, then asyncio's "Task exception was never retrieved"
ones at exit) repeat the one problem the task reports as a single line; once
a task has a workdir they go to this file instead of the console.
"""

from __future__ import annotations

import logging as std_logging
import sys
import threading

from absl import logging

SHORT_FORMAT = "%(asctime)s %(message)s"
TIME_FORMAT = "%H:%M:%S"


class LibraryChatter(std_logging.Filter):
  """Drops INFO (and DEBUG) lines of the libraries below this package; warnings pass."""

  # Orbax and Grain log through absl (logger "absl"), so their file path tells them apart;
  # JAX logs through its own loggers ("jax._src.xla_bridge", ...).
  NOISY_PATHS = ("/orbax/", "/grain/", "/jax/", "/jaxlib/", "/matplotlib/")
  NOISY_LOGGERS = ("jax", "jaxlib", "orbax", "grain", "matplotlib")
  # Warnings that only say a first run is slower (matplotlib's font cache on a fresh machine).
  ONE_TIME_NOTICES = ("building the font cache",)

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno >= std_logging.WARNING:
      return not (record.name.startswith("matplotlib") and
                  any(n in record.getMessage() for n in self.ONE_TIME_NOTICES))
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


LIBRARY_PATHS = LibraryChatter.NOISY_PATHS + ("/asyncio/", "/tensorstore/", "/concurrent/")
LIBRARY_LOGGERS = LibraryChatter.NOISY_LOGGERS + ("asyncio", "tensorstore", "concurrent")


def _is_library_error(record: std_logging.LogRecord) -> bool:
  if record.levelno < std_logging.ERROR:
    return False
  return (record.name.split(".")[0] in LIBRARY_LOGGERS or
          any(p in record.pathname for p in LIBRARY_PATHS))


class _NotLibraryErrors(std_logging.Filter):
  def filter(self, record: std_logging.LogRecord) -> bool:
    return not _is_library_error(record)


class _OnlyLibraryErrors(std_logging.Filter):
  def filter(self, record: std_logging.LogRecord) -> bool:
    return _is_library_error(record)


_LIBRARY_FILE: list[std_logging.Handler] = []


def library_errors_to(path: str) -> None:
  """Sends the libraries' ERROR records (with their tracebacks) to `path`, not the console."""
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _NotLibraryErrors) for f in handler.filters):
    handler.addFilter(_NotLibraryErrors())
  root = std_logging.getLogger()
  for old in _LIBRARY_FILE:
    root.removeHandler(old)
    old.close()
  _LIBRARY_FILE.clear()
  try:
    sink = _QuietFileHandler(path, delay=True, encoding="utf-8")
  except OSError:
    return
  sink.setLevel(std_logging.ERROR)
  sink.addFilter(_OnlyLibraryErrors())
  sink.setFormatter(std_logging.Formatter("%(asctime)s %(name)s %(pathname)s:%(lineno)d "
                                          "%(message)s"))
  root.addHandler(sink)
  _LIBRARY_FILE.append(sink)


class _QuietFileHandler(std_logging.FileHandler):
  """A file handler that stays silent when the file cannot be written (a full disk)."""

  def handleError(self, record: std_logging.LogRecord) -> None:
    pass


class ThreadStderr:
  """`sys.stderr` whose writes from threads other than the main one go to the library
  error file (when a task has set one): tracebacks that libraries print from their own
  threads (tensorstore's "Event loop is closed", uncaught errors in Orbax's threads)."""

  def __init__(self, stream):
    self._stream = stream

  def write(self, text: str) -> int:
    path = library_errors_path()
    if path is None or threading.current_thread() is threading.main_thread():
      return self._stream.write(text)
    try:
      with open(path, "a", encoding="utf-8") as f:
        f.write(text)
    except OSError:
      pass  # a full disk: dropped rather than printed around the one error line
    return len(text)

  def __getattr__(self, name):
    return getattr(self._stream, name)


def route_thread_stderr() -> None:
  """Installs `ThreadStderr` (the CLI does, once)."""
  if not isinstance(sys.stderr, ThreadStderr):
    sys.stderr = ThreadStderr(sys.stderr)


def library_errors_path() -> str | None:
  """The file library errors go to (None before a task set one)."""
  return _LIBRARY_FILE[0].baseFilename if _LIBRARY_FILE else None


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
