"""Exception types for bad input and runs that must stop.

The CLI prints an `InputError` as a single line (no traceback) and exits with
status 2, so its message must name the file or config key and the reason.
"""

import errno


class InputError(ValueError):
  """Bad input from the user: a file, a config value, a missing key."""


class TrainingError(RuntimeError):
  """A run that cannot go on (e.g. a non-finite loss); the message says why."""


def is_disk_full(error: BaseException) -> bool:
  """Whether `error`, or an exception it was raised from, is 'no space left on device'."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if "No space left on device" in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


class Stopped(Exception):
  """A run stopped on request (SIGTERM, SIGINT) after keeping its work; resumable.

  The CLI prints `stopped: <message>` as one line and exits with `status`
  (128 + the signal number: 143 for SIGTERM, 130 for SIGINT).
  """

  def __init__(self, message: str, status: int):
    super().__init__(message)
    self.status = status
