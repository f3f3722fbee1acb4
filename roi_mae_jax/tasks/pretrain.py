r"""Task `pretrain`: the region-aware masked autoencoder on a device mesh.

    python -m roi_mae_jax.main --config=configs/pretrain_aal3.py --workdir=runs/demo
    pretrain.demo_checkpoint("demo", steps=40)   # from Python: the tiny run, a checkpoint

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
and pretrain_summary.json. The loop itself is training/loop.py.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from roi_mae_jax import errors
from roi_mae_jax import metrics as metrics_lib
from roi_mae_jax import outputs
from roi_mae_jax import plots
from roi_mae_jax import tasks
from roi_mae_jax.data import pipeline
from roi_mae_jax.data import sources
from roi_mae_jax.devices import distributed
from roi_mae_jax.devices import sharding as sharding_lib
from roi_mae_jax.masking import samplers
from roi_mae_jax.model import mae as model_lib
from roi_mae_jax.model import targets
from roi_mae_jax.training import defaults
from roi_mae_jax.training import loop
from roi_mae_jax.training import train_step

REQUIRED_KEYS = ("seed", "total_steps", "batch_size", "frames", "grid.voxel_size_mm",
                 "patches.size", "patches.frames", "mask.strategy", "mask.ratio", "model.size",
                 "optim.learning_rate", "log_every", "checkpoint_every")
# Settings a resumed run may change without being a different run.
RESUMABLE_CHANGES = ("log_every", "checkpoint_every", "keep_checkpoints",
                     "fault_kill_after_step", "overwrite", "distributed",
                     "resume_onto_changed_data")


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

  # --- The loop (checkpoints, resume, stop on signals) ------------------------
  _check_total_steps(workdir, config)
  outputs.write_config(workdir, config, may_differ=RESUMABLE_CHANGES)
  try:
    state = loop.train(config, workdir, setup, iterator)
  finally:
    pipeline.close(iterator)  # its worker processes, if any, end with the run

  # --- Figures --------------------------------------------------------------
  write_figures(config, workdir, setup, state, source, spec, sampler)


def write_figures(config, workdir: str, setup: train_step.TrainSetup, state, source,
                  spec: model_lib.TokenSpec, sampler: samplers.MaskSampler) -> None:
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
  prediction = targets.voxel_values(np.asarray(out["prediction"]), spec)
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
      "final_explained": last.get("explained"),
      "example_masked_loss": float(out["loss"]),
      "tokens_per_window": spec.num_tokens, "visible_tokens": sampler.num_keep,
      "brain_patches": spec.num_patches, "box_patches": int(np.prod(spec.patch_grid)),
      "mask_strategy": config.mask.strategy, "mask_ratio": config.mask.ratio,
      "model_size": config.model.size})
  logging.info("wrote loss_curve.png, reconstruction.png, pretrain_summary.json to %s", workdir)


def demo_checkpoint(workdir: str, steps: int = 40) -> str:
  """Runs `tiny` pretraining for `steps` steps into `workdir` (resumes one already there);
  returns `workdir`, a checkpoint that probe, attribute and the notebook load."""
  config = defaults.tiny(defaults.default())
  config.total_steps = int(steps)
  config.checkpoint_every = int(steps)
  config.log_every = max(1, int(steps) // 4)
  tasks.run_task(config, workdir)
  return workdir
