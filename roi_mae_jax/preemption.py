"""SIGTERM and SIGINT as a request to stop at the next step boundary, agreed by all processes.

    with preemption.StopOnSignal() as stop:
      for step in range(start, total):
        state = train_step(state, batch)
        if stop.agreed():             # the same answer on every process, at the same step
          save_checkpoint(step + 1)   # then raise stop.stopped("...")

Preemptible machines (a TPU VM under maintenance, a SLURM job past its
time, Kubernetes evicting a pod) send SIGTERM and wait a grace period before
SIGKILL; a user presses Ctrl-C (SIGINT). The first signal only sets a flag,
so the step in flight finishes and the caller saves that step. In a
multi-process run every process calls `agreed()` at the same steps (the
pretraining loop: its log steps, since the collective waits for the step in
flight): a tiny all-gather of the flag (as MaxText and Orbax agree on a preemption step) makes
every process stop after the same step, even when only one got the signal.
A second signal of the same kind acts as if no handler were installed (the
process ends at once), so a stuck save can still be interrupted.

Library loops without a step of their own to save (fine-tuning, compare's
evaluations) call `check(where, kept)` between steps: it raises `Stopped`
when the innermost active `StopOnSignal` has received a signal.

`Stopped` carries the exit status the CLI uses: 128 + the signal number
(130 for SIGINT, 143 for SIGTERM), what a shell reports for a process ended
by that signal, so job scripts see the same status with or without this.
"""

from __future__ import annotations

import signal
import threading

import numpy as np

from roi_mae_jax import errors

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_ACTIVE: list["StopOnSignal"] = []   # innermost last


def exit_status(signum: int) -> int:
  """The documented exit status after stopping on signal `signum`: 128 + signum."""
  return 128 + int(signum)


class StopOnSignal:
  """Installs the handlers between `__enter__` and `__exit__` (main thread only).

  Outside the main thread (a notebook's worker thread) Python cannot install
  handlers; the object then never requests a stop.
  """

  def __init__(self, signals: tuple[int, ...] = SIGNALS):
    self.signals = signals
    self.received: int | None = None
    self._previous: dict[int, object] = {}

  def _handle(self, signum, frame) -> None:  # pylint: disable=unused-argument
    if self.received is not None:  # a second signal: as if none were caught
      previous = self._previous.get(signum, signal.SIG_DFL)
      signal.signal(signum, previous)
      if callable(previous):
        previous(signum, frame)
      else:
        signal.raise_signal(signum)
      return
    self.received = signum

  def __enter__(self) -> "StopOnSignal":
    if threading.current_thread() is threading.main_thread():
      for signum in self.signals:
        self._previous[signum] = signal.signal(signum, self._handle)
    _ACTIVE.append(self)
    return self

  def __exit__(self, *exc) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}
    if self in _ACTIVE:
      _ACTIVE.remove(self)

  @property
  def requested(self) -> bool:
    """Whether this process received a signal (no agreement; see `agreed`)."""
    return self.received is not None

  @property
  def name(self) -> str:
    return signal.Signals(self.received).name if self.received else ""

  def agreed(self) -> bool:
    """Whether any process received a signal; collective: every process calls it in turn."""
    import jax  # pylint: disable=g-import-not-at-top  (prepare uses this module without JAX)
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    seen = multihost_utils.process_allgather(np.int32(self.received or 0))
    signums = [int(s) for s in np.ravel(seen) if s]
    if signums and self.received is None:
      self.received = signums[0]  # stopped by another process's signal
    return bool(signums)

  def stopped(self, message: str) -> errors.Stopped:
    """The exception that ends the task: `message` and the status for this signal."""
    return errors.Stopped(f"{self.name}: {message}", exit_status(self.received or 0))


def check(where: str, kept: str) -> None:
  """Raises `Stopped` ("SIGTERM: stopped <where>; <kept>") if a signal arrived (single
  process: loops that call this have no cross-process step to agree on)."""
  for active in reversed(_ACTIVE):
    if active.requested:
      raise active.stopped(f"stopped {where}; {kept}")
