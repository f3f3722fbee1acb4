"""All headline figures of one training setting, in one run.

Trains the config's model on real input (the Grain pipeline over the
config's data: synthetic, or prepared shards) and reports: step time,
tokens/s, MFU against the matmul peak measured in the same run, the share of
step time spent sampling masks (the sampler timed alone, same batch and
device) and waiting for data (next(iterator) plus the copy to devices),
tokens saved by brain-only patches, and memory: XLA's per-device need of the compiled step,
the device's peak where it reports one, and the host's peak RSS. With
--max_batch on a device that reports its memory limit, also the largest batch
per device whose compiled step fits. Then the `memory` part (paper-scale step
memory per window for each attention kernel x remat; see bench/memory.py).

    python -m roi_mae_jax.bench                        # = bench all: demo grid, small model
    python -m roi_mae_jax.bench all --json=bench.json
    python -m roi_mae_jax.bench all --config=configs/pretrain_aal3.py:adhd200 --size=base \
        --dtype=bfloat16 --attention=cudnn --batch=8 --max_batch     # paper scale, one GPU
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import jax
import numpy as np

from roi_mae_jax import metrics as metrics_lib
from roi_mae_jax.bench import masks as bench_masks
from roi_mae_jax.bench import matmul_ceiling
from roi_mae_jax.bench import memory as bench_memory
from roi_mae_jax.bench import step_time as bench_train
from roi_mae_jax.data import pipeline
from roi_mae_jax.data import sources
from roi_mae_jax.devices import sharding


def add_arguments(parser: argparse.ArgumentParser) -> None:
  bench_train.add_arguments(parser)
  parser.add_argument("--shards", default="", help="a prepare workdir (default: the config's data)")
  parser.add_argument("--mask_repeats", type=int, default=20)
  parser.add_argument("--max_batch", action="store_true",
                      help="search the largest batch per device that fits (needs a device "
                           "that reports its memory limit, e.g. a GPU)")
  bench_memory.add_arguments(parser)  # --memory_config='' skips that part


def largest_batch(fits: Callable[[int], bool], start: int, limit: int = 4096) -> int:
  """The largest b <= limit with fits(b), given fits is monotone; 0 if not even 1 fits.

  Doubles from `start` while it fits, then bisects.
  """
  if not fits(1):
    return 0
  low, high = 1, None  # fits(low); not fits(high)
  b = max(start, 2)
  while b <= limit:
    if not fits(b):
      high = b
      break
    low, b = b, b * 2
  if high is None:
    return low
  while high - low > 1:
    middle = (low + high) // 2
    if fits(middle):
      low = middle
    else:
      high = middle
  return low


def step_memory(config, per_device_batch: int) -> int | None:
  """Bytes per device that the compiled step needs at this batch, or None when the
  compiler runs out of memory (compiled for shapes only: nothing is allocated)."""
  figures = bench_memory.compiled_step(config, per_device_batch)
  return None if figures is None else figures.get("step_memory_bytes")


def fits_in(config, limit_bytes: int, headroom: float = 0.9) -> Callable[[int], bool]:
  """Whether a per-device batch's compiled step needs at most headroom x `limit_bytes`."""
  def fits(b: int) -> bool:
    need = step_memory(config, b)
    shown = "out of memory" if need is None else f"{need / 2**30:.2f} GiB"
    print(f"  batch {b} per device: step needs {shown} of {limit_bytes / 2**30:.1f}")
    return need is not None and need <= headroom * limit_bytes
  return fits


def run(args) -> dict:
  config = bench_train.configure(args)
  if args.shards:
    config.data.shards = args.shards
  setup, spec, sampler, patch_map = bench_train.build(config)
  print(bench_train.describe(config, setup, spec, patch_map))
  box_tokens = patch_map.num_patches * spec.num_time
  figures = {"device": jax.devices()[0].device_kind, "devices": setup.mesh.size,
             "platform": jax.default_backend(), "model": config.model.size,
             "dtype": config.model.dtype, "attention": config.model.attention or "default",
             "batch": config.batch_size, "mask": config.mask.strategy,
             "grid": patch_map.atlas.grid.describe(), "frames": spec.window_shape[3],
             "tokens_brain": spec.num_tokens, "tokens_box": box_tokens,
             "tokens_saved": 1 - spec.num_tokens / box_tokens,
             "encoder_tokens": sampler.num_keep}

  # Real input: the same source and iterator as `task pretrain`.
  source = sources.training_source(config, multiple_of=config.patches.size)
  iterator = pipeline.iterator_from_config(config, source, config.batch_size // jax.process_count())
  state = setup.init()
  batch = sharding.global_batch({"windows": next(iterator)["windows"]}, setup.mesh)
  compiled, compile_figures = bench_train.compile_step(setup, state, batch)
  figures.update(compile_figures)
  state, metrics = compiled(state, batch)  # warm-up
  jax.block_until_ready(metrics)
  waits, steps, cpu_steps = [], [], []
  for _ in range(args.steps):
    start = time.perf_counter()
    batch = sharding.global_batch({"windows": next(iterator)["windows"]}, setup.mesh)
    waits.append(time.perf_counter() - start)
    start, start_cpu = time.perf_counter(), time.process_time()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    steps.append(time.perf_counter() - start)
    cpu_steps.append(time.process_time() - start_cpu)
  step_s = float(np.median(steps))
  figures.update(bench_train.speed_figures(config, spec, sampler, step_s, setup.mesh.size,
                                           args.peak_size, float(np.median(cpu_steps))))
  figures["data_wait_s"] = float(np.median(waits))
  figures["data_wait_share"] = float(np.sum(waits) / (np.sum(waits) + np.sum(steps)))
  figures["mask_sampling_s"] = float(np.median(
      bench_masks.time_batches(sampler, config.batch_size, args.mask_repeats)))
  figures["mask_sampling_share"] = figures["mask_sampling_s"] / step_s
  figures["loss"] = float(metrics["loss"])
  if args.vs_dtype:
    figures["vs_dtype"] = bench_train.versus_dtype(config, args, [compiled, state, batch])

  stats = jax.devices()[0].memory_stats() or {}
  figures["device_peak_bytes"] = stats.get("peak_bytes_in_use")
  figures["device_limit_bytes"] = stats.get("bytes_limit")
  figures["host_peak_rss_mib"] = metrics_lib.peak_rss_mib()
  if args.ceiling:  # after the host peak (see bench train)
    figures["matmul_ceiling"] = bench_train.ceiling_figures(
        config, spec, sampler, setup.mesh.size, args.peak_size, figures)
  if args.max_batch:
    if figures["device_limit_bytes"]:
      print("largest batch per device:")
      per_device = max(config.batch_size // jax.device_count(), 1)
      figures["largest_batch_per_device"] = largest_batch(
          fits_in(config, figures["device_limit_bytes"]), per_device)
    else:
      print(f"largest batch: skipped, {figures['device']} reports no memory limit")
  _print(figures, config.model.dtype)
  if args.memory_config:
    print()
    figures["memory"] = bench_memory.run(args)
  return figures


def _mib(value) -> str:
  return "n/a" if value is None else f"{value / 2**20:,.0f} MiB"


def _ceiling(ceiling: dict | None) -> str:
  if ceiling is None:
    return matmul_ceiling.NOT_LISTED
  return (f"{ceiling['mfu_ceiling']:.1%} if only the matmuls took time: each of the step's "
          f"shapes timed alone, {ceiling['seconds'] * 1e3:.0f} ms per step in all "
          f"({ceiling['share']:.0%} of the step)")


def _print(f: dict, dtype: str) -> None:
  rows = [
      ("step time", f"{f['step_s'] * 1e3:.1f} ms (median of the timed steps; compile "
                    f"{f['compile_s']:.1f} s)"),
      ("tokens/s", f"{f['tokens_per_s']:,.0f} ({f['encoder_tokens_per_s']:,.0f} through the "
                   "encoder)"),
      ("MFU", f"{f['mfu']:.1%} = {f['achieved_flops_per_s'] / 1e9:,.1f} GFLOP/s of a measured "
              f"{dtype} matmul peak of {f['peak_matmul_flops_per_s'] / 1e9:,.1f} GFLOP/s"),
      *([("MFU by CPU time", f"{f['mfu_cpu']:.1%} ({f['step_cpu_s']:.2f} CPU-s per step)")]
        if "mfu_cpu" in f else []),
      *([("MFU ceiling", _ceiling(f["matmul_ceiling"]))] if "matmul_ceiling" in f else []),
      ("mask sampling", f"{f['mask_sampling_s'] * 1e3:.2f} ms = {f['mask_sampling_share']:.2%} "
                        "of a step"),
      ("waiting for data", f"{f['data_wait_s'] * 1e3:.2f} ms = {f['data_wait_share']:.2%} of "
                           "step time"),
      ("brain-only tokens", f"{f['tokens_brain']:,} of {f['tokens_box']:,} in the box "
                            f"({f['tokens_saved']:.1%} saved)"),
      ("memory per step", f"{_mib(f.get('step_memory_bytes'))} per device (XLA: arguments + "
                          "outputs + temporaries)"),
      ("device peak", _mib(f["device_peak_bytes"]) if f["device_peak_bytes"] is not None
       else f"n/a ({f['platform']} reports none)"),
      ("host peak RSS", f"{f['host_peak_rss_mib']:,.0f} MiB"),
  ]
  if "largest_batch_per_device" in f:
    rows.append(("largest batch", f"{f['largest_batch_per_device']} per device"))
  width = max(len(name) for name, _ in rows)
  for name, value in rows:
    print(f"{name:<{width}}  {value}")
