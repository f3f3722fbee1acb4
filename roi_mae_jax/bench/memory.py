"""Compiled step memory per window at the paper's scale, per attention kernel x remat.

Compiles (never runs) the pretraining step of the config for its shapes only,
at one and two windows per device, and reads XLA's memory analysis (arguments
+ outputs + temporaries - donated): the difference is the memory of one window,
the rest is fixed (parameters, AdamW moments, gradients). From these, the
largest per-device batch whose step fits 80 GiB (H100) and 16 GiB (TPU v5e);
and the compile time with and without scanned layers. Kernels that need another
backend (cudnn: GPU, pallas: TPU) are listed as n/a.

    python -m roi_mae_jax.bench memory                  # adhd200: base, bf16, 28,480 tokens
    python -m roi_mae_jax.bench memory --attention=chunked --remat=block,dots
    python -m roi_mae_jax.bench memory --dtype=float32 --json=memory.json
"""

from __future__ import annotations

import argparse
import os

import jax
import numpy as np

from roi_mae_jax.bench import step_time as bench_train
from roi_mae_jax.config import blocks
from roi_mae_jax.devices import sharding
from roi_mae_jax.model import attention as attention_lib
from roi_mae_jax.model import mae as model_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LIMITS = {"80 GiB (H100)": 80 * 2**30, "16 GiB (TPU v5e)": 16 * 2**30}
_NEEDS = {"cudnn": "gpu", "pallas": "tpu"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--memory_config", default=os.path.join(REPO, "configs/pretrain_aal3.py")
                      + ":adhd200", help="config file[:variant] whose step is compiled")
  parser.add_argument("--memory_dtype", default="", choices=["", *model_lib.DTYPES],
                      help="compute dtype (default: the config's)")
  parser.add_argument("--memory_attention", default="reference,chunked,cudnn,pallas",
                      help="kernels to compile (comma-separated)")
  parser.add_argument("--memory_remat", default=",".join(model_lib.REMAT_POLICIES),
                      help="remat choices to compile (comma-separated)")


def compiled_step(config, per_device_batch: int) -> dict | None:
  """compile_s, step_memory_bytes, ... of the step compiled for shapes only
  (nothing is allocated); None when the compiler runs out of memory."""
  trial = config.copy_and_resolve_references()
  trial.batch_size = per_device_batch * jax.device_count()
  setup, spec, _, _ = bench_train.build(trial)
  state = jax.eval_shape(setup.init)
  batch = {"windows": jax.ShapeDtypeStruct((trial.batch_size,) + spec.window_shape, np.float32,
                                           sharding=sharding.batch_sharding(setup.mesh))}
  try:
    return bench_train.compile_step(setup, state, batch)[1]
  except Exception as e:  # pylint: disable=broad-except
    if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
      return None
    raise


def per_window(config) -> dict:
  """Step memory at 1 and 2 windows per device -> per window, fixed, largest batches."""
  one, two = compiled_step(config, 1), compiled_step(config, 2)
  if one is None or two is None:
    return {"error": "the compiler ran out of memory"}
  row = {"step_bytes_1": one["step_memory_bytes"], "step_bytes_2": two["step_memory_bytes"],
         "compile_s": one["compile_s"]}
  row.update(affine_fit(one["step_memory_bytes"], two["step_memory_bytes"], LIMITS))
  return row


def affine_fit(one: int, two: int, limits: dict[str, float]) -> dict:
  """Step memory at 1 and 2 windows -> window_bytes, fixed_bytes and the largest
  batch under each limit {name: bytes}.

  Memory is affine in the batch where the compiler schedules both batches
  alike. Where it does not (the second window costs more than the whole first
  step), no fixed part is given and only the two measured points count."""
  window, fixed = two - one, 2 * one - two
  if fixed < 0:
    return {"window_bytes": window, "fixed_bytes": None,
            "largest_batch": {name: 2 if two <= limit else int(one <= limit)
                              for name, limit in limits.items()}}
  return {"window_bytes": window, "fixed_bytes": fixed,
          "largest_batch": {name: max(int((limit - fixed) // max(window, 1)), 0)
                            for name, limit in limits.items()}}


def _variant(config, **model):
  trial = config.copy_and_resolve_references()
  trial.model.update(model)
  return trial


def run(args) -> dict:
  config = blocks.load_config_file(args.memory_config)
  if args.memory_dtype:
    config.model.dtype = args.memory_dtype
  backend = jax.default_backend()
  tokens = (config.frames // config.patches.frames)
  print(f"compiled step memory on {jax.devices()[0].device_kind} ({backend}): "
        f"{args.memory_config}, model {config.model.size}, {config.model.dtype}, "
        f"{tokens} time chunks, scan {config.model.scan}; per window = step(2) - step(1)")
  header = f"{'attention':<11}{'remat':<7}{'per window':>12}{'fixed':>10}{'step b=1':>11}"
  print(header + "".join(f"{'max b, ' + name:>24}" for name in LIMITS))
  figures = {"device": jax.devices()[0].device_kind, "config": args.memory_config,
             "dtype": config.model.dtype, "rows": {}}
  for kernel in filter(None, args.memory_attention.split(",")):
    attention_lib.check_implementation(kernel)
    for remat in filter(None, args.memory_remat.split(",")):
      name = f"{kernel}/{remat}"
      if _NEEDS.get(kernel, backend) != backend:
        print(f"{kernel:<11}{remat:<7}{'n/a (needs ' + _NEEDS[kernel] + ')':>33}")
        figures["rows"][name] = {"error": f"needs {_NEEDS[kernel]}"}
        continue
      row = per_window(_variant(config, attention=kernel, remat=remat))
      figures["rows"][name] = row
      if "error" in row:
        print(f"{kernel:<11}{remat:<7}  {row['error']}")
        continue
      gib = lambda b: "n/a" if b is None else f"{b / 2**30:.2f} GiB"
      print(f"{kernel:<11}{remat:<7}{gib(row['window_bytes']):>12}{gib(row['fixed_bytes']):>10}"
            f"{gib(row['step_bytes_1']):>11}"
            + "".join(f"{row['largest_batch'][n]:>24}" for n in LIMITS))
  figures["compile_s"] = {}
  for scan in (False, True):
    done = compiled_step(_variant(config, scan=scan), 1)
    figures["compile_s"]["scan" if scan else "unrolled"] = done["compile_s"]
  print(f"compile time, config's kernel and remat ({config.model.attention}, "
        f"{config.model.remat}): {figures['compile_s']['unrolled']:.1f} s unrolled, "
        f"{figures['compile_s']['scan']:.1f} s with scanned layers")
  return figures
