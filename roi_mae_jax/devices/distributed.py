"""Joining a multi-process run (jax.distributed) before any device is touched.

    distributed.initialize(config.distributed)   # first thing in a task
    jax.process_index(), jax.process_count()     # then as usual

Where the coordinator, process count and process id come from, first found wins:
  1. config: --config.distributed.coordinator=host:port, .num_processes, .process_id
  2. environment: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID
     (what launch/local_multiprocess.sh exports)
  3. a cluster JAX configures by itself: an srun step with more than one task
     (launch/slurm_gpu.sbatch), a TPU slice that names its workers in the
     environment (GKE), or any cluster with mode="cluster" (launch/tpu_pod.sh)
Otherwise the run is single-process and nothing is initialised.
`mode="off"` never initialises; `mode="cluster"` always asks JAX to detect.
Multi-process CPU runs (tests, laptops) use gloo collectives.
"""

from __future__ import annotations

import os

import jax
import ml_collections
from absl import logging

from roi_mae_jax import errors
from roi_mae_jax.config import validation

MODES = ("auto", "cluster", "off")
ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def distributed_config() -> ml_collections.ConfigDict:
  """The `config.distributed` block."""
  return ml_collections.ConfigDict({
      "mode": "auto",           # auto | cluster | off (see module doc)
      "coordinator": "",        # host:port of process 0
      "num_processes": 0,
      "process_id": -1,
      "initialization_timeout_s": 300,
  })


def _explicit(cfg: ml_collections.ConfigDict, env: dict) -> dict | None:
  """coordinator/num_processes/process_id from config, else environment; None if neither."""
  sources = {
      "config": (cfg.get("coordinator", ""), cfg.get("num_processes", 0),
                 cfg.get("process_id", -1)),
      "environment": (env.get(ENV[0], ""), env.get(ENV[1], ""), env.get(ENV[2], "")),
  }
  for where, (address, count, index) in sources.items():
    given = [bool(address), str(count) not in ("", "0"), str(index) not in ("", "-1")]
    if not any(given):
      continue
    names = (("distributed.coordinator", "distributed.num_processes", "distributed.process_id")
             if where == "config" else ENV)
    if not all(given):
      missing = [n for n, g in zip(names, given) if not g]
      raise errors.InputError(f"multi-process settings in the {where} are incomplete: "
                              f"{', '.join(missing)} missing")
    try:
      count, index = int(count), int(index)
    except ValueError as e:
      raise errors.InputError(f"{names[1]} and {names[2]} in the {where} must be integers "
                              f"({e})") from None
    if not 0 <= index < count:
      raise errors.InputError(f"process id {index} is outside 0..{count - 1} ({where})")
    return {"coordinator_address": address, "num_processes": count, "process_id": index}
  return None


def _cluster_detected(env: dict) -> str:
  """Which cluster JAX can configure itself on, or ''.

  Only what the environment shows: a TPU VM launched by gcloud ssh shows
  nothing, so launch/tpu_pod.sh asks for mode=cluster.
  """
  if env.get("SLURM_JOB_ID") and int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
    return "SLURM"  # inside srun with several tasks (not a bare salloc shell)
  if env.get("TPU_WORKER_HOSTNAMES", "").count(",") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "Cloud TPU"
  return ""


def plan(cfg: ml_collections.ConfigDict | None, env: dict | None = None) -> dict | None:
  """The keyword arguments for `jax.distributed.initialize`, or None for one process."""
  cfg = cfg if cfg is not None else distributed_config()
  env = dict(os.environ) if env is None else env
  mode = cfg.get("mode", "auto")
  validation.refuse("distributed.mode", mode)
  if mode == "off":
    return None
  explicit = _explicit(cfg, env)
  if explicit is not None:
    return explicit if explicit["num_processes"] > 1 else None
  if mode == "cluster" or _cluster_detected(env):
    return {}  # JAX reads the cluster's own variables
  return None


def initialize(cfg: ml_collections.ConfigDict | None = None) -> None:
  """Joins the multi-process run that `cfg` and the environment describe, if any."""
  kwargs = plan(cfg)
  if kwargs is None or jax.distributed.is_initialized():
    return
  # CPU processes need a collectives backend to talk; GPUs and TPUs ignore this.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  timeout = (cfg or distributed_config()).get("initialization_timeout_s", 300)
  where = kwargs.get("coordinator_address") or _cluster_detected(dict(os.environ)) or "cluster"
  logging.info("joining a multi-process run (%s)", where)
  try:
    jax.distributed.initialize(initialization_timeout=int(timeout), **kwargs)
  except (RuntimeError, ValueError) as e:
    raise errors.InputError(f"could not join the multi-process run via {where}: {e}") from None
  logging.info("process %d of %d: %d local devices, %d in all", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
