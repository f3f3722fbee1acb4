"""The pretraining loop: resume or initialise, step, log, checkpoint, stop cleanly.

    setup = train_step.TrainSetup.from_config(config, mesh)
    state = loop.train(config, workdir, setup, iterator)   # to config.total_steps

`train` keeps WORKDIR/checkpoints (resumed from the newest intact one, a
damaged newer one set aside) and WORKDIR/metrics.jsonl; a non-finite loss or
a full disk stops it with a `TrainingError` naming the checkpoint kept;
SIGTERM / SIGINT stop it after the step in flight, saved and sealed, with
`errors.Stopped`. The task that writes the run's figures is tasks/pretrain.
"""

from __future__ import annotations

import os
import signal
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from roi_mae_jax import console
from roi_mae_jax import errors
from roi_mae_jax import metrics as metrics_lib
from roi_mae_jax import preemption
from roi_mae_jax.data import identity
from roi_mae_jax.devices import sharding as sharding_lib
from roi_mae_jax.training import checkpoint as checkpoint_lib
from roi_mae_jax.training import train_step


def train(config: ml_collections.ConfigDict, workdir: str, setup: train_step.TrainSetup,
          iterator) -> dict:
  """Steps the state (resumed from WORKDIR/checkpoints or new) to total_steps; returns it."""
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                     keep=config.keep_checkpoints)
  try:
    identity.check_and_record(
        workdir, config.data.shards, resuming=ckpt.latest_step() is not None,
        allow_change=bool(config.get("resume_onto_changed_data", False)))
  except errors.InputError:
    ckpt.close()
    raise
  try:
    with preemption.StopOnSignal() as stop:
      state = _resume_or_init(ckpt, setup, iterator)
      state = steps(config, workdir, setup, state, iterator, ckpt, stop)
      ckpt.close()
  except errors.Stopped:
    ckpt.close()
    raise
  except Exception as e:  # pylint: disable=broad-except
    _close_after_error(ckpt)
    if errors.is_disk_full(e):
      details = console.library_errors_path()
      raise errors.TrainingError(
          f"no space left on device ({_first_line(e)}); training stopped and "
          f"{_kept(ckpt)}: free space and re-run the same command to resume" +
          (f" (the libraries' tracebacks are in {details})" if details else "")) from e
    raise
  return state


def _check_finite(state, step: int, ckpt: checkpoint_lib.Checkpointer) -> None:
  bad = int(jax.device_get(state["bad_step"]))
  if bad >= 0:
    ckpt.wait()
    last = ckpt.latest_step()
    kept = f"checkpoint step {last} in {ckpt.directory} is kept" if last is not None \
        else "no checkpoint had been written"
    raise errors.TrainingError(
        f"loss or gradient norm was not finite at step {bad + 1} (seen by step {step}); "
        f"training stopped and {kept}. Lower optim.learning_rate or check the data.")


def _first_line(error: BaseException) -> str:
  return (str(error).splitlines() or [type(error).__name__])[0][:200]


def _kept(ckpt: checkpoint_lib.Checkpointer) -> str:
  last = ckpt.newest_sealed()
  return (f"checkpoint step {last} in {ckpt.directory} is kept" if last is not None
          else "no checkpoint had been written")


def _close_after_error(ckpt: checkpoint_lib.Checkpointer) -> None:
  """Finishes pending saves so the process can exit; their own errors are only logged."""
  try:
    ckpt.close()
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("a pending checkpoint save failed too: %s", _first_line(e))


def _resume_or_init(ckpt: checkpoint_lib.Checkpointer, setup: train_step.TrainSetup, iterator):
  if ckpt.latest_step() is None:
    return setup.init()
  state, resumed_data = ckpt.restore(setup.abstract_state, data_iterator=iterator)
  ckpt.set_aside_rejected()  # this run saves those steps again
  logging.info("resumed from %s at step %d%s", ckpt.directory, int(state["step"]),
               "" if resumed_data else " (no data position saved: the batches start over)")
  return state


def _stop(config, state, done: int, iterator, ckpt: checkpoint_lib.Checkpointer,
          stop: preemption.StopOnSignal) -> errors.Stopped:
  """Saves step `done` (unless just saved), waits until it is sealed; the exception to raise."""
  _check_finite(state, done, ckpt)
  if not ckpt.has_step(done):  # a save of this step may be in flight already
    ckpt.save(done, state, data_iterator=iterator)
  ckpt.wait()
  if jax.process_count() > 1:  # process 0 seals after the commit: nobody exits before that
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f"checkpoint {done} sealed")
  return stop.stopped(
      f"stopped at step {done} of {config.total_steps}; checkpoint step {done} is saved and "
      f"sealed in {ckpt.directory}: re-run the same command to resume from it")


def steps(config: ml_collections.ConfigDict, workdir: str, setup: train_step.TrainSetup, state,
          iterator, ckpt: checkpoint_lib.Checkpointer,
          stop: preemption.StopOnSignal | None = None):
  """Steps from the state's step to total_steps: log, check, checkpoint; returns the state.

  Raises `errors.Stopped` after saving the step reached when `stop` agrees a
  signal arrived."""
  stop = stop or preemption.StopOnSignal(signals=())
  start_step = int(jax.device_get(state["step"]))
  log = metrics_lib.MetricsLog(workdir, config.total_steps, resumed_from=start_step)
  try:
    tokens_per_step = config.batch_size * setup.parts.spec.num_tokens
    compiled, pending = None, []
    last_time, last_step = time.time(), start_step
    for step in range(start_step, config.total_steps):
      batch = sharding_lib.global_batch({"windows": next(iterator)["windows"]}, setup.mesh)
      if compiled is None:
        compiled = _compile(setup, state, batch)
        last_time = time.time()
      state, step_metrics = compiled(state, batch)
      pending.append(step_metrics)
      done = step + 1
      at_log = done % config.log_every == 0 or done == config.total_steps
      if at_log:
        _check_finite(state, done, ckpt)
        values = jax.device_get(pending)
        elapsed = time.time() - last_time
        seconds_per_step = elapsed / max(done - last_step, 1)
        record = {k: float(np.mean([v[k] for v in values]))
                  for k in ("loss", "grad_norm", "masked_loss", "target_power")}
        # The share of the masked target the model predicts (0: no better than 0s).
        record["explained"] = 1.0 - record["masked_loss"] / max(record["target_power"], 1e-12)
        record.update(param_norm=float(values[-1]["param_norm"]),
                      learning_rate=float(values[-1]["learning_rate"]),
                      step_time=seconds_per_step,
                      tokens_per_s=tokens_per_step / seconds_per_step)
        log.write(done, record)
        log.progress(done, seconds_per_step,
                     f"loss {record['loss']:.4f} (explains {record['explained']:.0%})")
        pending, last_time, last_step = [], time.time(), done
      if done % config.checkpoint_every == 0 or done == config.total_steps:
        _check_finite(state, done, ckpt)
        ckpt.save(done, state, data_iterator=iterator)
      if done == config.get("fault_kill_after_step", 0):
        ckpt.wait()  # fault injection for resume tests: die hard, no clean-up
        os.kill(os.getpid(), signal.SIGKILL)
      # Several processes agree at log steps only (they then stop after the same
      # one): the agreement is a collective that waits for the step in flight,
      # which at every step would serialise the host with the devices.
      if (at_log or jax.process_count() == 1) and stop.agreed():
        raise _stop(config, state, done, iterator, ckpt, stop)
  finally:
    log.close()  # its TensorBoard writer thread would keep the process alive
  return state


def _compile(setup: train_step.TrainSetup, state, batch):
  start = time.time()
  compiled, facts = setup.compile(state, batch)
  memory = facts["memory"]
  logging.info("step compiled in %.1f s: %.3g FLOPs per step and device, %s", time.time() - start,
               facts["flops"],
               f"{memory.temp_size_in_bytes / 2**20:.0f} MiB temporaries" if memory else "")
  return compiled
