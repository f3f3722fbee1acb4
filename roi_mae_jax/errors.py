"""The one exception type for bad user input.

The CLI prints an `InputError` as a single line (no traceback) and exits with
status 2, so its message must name the file or config key and the reason.
"""


class InputError(ValueError):
  """Bad input from the user: a file, a config value, a missing key."""


class TrainingError(RuntimeError):
  """A run that cannot go on (e.g. a non-finite loss); the message says why."""
