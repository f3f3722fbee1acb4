"""Train-step speed: step time, tokens/s, FLOPs, achieved FLOP/s and MFU.

MFU is the model's matmul FLOPs per step (analytic: forward x 3 for forward
and backward) over the step time, against the matmul peak measured in the
same run on the same device (a large jitted matmul in the compute dtype).
XLA's own FLOP count of the compiled step (which includes elementwise work)
is printed beside it. Also: tokens saved by brain-only patches, and (unless
--no-ceiling) the step's matmuls timed one by one: the MFU the step would reach
if nothing but its matmuls took time (see `matmul_ceiling`).

    python -m roi_mae_jax.bench train                       # small model, demo grid, batch 2
    python -m roi_mae_jax.bench train --config=configs/pretrain_aal3.py:adhd200 \
        --size=base --batch=8                                # paper scale (accelerators)
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from roi_mae_jax import metrics as metrics_lib
from roi_mae_jax.bench import matmul_ceiling
from roi_mae_jax.config import blocks
from roi_mae_jax.devices import sharding
from roi_mae_jax.masking import samplers
from roi_mae_jax.model import attention as attention_lib
from roi_mae_jax.model import mae as model_lib
from roi_mae_jax.training import train_step


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--config", default="configs/pretrain_aal3.py",
                      help="config file[:variant] giving grid, patches and frames")
  parser.add_argument("--size", default="small", choices=sorted(model_lib.SIZES))
  # 2 by default: on CPUs a bigger batch spills the attention weights out of
  # cache and lowers MFU (batch 8: ~39% vs ~48% on the 2-core dev machine).
  parser.add_argument("--batch", type=int, default=2, help="0: the config's batch size")
  parser.add_argument("--dtype", default="", choices=["", *model_lib.DTYPES],
                      help="compute dtype (default: the config's)")
  parser.add_argument("--strategy", default="", help="mask strategy (default: the config's)")
  parser.add_argument("--attention", default="", choices=["", *attention_lib.IMPLEMENTATIONS],
                      help="attention kernel (default: the config's; see roi_mae_jax.model.mae.mae.mae.mae.mae.attention)")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--vs_dtype", default="", choices=["", *model_lib.DTYPES],
                      help="also time the step in this dtype, in turns with the first")
  parser.add_argument("--peak_size", type=int, default=2048, help="matmul edge for the peak")
  parser.add_argument("--ceiling", action=argparse.BooleanOptionalAction, default=True,
                      help="also time the step's matmuls one by one: the MFU it could reach "
                           "if nothing else took time (see roi_mae_jax.bench.matmul_ceiling)")


def peak_matmul(x, y):
  """x @ y accumulated and returned in float32 (bfloat16 operands stay bfloat16)."""
  return jnp.matmul(x, y, preferred_element_type=jnp.float32)


def measure_matmul_peak(size: int, dtype, repeats: int = 10) -> tuple[float, float]:
  """(FLOP/s, FLOP per CPU-second) of a jitted (size x size) @ (size x size)
  matmul, each the best of `repeats`. The second is for CPUs shared with other
  work, where wall time swings with their load (see `speed_figures`).

  The matmul accumulates in float32, as the model's do: for bfloat16 operands
  a bfloat16-output matmul can take a much slower path (on a CPU with AMX, a
  fifth of the rate), which would flatter the MFU."""
  a = jax.random.normal(jax.random.key(0), (size, size), dtype)
  b = jax.random.normal(jax.random.key(1), (size, size), dtype)
  matmul = jax.jit(peak_matmul)
  jax.block_until_ready(matmul(a, b))
  best, best_cpu = np.inf, np.inf
  for _ in range(repeats):
    start, start_cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(matmul(a, b))
    best = min(best, time.perf_counter() - start)
    best_cpu = min(best_cpu, time.process_time() - start_cpu)
  flops = 2.0 * size ** 3
  return flops / best, flops / max(best_cpu, 1e-9)


def analytic_flops(spec: model_lib.TokenSpec, size: str, mlp_ratio: int, num_keep: int,
                   batch: int) -> float:
  """Matmul FLOPs of one train step (forward + backward = 3 x forward)."""
  dims = model_lib.SIZES[size]
  width, depth, d_width, d_depth = dims.width, dims.depth, dims.decoder_width, dims.decoder_depth
  n, d_tok = spec.num_tokens, spec.token_dim

  def stack(tokens, w, layers):  # qkv + out (4 w^2), MLP (2 r w^2), attention (2 n w)
    per_token = 2 * (4 * w * w + 2 * mlp_ratio * w * w) + 2 * 2 * tokens * w
    return layers * tokens * per_token

  forward = (2 * num_keep * d_tok * width           # patch embedding (visible tokens)
             + stack(num_keep, width, depth)        # encoder, visible tokens only
             + 2 * num_keep * width * d_width       # encoder -> decoder
             + stack(n, d_width, d_depth)           # decoder, all tokens
             + 2 * n * d_width * d_tok)             # prediction head
  return 3.0 * batch * forward


def build(config):
  """(TrainSetup, TokenSpec, MaskSampler, PatchMap), data parallel over the devices
  that divide the batch (the config's mesh is replaced)."""
  used = max(d for d in range(1, jax.device_count() + 1)
             if jax.device_count() % d == 0 and config.batch_size % d == 0)
  config.mesh = sharding.mesh_config(data=used, fsdp=1, tensor=1)
  mesh = sharding.mesh_from_config(config.mesh)
  sharding.check_batch_size(config.batch_size, mesh)
  setup = train_step.TrainSetup.from_config(config, mesh)
  return setup, setup.parts.spec, setup.parts.sampler, setup.parts.patch_map


def configure(args) -> ml_collections.ConfigDict:
  """The config file with this run's --size, --dtype, --strategy, --attention, --batch."""
  config = blocks.load_config_file(args.config)
  config.model.size = args.size
  if args.dtype:
    config.model.dtype = args.dtype
  if args.strategy:
    config.mask.strategy = args.strategy
  if getattr(args, "attention", ""):
    config.model.attention = args.attention
  if args.batch:
    config.batch_size = args.batch
  return config


def compile_step(setup: train_step.TrainSetup, state, batch) -> tuple[object, dict]:
  """The compiled step and its compile time, XLA FLOPs and XLA memory estimate."""
  start = time.perf_counter()
  compiled, facts = setup.compile(state, batch)
  figures = {"compile_s": time.perf_counter() - start}
  figures["xla_flops_per_step"] = facts["flops"] * setup.mesh.size  # XLA counts per device
  memory = facts["memory"]
  if memory is not None:  # per device: what one step needs resident
    figures["step_memory_bytes"] = int(memory.argument_size_in_bytes + memory.output_size_in_bytes
                                       + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
    figures["step_temp_bytes"] = int(memory.temp_size_in_bytes)
  return compiled, figures


def speed_figures(config, spec: model_lib.TokenSpec, sampler: samplers.MaskSampler, step_s: float,
                  devices: int, peak_size: int, step_cpu_s: float | None = None) -> dict:
  """tokens/s, analytic FLOPs, achieved FLOP/s, measured matmul peak and MFU.

  On a CPU, with `step_cpu_s` (CPU seconds of the process per step), also
  `mfu_cpu`: FLOPs per CPU-second of the step over those of the peak matmul,
  which other jobs on the machine move much less than wall-time MFU.
  """
  flops = analytic_flops(spec, config.model.size, config.model.mlp_ratio, sampler.num_keep,
                         config.batch_size)
  peak, peak_cpu = measure_matmul_peak(peak_size, model_lib.DTYPES[config.model.dtype])
  figures = {"step_s": step_s,
             "tokens_per_s": config.batch_size * spec.num_tokens / step_s,
             "encoder_tokens_per_s": config.batch_size * sampler.num_keep / step_s,
             "model_flops_per_step": flops, "achieved_flops_per_s": flops / step_s,
             "peak_matmul_flops_per_s": peak * devices, "mfu": flops / step_s / (peak * devices)}
  if step_cpu_s and jax.default_backend() == "cpu":
    figures.update({"step_cpu_s": step_cpu_s, "peak_matmul_flops_per_cpu_s": peak_cpu,
                    "mfu_cpu": flops / step_cpu_s / peak_cpu})
  return figures


def describe(config, setup, spec, patch_map) -> str:
  return (f"device: {jax.devices()[0].device_kind} x{setup.mesh.size}  model "
          f"{config.model.size} ({config.model.dtype}, attention "
          f"{config.model.attention or 'default'})  grid {patch_map.atlas.grid.describe()}  "
          f"patch {spec.patch_size}^3 x {spec.patch_frames}  frames {spec.window_shape[3]}  "
          f"batch {config.batch_size}  mask {config.mask.strategy} {config.mask.ratio}")


def print_speed(figures: dict, dtype: str) -> None:
  print(f"tokens/s {figures['tokens_per_s']:.4g} (encoder {figures['encoder_tokens_per_s']:.4g})")
  print(f"model FLOPs/step {figures['model_flops_per_step']:.4g} (analytic matmul); XLA counts "
        f"{figures['xla_flops_per_step']:.4g}")
  print(f"achieved {figures['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s; measured {dtype} matmul "
        f"peak {figures['peak_matmul_flops_per_s'] / 1e9:.1f} GFLOP/s; MFU {figures['mfu']:.1%}")
  if "mfu_cpu" in figures:
    print(f"by CPU time: {figures['step_cpu_s']:.2f} CPU-s per step; "
          f"{figures['model_flops_per_step'] / figures['step_cpu_s'] / 1e9:.1f} GFLOP per CPU-s "
          f"against the peak matmul's {figures['peak_matmul_flops_per_cpu_s'] / 1e9:.1f}; "
          f"MFU {figures['mfu_cpu']:.1%}")


def run(args) -> dict:
  config = configure(args)
  setup, spec, sampler, patch_map = build(config)
  print(describe(config, setup, spec, patch_map))
  box_tokens = patch_map.num_patches * spec.num_time
  print(f"tokens per window: {spec.num_tokens} brain vs {box_tokens} in the box "
        f"({1 - spec.num_tokens / box_tokens:.1%} saved); encoder sees {sampler.num_keep}")

  compiled, state, batch, figures = _compiled(setup, spec, config.batch_size)
  steps_run = [compiled, state, batch]
  (times, cpu_times, metrics), = _time_steps([steps_run], args.steps)
  figures.update(speed_figures(config, spec, sampler, float(np.median(times)), setup.mesh.size,
                               args.peak_size, float(np.median(cpu_times))))
  figures.update({"device": jax.devices()[0].device_kind, "devices": setup.mesh.size,
                  "model": config.model.size, "dtype": config.model.dtype,
                  "batch": config.batch_size, "tokens_brain": spec.num_tokens,
                  "tokens_box": box_tokens, "loss": float(metrics["loss"])})
  print(f"compile {figures['compile_s']:.1f} s; step {figures['step_s'] * 1e3:.1f} ms "
        f"(median of {args.steps})")
  print_speed(figures, config.model.dtype)
  if args.vs_dtype:
    figures["vs_dtype"] = versus_dtype(config, args, steps_run)
  figures["host_peak_rss_mib"] = metrics_lib.peak_rss_mib()
  print(f"host peak RSS {figures['host_peak_rss_mib']:,.0f} MiB")
  if args.ceiling:  # after the host peak: its small programs are not the step's
    figures["matmul_ceiling"] = ceiling_figures(config, spec, sampler, setup.mesh.size,
                                                 args.peak_size, figures)
    ceiling = figures["matmul_ceiling"]
    print(matmul_ceiling.describe(ceiling) if ceiling
          else f"MFU ceiling {matmul_ceiling.NOT_LISTED}")
  return figures


def ceiling_figures(config, spec: model_lib.TokenSpec, sampler: samplers.MaskSampler,
                    devices: int, peak_size: int, figures: dict) -> dict | None:
  """`matmul_ceiling.measure` of this step's matmuls on one device, with the
  model FLOPs and step time of `speed_figures` in `figures`; None when an
  attention kernel is not made of whole matmuls."""
  batch = max(config.batch_size // devices, 1)
  dtype = model_lib.DTYPES[config.model.dtype]
  try:
    matmuls = matmul_ceiling.step_matmuls(spec, config.model.size, config.model.mlp_ratio,
                                          sampler.num_keep, batch,
                                          config.model.attention or "auto", dtype=dtype)
  except matmul_ceiling.UnlistedKernel:
    return None
  return matmul_ceiling.measure(matmuls, dtype, figures["model_flops_per_step"] / devices,
                                peak_size, figures["step_s"])


def _compiled(setup: train_step.TrainSetup, spec: model_lib.TokenSpec, batch_size: int):
  """(compiled step, state, batch of random windows, compile figures), warmed up."""
  state = setup.init()
  windows = np.random.default_rng(0).standard_normal(
      (batch_size,) + spec.window_shape).astype(np.float32)
  batch = sharding.global_batch({"windows": windows}, setup.mesh)
  compiled, figures = compile_step(setup, state, batch)
  state, metrics = compiled(state, batch)  # warm-up
  jax.block_until_ready(metrics)
  return compiled, state, batch, figures


def _time_steps(runs: list[list], steps: int) -> list[tuple[list[float], list[float], dict]]:
  """(seconds per step, CPU seconds per step, last metrics) of each [compiled,
  state, batch], the runs taking turns step by step so that a shared machine's
  load falls on all alike. Each run's state is replaced by its new one (the old
  one was donated)."""
  out = [([], [], None) for _ in runs]
  for _ in range(steps):
    for i, run in enumerate(runs):
      start, start_cpu = time.perf_counter(), time.process_time()
      run[1], metrics = run[0](run[1], run[2])
      jax.block_until_ready(metrics)
      out[i][0].append(time.perf_counter() - start)
      out[i][1].append(time.process_time() - start_cpu)
      out[i] = (out[i][0], out[i][1], metrics)
  return out


def versus_dtype(config, args, run: list) -> dict:
  """The step in `--vs_dtype` against this run's [compiled, state, batch] (its
  state is replaced, see _time_steps), timed in turns."""
  other = config.copy_and_resolve_references()
  other.model.dtype = args.vs_dtype
  setup, spec, _, _ = build(other)
  compiled, state, batch, _ = _compiled(setup, spec, other.batch_size)
  mine, theirs = (np.median(t) for t, _, _ in _time_steps([run, [compiled, state, batch]],
                                                          args.steps))
  print(f"{args.vs_dtype}: {theirs * 1e3:.1f} ms/step vs {config.model.dtype} "
        f"{mine * 1e3:.1f} ms/step in turns ({mine / theirs:.2f}x as fast)")
  return {"dtype": args.vs_dtype, "step_s": float(theirs), "this_dtype_step_s": float(mine),
          "speedup": float(mine / theirs)}
