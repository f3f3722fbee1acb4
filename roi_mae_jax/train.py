r"""Task `pretrain`: the region-aware masked autoencoder on a device mesh.

    python -m roi_mae_jax.main --config=configs/pretrain_aal3.py --workdir=runs/demo

Re-running with the same workdir resumes from the newest intact checkpoint
(same data order, same masks, same numbers); a damaged newer one is reported
and moved to checkpoints.rejected/. A resume onto a prepared dataset that
changed since (data_fingerprint.json) is refused unless
resume_onto_changed_data=True. A resume must keep total_steps (the
learning-rate schedule depends on it): another value is refused. A full disk
stops the run with a message naming the checkpoint kept. SIGTERM or SIGINT
(Ctrl-C) stops it after the step in flight: that step is saved and sealed,
every process agreeing on it, and the run raises `errors.Stopped` (the CLI
prints where to resume and exits 143 / 130). Writes to WORKDIR: config.json,
checkpoints/, metrics.jsonl, tensorboard/, loss_curve.png, reconstruction.png
and pretrain_summary.json.
"""

from __future__ import annotations

import json
import os
import signal
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from roi_mae_jax import checkpoint as checkpoint_lib
from roi_mae_jax import console
from roi_mae_jax import dataset_identity
from roi_mae_jax import distributed
from roi_mae_jax import errors
from roi_mae_jax import masking
from roi_mae_jax import metrics as metrics_lib
from roi_mae_jax import model as model_lib
from roi_mae_jax import outputs
from roi_mae_jax import plots
from roi_mae_jax import preemption
from roi_mae_jax import sharding as sharding_lib
from roi_mae_jax import train_step
from roi_mae_jax.data import pipeline
from roi_mae_jax.data import sources

REQUIRED_KEYS = ("seed", "total_steps", "batch_size", "frames", "grid.voxel_size_mm",
                 "patches.size", "patches.frames", "mask.strategy", "mask.ratio", "model.size",
                 "optim.learning_rate", "log_every", "checkpoint_every")
# Settings a resumed run may change without being a different run.
RESUMABLE_CHANGES = ("log_every", "checkpoint_every", "keep_checkpoints",
                     "fault_kill_after_step", "overwrite", "distributed",
                     "resume_onto_changed_data")


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


def _check_total_steps(workdir: str, config: ml_collections.ConfigDict) -> None:
  """A resume keeps total_steps: the warmup + cosine schedule is laid out over it."""
  path = os.path.join(workdir, outputs.CONFIG_FILE)
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    before = json.load(f).get("total_steps")
  if before is not None and before != config.total_steps:
    raise errors.InputError(
        f"config.total_steps={config.total_steps} differs from the run in {workdir} "
        f"({before} steps): its learning-rate schedule is laid out over {before} steps, so "
        f"resume with --config.total_steps={before} or start another --workdir")


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


def _loop(config, workdir: str, setup: train_step.TrainSetup, spec: model_lib.TokenSpec, mesh,
          state, iterator, ckpt: checkpoint_lib.Checkpointer,
          stop: preemption.StopOnSignal | None = None):
  """Steps from the state's step to total_steps: log, check, checkpoint; returns the state.

  Raises `errors.Stopped` after saving the step reached when `stop` agrees a
  signal arrived."""
  stop = stop or preemption.StopOnSignal(signals=())
  start_step = int(jax.device_get(state["step"]))
  log = metrics_lib.MetricsLog(workdir, config.total_steps, resumed_from=start_step)
  try:
    tokens_per_step = config.batch_size * spec.num_tokens
    compiled, pending = None, []
    last_time, last_step = time.time(), start_step
    for step in range(start_step, config.total_steps):
      batch = sharding_lib.global_batch({"windows": next(iterator)["windows"]}, mesh)
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
        record = {k: float(np.mean([v[k] for v in values])) for k in ("loss", "grad_norm")}
        record.update(param_norm=float(values[-1]["param_norm"]),
                      learning_rate=float(values[-1]["learning_rate"]),
                      step_time=seconds_per_step,
                      tokens_per_s=tokens_per_step / seconds_per_step)
        log.write(done, record)
        log.progress(done, seconds_per_step, f"loss {record['loss']:.4f}")
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


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  # --- Processes and mesh -------------------------------------------------
  distributed.initialize(config.get("distributed"))
  if not config.data.get("streams", 0):  # recorded, so a resume reads the same batches
    config.data.streams = jax.process_count()
  mesh = sharding_lib.mesh_from_config(config.mesh)
  sharding_lib.check_batch_size(config.batch_size, mesh)
  local_batch = config.batch_size // jax.process_count()

  # --- Tokens, masks and the train state's layout ----------------------------
  setup = train_step.TrainSetup.from_config(config, mesh)
  spec, sampler = setup.parts.spec, setup.parts.sampler
  logging.info("%d brain patches x %d time chunks = %d tokens per window "
               "(%d visible, %d masked, strategy %s)", spec.num_patches, spec.num_time,
               spec.num_tokens, sampler.num_keep, sampler.num_mask, config.mask.strategy)

  # --- Input --------------------------------------------------------------
  source = sources.training_source(config, multiple_of=config.patches.size)
  iterator = pipeline.iterator_from_config(config, source, local_batch)

  # --- State, checkpoints and the loop --------------------------------------
  _check_total_steps(workdir, config)
  outputs.write_config(workdir, config, may_differ=RESUMABLE_CHANGES)
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                     keep=config.keep_checkpoints)
  try:
    dataset_identity.check_and_record(
        workdir, config.data.shards, resuming=ckpt.latest_step() is not None,
        allow_change=bool(config.get("resume_onto_changed_data", False)))
  except errors.InputError:
    ckpt.close()
    raise
  try:
    with preemption.StopOnSignal() as stop:
      state = _resume_or_init(ckpt, setup, iterator)
      state = _loop(config, workdir, setup, spec, mesh, state, iterator, ckpt, stop)
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
  finally:
    pipeline.close(iterator)  # its worker processes, if any, end with the run

  # --- Figures --------------------------------------------------------------
  write_figures(config, workdir, setup, state, source, spec, sampler)


def write_figures(config, workdir: str, setup: train_step.TrainSetup, state, source,
                  spec: model_lib.TokenSpec, sampler: masking.MaskSampler) -> None:
  """loss_curve.png, reconstruction.png and pretrain_summary.json.

  Every process runs the example forward pass (parameters may be sharded
  across hosts); process 0 writes the files.
  """
  example = source.draw(0, np.random.default_rng(config.seed))
  windows = example["windows"][None]
  masks = sampler.sample_batch(jax.random.key(config.seed + 1), 1)
  forward = jax.jit(lambda params, w, m: nnx.merge(setup.graphdef, params)(w, m),
                    out_shardings=sharding_lib.replicated(setup.mesh))
  out = jax.device_get(forward(state["params"], windows, masks))
  if jax.process_index() != 0:
    return
  records = metrics_lib.read_metrics(workdir)
  fig = plots.loss_curve_figure(records, title=f"{config.mask.strategy} masking")
  plots.save(fig, os.path.join(workdir, "loss_curve.png"))
  prediction = np.asarray(out["prediction"])
  tokens = np.asarray(out["tokens"])
  if config.model.norm_target:  # back from per-patch normalised units
    prediction = prediction * tokens.std(-1, keepdims=True) + tokens.mean(-1, keepdims=True)
  mask = np.asarray(out["mask"])[0]
  filled = np.where(mask[None, :, None], prediction, tokens)
  masked_input = np.where(mask[None, :, None], np.nan, tokens)
  fig = plots.reconstruction_figure(
      windows[0], np.asarray(spec.unpatchify(masked_input))[0],
      np.asarray(spec.unpatchify(filled))[0], source.brain, source.grid.affine,
      point_mm=config.get("figure_point_mm", (30.0, -20.0, 8.0)))
  plots.save(fig, os.path.join(workdir, "reconstruction.png"))
  first, last = (records[0], records[-1]) if records else ({}, {})
  outputs.write_json(os.path.join(workdir, "pretrain_summary.json"), {
      "steps": int(jax.device_get(state["step"])),
      "first_logged_loss": first.get("loss"), "final_loss": last.get("loss"),
      "example_masked_loss": float(out["loss"]),
      "tokens_per_window": spec.num_tokens, "visible_tokens": sampler.num_keep,
      "brain_patches": spec.num_patches, "box_patches": int(np.prod(spec.patch_grid)),
      "mask_strategy": config.mask.strategy, "mask_ratio": config.mask.ratio,
      "model_size": config.model.size})
  logging.info("wrote loss_curve.png, reconstruction.png, pretrain_summary.json to %s", workdir)
