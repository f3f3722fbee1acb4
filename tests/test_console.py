"""Console lines: short by default, absl's full prefix with verbose, no library chatter."""

import contextlib
import io
import logging as std_logging
import re

from absl import logging

from roi_mae_jax import console


def _record(name, level, path, message):
  return std_logging.LogRecord(name, level, path, 12, message, None, None)


def _printed(records, verbose):
  """What absl's handler prints. Before absl's flags are parsed (a test process where no
  test ran main) it writes to sys.stderr, after to its stream: both are read here."""
  handler = logging.get_absl_handler()
  buffer = io.StringIO()
  stream, handler.python_handler.stream = handler.python_handler.stream, buffer
  try:
    with contextlib.redirect_stderr(buffer):
      console.configure(verbose)
      for record in records:
        handler.handle(record)
    return [l for l in buffer.getvalue().splitlines() if "before flag parsing" not in l]
  finally:
    handler.python_handler.stream = stream
    console.configure(False)


RECORDS = [
    _record("absl", std_logging.INFO, "/src/roi_mae_jax/tasks/pretrain.py", "step 10/300 | eta 1m"),
    _record("jax._src.xla_bridge", std_logging.INFO, "/site/jax/_src/xla_bridge.py",
            "Unable to initialize backend 'tpu': INTERNAL"),
    _record("absl", std_logging.INFO, "/site/orbax/checkpoint/manager.py", "saving step 2"),
    _record("absl", std_logging.WARNING, "/site/orbax/checkpoint/manager.py", "disk slow"),
    # A fresh machine's first figure: matplotlib builds its font cache.
    _record("matplotlib.font_manager", std_logging.WARNING, "/site/matplotlib/font_manager.py",
            "Matplotlib is building the font cache; this may take a moment."),
    _record("matplotlib.font_manager", std_logging.INFO, "/site/matplotlib/font_manager.py",
            "generated new fontManager"),
]


def test_short_lines_drop_library_info_but_keep_warnings():
  lines = _printed(RECORDS, False)
  assert len(lines) == 2, lines
  assert re.fullmatch(r"\d\d:\d\d:\d\d step 10/300 \| eta 1m", lines[0])
  assert re.fullmatch(r"\d\d:\d\d:\d\d warning: disk slow", lines[1])


def test_verbose_restores_the_absl_prefix_and_every_line():
  lines = _printed(RECORDS, True)
  assert len(lines) == 6, lines
  assert re.match(r"I\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ pretrain\.py:12\] step 10/300", lines[0])
  assert "Unable to initialize backend 'tpu'" in lines[1]
