"""Input speed: prepare throughput and memory, pipeline windows/s, input wait in training.

Writes synthetic subjects in the ADHD-200 Athena layout (4 mm LAS, as the
real release) unless --input_dir names a real one, prepares them with the
prepare task, then reads windows through the Grain pipeline: alone (windows/s)
and feeding the train step of the chosen model, timing how long each step
waits for its batch. Target: input wait under 5% of step time.

    python -m roi_mae_jax.bench data                     # 8 subjects x 120 frames, small model
    python -m roi_mae_jax.bench data --workers=4 --subjects=32
    python -m roi_mae_jax.bench data --input_dir=/data/ADHD200_Athena --keep=runs/prepared
    python -m roi_mae_jax.bench data --prepare_config=configs/prepare.py:paper \
        --train_config=configs/pretrain_aal3.py:adhd200 --run_frames=176 --stop_after=pipeline
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import jax
import numpy as np

from roi_mae_jax import tasks
from roi_mae_jax.bench import step_time as bench_train
from roi_mae_jax.brain import atlas as atlas_lib
from roi_mae_jax.config import blocks
from roi_mae_jax.data import pipeline
from roi_mae_jax.data import synthetic
from roi_mae_jax.devices import sharding
from roi_mae_jax.tasks import prepare

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--subjects", type=int, default=8, help="synthetic subjects to write")
  parser.add_argument("--run_frames", type=int, default=120, help="frames per synthetic run")
  parser.add_argument("--input_dir", default="", help="an ADHD-200 folder instead")
  parser.add_argument("--workers", type=int, default=2, help="prepare processes")
  parser.add_argument("--prepare_config", default=os.path.join(REPO, "configs/prepare.py"))
  parser.add_argument("--train_config", default=os.path.join(REPO, "configs/pretrain_aal3.py"))
  parser.add_argument("--size", default="small", help="model of the train step")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--batches", type=int, default=50, help="batches for the pipeline alone")
  parser.add_argument("--steps", type=int, default=6, help="train steps timed with real input")
  parser.add_argument("--keep", default="", help="prepare into this folder (kept)")
  parser.add_argument("--stop_after", default="train", choices=["prepare", "pipeline", "train"],
                      help="skip the later parts (e.g. no CPU train step at paper scale)")


def _write_synthetic(root: str, subjects: int, frames: int) -> float:
  cfg = synthetic.synthetic_config()
  cfg.update(num_subjects=subjects, run_frames=frames, num_sites=4)
  start = time.perf_counter()
  data = synthetic.SyntheticFMRI(atlas_lib.atlas_on_grid(synthetic.athena_grid()), cfg, 0)
  synthetic.write_adhd200(data, root)
  return time.perf_counter() - start


def _prepare(args, input_dir: str, workdir: str) -> dict:
  config = blocks.load_config_file(args.prepare_config)
  config.input_dir, config.workers = input_dir, args.workers
  start = time.perf_counter()
  tasks.run_task(config, workdir)
  seconds = time.perf_counter() - start
  report = prepare.read_report(workdir)
  used = sum(r["status"] == "used" for r in report)
  with open(os.path.join(workdir, "prepare_summary.json"), encoding="utf-8") as f:
    rss = json.load(f)["peak_rss_mib"]
  print(f"prepare: {used} of {len(report)} scans in {seconds:.1f} s = "
        f"{len(report) / seconds * 60:.1f} subjects/min with {args.workers} workers; "
        f"peak RSS {rss['main']:.0f} MiB (main), {rss['largest_worker']:.0f} MiB (largest "
        "worker)")
  return {"prepare_s": seconds, "subjects": len(report), "subjects_per_min":
          len(report) / seconds * 60, "peak_rss_main_mib": rss["main"],
          "peak_rss_worker_mib": rss["largest_worker"]}


def _pipeline_alone(config, workdir: str, batches: int) -> tuple[dict, object]:
  source = pipeline.ShardWindows(workdir, config.frames)
  ds = pipeline.training_dataset(source, config.batch_size, config.seed,
                                 windows_per_subject=config.data.windows_per_subject)
  it = pipeline.make_iterator(ds, config.data.read_threads, config.data.prefetch)
  next(it)  # opens the readers, starts the threads
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  rate = batches * config.batch_size / (time.perf_counter() - start)
  window = source.draw(0, np.random.default_rng(0))["windows"]
  print(f"pipeline alone: {rate:.1f} windows/s ({config.data.read_threads} threads; a window "
        f"is {window.shape} float32 = {window.nbytes / 2**20:.1f} MiB)")
  return {"pipeline_windows_per_s": rate}, ds


def _train_with_input(config, ds, steps: int) -> dict:
  setup, spec, _, _ = bench_train.build(config)
  it = pipeline.make_iterator(ds, config.data.read_threads, config.data.prefetch)
  state = setup.init()
  batch = sharding.global_batch({"windows": next(it)["windows"]}, setup.mesh)
  compiled, _ = setup.compile(state, batch)
  state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  waited, start = 0.0, time.perf_counter()
  for _ in range(steps):
    before = time.perf_counter()
    local = next(it)["windows"]
    waited += time.perf_counter() - before
    state, metrics = compiled(state, sharding.global_batch({"windows": local}, setup.mesh))
    jax.block_until_ready(metrics)
  total = time.perf_counter() - start
  step_s = total / steps
  consumed = config.batch_size / step_s
  print(f"train step ({config.model.size}, batch {config.batch_size}, {spec.num_tokens} "
        f"tokens): {step_s:.2f} s/step = {consumed:.2f} windows/s consumed; input wait "
        f"{waited / steps * 1e3:.1f} ms/step = {waited / total:.2%} of step time")
  return {"step_s": step_s, "windows_per_s_consumed": consumed,
          "input_wait_s_per_step": waited / steps, "input_wait_share": waited / total}


def run(args) -> dict:
  figures = {}
  with tempfile.TemporaryDirectory() as tmp:
    input_dir = args.input_dir
    if not input_dir:
      input_dir = os.path.join(tmp, "adhd200")
      seconds = _write_synthetic(input_dir, args.subjects, args.run_frames)
      print(f"wrote {args.subjects} synthetic subjects x {args.run_frames} frames (ADHD-200 "
            f"layout, 4 mm LAS) in {seconds:.1f} s")
    workdir = args.keep or os.path.join(tmp, "prepared")
    figures.update(_prepare(args, input_dir, workdir))
    if args.stop_after == "prepare":
      return figures
    config = blocks.load_config_file(args.train_config)
    config.data.shards, config.model.size, config.batch_size = workdir, args.size, args.batch
    alone, ds = _pipeline_alone(config, workdir, args.batches)
    figures.update(alone)
    if args.stop_after == "pipeline":
      return figures
    figures.update(_train_with_input(config, ds, args.steps))
  figures["pipeline_over_consumption"] = (figures["pipeline_windows_per_s"] /
                                          figures["windows_per_s_consumed"])
  print(f"the pipeline delivers {figures['pipeline_over_consumption']:.0f}x what the step "
        "consumes")
  return figures
