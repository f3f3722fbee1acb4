"""Worker processes that never outlive their parent.

    pool = ProcessPoolExecutor(n, initializer=process_guard.worker_init)
    dataset.mp_prefetch(options, worker_init_fn=process_guard.grain_worker_init)

A parent ended by SIGKILL (or the OOM killer) runs no clean-up, so its
workers would go on reading or writing shards on their own. Each worker
watches its parent's PID from a daemon thread and exits when it changes
(the parent is gone; the worker was re-parented). Workers also ignore
SIGINT: Ctrl-C reaches the whole process group, and the parent decides how
to stop them.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

POLL_S = 0.2


def exit_with_parent(poll_s: float = POLL_S) -> None:
  """Starts the watch thread of this process (call once, in the worker)."""
  parent = os.getppid()

  def watch() -> None:
    while True:
      time.sleep(poll_s)
      if os.getppid() != parent:
        os._exit(1)  # pylint: disable=protected-access  (no clean-up: the parent is gone)

  threading.Thread(target=watch, name="exit_with_parent", daemon=True).start()


def worker_init() -> None:
  """Initializer of a worker process: SIGINT is the parent's, and it dies with the parent."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  exit_with_parent()


# Batches in flight in shared memory when a run stops are removed by Python's resource
# tracker, which then warns about each "leak" on the console, after the run's last line.
_TRACKER_LEAK_WARNING = "ignore:resource_tracker:UserWarning"


def quiet_resource_tracker() -> None:
  """Silences that warning in the resource tracker (call before worker processes start:
  the tracker takes its warning options from this process's `-W` options)."""
  if _TRACKER_LEAK_WARNING not in sys.warnoptions:
    sys.warnoptions.append(_TRACKER_LEAK_WARNING)


def grain_worker_init(worker_index: int, worker_count: int) -> None:  # pylint: disable=unused-argument
  """`worker_init` with Grain's `worker_init_fn` signature."""
  worker_init()
