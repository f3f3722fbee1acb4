"""The real train step compiled for an accelerator target from any host: per-chip
memory, the largest batch, kernels, collectives, FLOPs and a roofline estimate.

Compiles (never runs) the config's sharded pretraining step, and the encoder
forward the probe uses, for the devices of a TPU topology or a deviceless GPU
system (`targets`), as a pod would run it. Nothing here needs the hardware:
libtpu (`jax[tpu]`) and the CUDA plugin (`jax[cuda12]`) compile for it.

    python -m roi_mae_jax.bench aot --target=tpu:v5e:16x16 --mesh=32,1,8
    python -m roi_mae_jax.bench aot --target=gpu:h100:8 --mesh=1,8,1 --json=h100.json
    python -m roi_mae_jax.bench aot --target=tpu:v5p:4x4x4 --cpu_paths   # both model paths
    python -m roi_mae_jax.bench aot --target=tpu:v5e:2x2 --config=configs/pretrain_aal3.py:test

The step time printed is a roofline estimate from XLA's FLOPs and bytes and the
collectives' bytes against the chip's published peaks: an estimate, not a
measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

import jax
import numpy as np
from jax.experimental.compilation_cache import compilation_cache

from roi_mae_jax import errors
from roi_mae_jax.bench import hlo_stats
from roi_mae_jax.bench import memory as memory_lib
from roi_mae_jax.bench import step_time as bench_train
from roi_mae_jax.bench import targets as targets_lib
from roi_mae_jax.config import blocks
from roi_mae_jax.devices import platforms
from roi_mae_jax.devices import sharding
from roi_mae_jax.downstream import pretrained as pretrained_lib
from roi_mae_jax.model import attention as attention_lib
from roi_mae_jax.model import mae as model_lib
from roi_mae_jax.training import build
from roi_mae_jax.training import train_step

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEADROOM = 0.10  # of each chip's HBM left free when sizing the largest batch


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--target", default="tpu:v5e:4x4",
                      help="KIND:CHIP:SHAPE, e.g. tpu:v5e:16x16, tpu:v5p:4x4x4, gpu:h100:8, "
                           "gpu:a100:2x8 (chips and figures: roi_mae_jax/bench/targets.json)")
  parser.add_argument("--config", default=os.path.join(REPO, "configs/pretrain_aal3.py")
                      + ":adhd200", help="config file[:variant] whose step is compiled")
  parser.add_argument("--mesh", default="",
                      help="data,fsdp,tensor devices (one may be -1; default: the config's)")
  parser.add_argument("--attention", default="", choices=["", *attention_lib.IMPLEMENTATIONS],
                      help="attention kernel (default: the config's)")
  parser.add_argument("--cpu_paths", action="store_true",
                      help="also compile with the CPU-only paths on (see roi_mae_jax.devices.platforms)")
  parser.add_argument("--encoder", action=argparse.BooleanOptionalAction, default=True,
                      help="also compile the probe's encoder forward")


def compile_step(config, parts: build.Parts, mesh, global_batch: int,
                 cpu_paths: bool | None = None, hlo: bool = False) -> dict:
  """The step of `config` at `global_batch` compiled for `mesh`: per-device memory
  (arguments + outputs + temporaries - donated), XLA's FLOPs and bytes, compile
  time, and with `hlo` the collectives."""
  trial = config.copy_and_resolve_references()
  trial.batch_size = global_batch
  setup = train_step.TrainSetup.create(trial, parts.spec, parts.sampler, mesh, cpu_paths)
  batch = {"windows": jax.ShapeDtypeStruct((global_batch,) + parts.spec.window_shape,
                                           np.float32, sharding=sharding.batch_sharding(mesh))}
  start = time.perf_counter()
  with _no_persistent_cache():
    compiled = setup.step.lower(setup.abstract_state, batch).compile()
  figures = {"compile_s": time.perf_counter() - start, "global_batch": global_batch}
  figures.update(_analysis(compiled))
  if hlo:
    text = compiled.as_text()
    figures["collectives"] = hlo_stats.collectives(text, mesh.size)
    figures["custom_calls"] = hlo_stats.custom_calls(text)
  return figures


def compile_encoder(config, parts: build.Parts, mesh, global_batch: int) -> dict:
  """The probe's encoder forward (every token visible) at `global_batch`, compiled for `mesh`."""
  setup = train_step.TrainSetup.create(config, parts.spec, parts.sampler, mesh)
  params = setup.abstract_state["params"]
  pre = pretrained_lib.Pretrained(config, parts.spec, parts.patch_map, setup.graphdef, params, 0)
  windows = jax.ShapeDtypeStruct((global_batch,) + parts.spec.window_shape, np.float32,
                                 sharding=sharding.batch_sharding(mesh))
  start = time.perf_counter()
  with _no_persistent_cache():
    compiled = jax.jit(pre.encode).lower(params, windows).compile()
  return {"compile_s": time.perf_counter() - start, "global_batch": global_batch,
          **_analysis(compiled)}


@contextlib.contextmanager
def _no_persistent_cache():
  """A compile-only client cannot load a cached executable (JAX warns and
  compiles again): these compiles bypass a persistent compilation cache. JAX
  decides once per process whether it uses the cache; `reset_cache` makes it
  decide again, on entry and on exit."""
  enabled = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()
  try:
    yield
  finally:
    jax.config.update("jax_enable_compilation_cache", enabled)
    compilation_cache.reset_cache()


def _analysis(compiled) -> dict:
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {"memory_bytes": int(memory.argument_size_in_bytes + memory.output_size_in_bytes
                              + memory.temp_size_in_bytes - memory.alias_size_in_bytes),
          "temp_bytes": int(memory.temp_size_in_bytes),
          "xla_flops": float(cost.get("flops", 0.0)),
          "xla_bytes_accessed": float(cost.get("bytes accessed", 0.0))}


def kernels(config, parts: build.Parts, platform: str, batch_per_shard: int) -> dict:
  """The attention kernel each stack takes on `platform` (what `auto` means there)."""
  size = model_lib.SIZES[config.model.size]
  dtype = model_lib.DTYPES[config.model.dtype]
  kind = config.model.attention or "auto"
  return {"encoder": attention_lib.choose(kind, platform, dtype, batch_per_shard,
                                          parts.sampler.num_keep, size.heads),
          "decoder": attention_lib.choose(kind, platform, dtype, batch_per_shard,
                                          parts.spec.num_tokens, size.decoder_heads)}


def roofline(target: targets_lib.Target, dtype: str, flops: float, bytes_accessed: float,
             wire_bytes: float) -> dict:
  """Seconds per step each resource needs at the chip's published peak; the
  estimate is the largest of them (perfect overlap): a lower bound. XLA gives no
  byte count for some targets (deviceless GPUs): then HBM time is None."""
  times = {"compute_s": flops / targets_lib.peak_flops(target, dtype),
           "hbm_s": (bytes_accessed / (target.figures["hbm_gbps"] * 1e9)
                     if bytes_accessed > 0 else None),
           "collectives_s": wire_bytes / targets_lib.interconnect_bytes_per_s(target)}
  return {**times, "estimate_s": max(t for t in times.values() if t is not None)}


def measure(config, target: targets_lib.Target, mesh_sizes: tuple[int, int, int],
            cpu_paths: bool | None = None, encoder: bool = True) -> dict:
  """Every figure of one target and mesh (see the module docstring)."""
  devices = target.devices()
  mesh = targets_lib.make_mesh(devices, mesh_sizes)
  platform = platforms.platform_of(devices[0])
  shards = sharding.batch_divisor(mesh)
  parts = build.parts(config)
  hbm_bytes = target.figures["hbm_gib"] * 2**30 * target.chips() / len(devices)
  out = {"target": target.name, "chip": target.figures["name"], "devices": len(devices),
         "hosts": targets_lib.hosts(devices), "mesh": dict(zip(sharding.AXES, mesh_sizes)),
         "platform": platform, "hbm_bytes_per_device": hbm_bytes,
         "model": config.model.size, "dtype": config.model.dtype,
         "tokens": parts.spec.num_tokens, "encoder_tokens": parts.sampler.num_keep,
         "cpu_paths": platforms.cpu_paths_for(platform) if cpu_paths is None else cpu_paths}
  batch = int(config.batch_size)
  if batch % shards:
    raise errors.InputError(f"batch_size {batch} is not a multiple of the mesh's data x fsdp "
                            f"= {shards}: pick --mesh so that it is")
  one = compile_step(config, parts, mesh, shards, cpu_paths, hlo=batch == shards)
  two = compile_step(config, parts, mesh, 2 * shards, cpu_paths, hlo=batch == 2 * shards)
  fit = memory_lib.affine_fit(one["memory_bytes"], two["memory_bytes"],
                              {"hbm": hbm_bytes * (1 - HEADROOM)})
  out["step"] = {"windows_1": one, "windows_2": two, "window_bytes": fit["window_bytes"],
                 "fixed_bytes": fit["fixed_bytes"],
                 "largest_windows_per_shard": fit["largest_batch"]["hbm"]}
  at_batch = {shards: one, 2 * shards: two}.get(batch) or compile_step(
      config, parts, mesh, batch, cpu_paths, hlo=True)
  out["at_config_batch"] = at_batch
  out["kernels"] = kernels(config, parts, platform, max(batch // shards, 1))
  model_flops = bench_train.analytic_flops(parts.spec, config.model.size,
                                           config.model.mlp_ratio, parts.sampler.num_keep,
                                           batch) / len(devices)
  out["model_flops_per_device"] = model_flops
  wire = sum(row["wire_bytes"] for row in at_batch["collectives"]["by_kind"].values())
  out["roofline"] = roofline(target, config.model.dtype, max(at_batch["xla_flops"], model_flops),
                             at_batch["xla_bytes_accessed"], wire)
  if encoder:
    out["encoder"] = compile_encoder(config, parts, mesh, shards)
  return out


def describe(f: dict) -> str:
  """The figures of `measure` as a short report."""
  gib = lambda b: ("n/a" if b is None else f"{b / 2**30:.2f} GiB" if abs(b) >= 2**30
                   else f"{b / 2**20:.1f} MiB")
  step, at = f["step"], f["at_config_batch"]
  mesh = " ".join(f"{k}={v}" for k, v in f["mesh"].items())
  used = int(np.prod(list(f["mesh"].values())))
  if used < f["devices"]:
    mesh += f" (uses {used} of the {f['devices']} devices: set --mesh)"
  xla_flops = f"{at['xla_flops']:.3g}" if at["xla_flops"] else "n/a (no count for this target)"
  lines = [
      f"target {f['target']}: {f['devices']} x {f['chip']} in {f['hosts']} host(s), "
      f"{gib(f['hbm_bytes_per_device'])} HBM per device; mesh {mesh}",
      f"model {f['model']} {f['dtype']}, {f['tokens']:,} tokens per window "
      f"({f['encoder_tokens']:,} encoded); attention encoder {f['kernels']['encoder']}, "
      f"decoder {f['kernels']['decoder']}; CPU-only paths {'on' if f['cpu_paths'] else 'off'}",
      "train step per device (compiled, not run):",
      f"  1 window per batch shard (global {step['windows_1']['global_batch']}): "
      f"{gib(step['windows_1']['memory_bytes'])}, compiled in {step['windows_1']['compile_s']:.0f} s",
      f"  2 windows per batch shard (global {step['windows_2']['global_batch']}): "
      f"{gib(step['windows_2']['memory_bytes'])}",
      f"  per window {gib(step['window_bytes'])}, fixed {gib(step['fixed_bytes'])}; largest "
      f"batch with {HEADROOM:.0%} headroom: {step['largest_windows_per_shard']} windows per "
      "batch shard",
      f"  at the config's global batch {at['global_batch']}: {gib(at['memory_bytes'])} "
      f"({at['memory_bytes'] / f['hbm_bytes_per_device']:.0%} of HBM)",
      f"  FLOPs per device: XLA {xla_flops}, model matmuls {f['model_flops_per_device']:.3g}",
      "  collectives per step and device:"]
  table = at["collectives"]["by_kind"]
  lines += [f"    {kind:<20}{row['count']:>6} x, {row['bytes'] / 2**20:>10,.1f} MiB, "
            f"{row['wire_bytes'] / 2**20:>10,.1f} MiB sent" for kind, row in sorted(table.items())]
  if not table:
    lines.append("    none")
  lines.append(f"  kernels called in the compiled step: {', '.join(at['custom_calls']) or 'none'}")
  if not at["collectives"]["trip_counts_known"]:
    lines.append("    (a loop's trip count was unknown and taken as 1)")
  r = f["roofline"]
  hbm = "n/a" if r["hbm_s"] is None else f"{r['hbm_s'] * 1e3:.1f}"
  lines.append(f"  roofline estimate (not measured): {r['estimate_s'] * 1e3:.1f} ms per step "
               f"(compute {r['compute_s'] * 1e3:.1f}, HBM {hbm}, collectives "
               f"{r['collectives_s'] * 1e3:.1f} ms at published peaks; FLOPs: the larger "
               "of XLA's and the model's matmuls)")
  if "encoder" in f:
    e = f["encoder"]
    lines.append(f"probe encoder forward, {e['global_batch']} window(s): {gib(e['memory_bytes'])} "
                 f"per device, compiled in {e['compile_s']:.0f} s")
  return "\n".join(lines)


def parse_mesh(text: str, config) -> dict:
  if not text:
    return dict(config.mesh)
  sizes = [int(s) for s in text.split(",")]
  if len(sizes) != 3:
    raise errors.InputError(f"--mesh {text!r}: expected data,fsdp,tensor, e.g. 32,1,8")
  return dict(zip(sharding.AXES, sizes))


def run(args) -> dict:
  target = targets_lib.parse(args.target)
  config = blocks.load_config_file(args.config)
  if args.attention:
    config.model.attention = args.attention
  devices = target.devices()
  sizes = sharding.mesh_shape(parse_mesh(args.mesh, config), len(devices))
  figures = measure(config, target, sizes, encoder=args.encoder)
  print(describe(figures))
  if args.cpu_paths and not figures["cpu_paths"]:
    other = measure(config, target, sizes, cpu_paths=True, encoder=False)
    figures["with_cpu_paths"] = other
    print("with the CPU-only paths on, for comparison:")
    print(describe(other))
  return figures
