"""Accelerator targets to compile for from any host: TPU topologies and deviceless GPUs.

    target = targets.parse("tpu:v5e:16x16")        # 256 chips, 64 hosts
    target = targets.parse("gpu:h100:8")           # one host of 8 H100s
    target = targets.parse("gpu:h100:2x8")         # two hosts of 8
    devices = target.devices()                      # compile-only devices, no chip needed
    mesh = jax.make_mesh((32, 1, 8), sharding.AXES, devices=devices)

The chips' published figures (HBM, peaks, bandwidths) and the GPU device
descriptions are data, in `targets.json` beside this file. Compiling for a TPU
needs libtpu (`jax[tpu]`), for a GPU the CUDA plugin (`jax[cuda12]`), both at
the installed jax's version; neither needs the hardware.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os

import jax

from roi_mae_jax import errors
from roi_mae_jax.devices import platforms
from roi_mae_jax.devices import sharding

SPECS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "targets.json")


@functools.lru_cache(maxsize=None)
def specs() -> dict:
  """targets.json: {'tpu': {generation: figures}, 'gpu': {model: figures}}."""
  with open(SPECS_FILE, encoding="utf-8") as f:
    return json.load(f)


@dataclasses.dataclass(frozen=True)
class Target:
  """One accelerator system: kind ('tpu' or 'gpu'), chip ('v5e', 'h100', ...)
  and shape (a TPU topology 'AxB[xC]', or GPUs as 'hosts x per host')."""

  kind: str
  chip: str
  shape: str

  @property
  def name(self) -> str:
    return f"{self.kind}:{self.chip}:{self.shape}"

  @property
  def figures(self) -> dict:
    return specs()[self.kind][self.chip]

  def devices(self) -> list:
    """The target's compile-only devices (no hardware needed)."""
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
    if self.kind == "tpu":
      _quiet_absent_tpu()
      topology = topologies.get_topology_desc(topology_name=f"{self.chip}:{self.shape}",
                                              platform="tpu")
    else:
      hosts, per_host = self.gpu_hosts()
      topology = topologies.get_topology_desc(
          topology_name="", platform="cuda", topology=f"1x{hosts}x{per_host}",
          target_config=gpu_target_config(self.figures))
    return list(topology.devices)

  def gpu_hosts(self) -> tuple[int, int]:
    parts = [int(p) for p in self.shape.split("x")]
    return (1, parts[0]) if len(parts) == 1 else (parts[0], parts[1])

  def chips(self) -> int:
    """Chips in the system (a TPU v4 chip shows as two devices to compile-only clients)."""
    return math.prod(int(p) for p in self.shape.split("x"))


def parse(text: str) -> Target:
  """'tpu:GEN:TOPOLOGY' or 'gpu:MODEL:N' / 'gpu:MODEL:HOSTSxN' -> Target; InputError otherwise."""
  parts = text.split(":")
  known = specs()
  if len(parts) != 3 or parts[0] not in ("tpu", "gpu") or parts[1] not in known[parts[0]]:
    choices = ", ".join(f"{k}:{c}" for k in ("tpu", "gpu") for c in known[k])
    raise errors.InputError(f"--target {text!r}: expected KIND:CHIP:SHAPE with KIND:CHIP one of "
                            f"{choices} (e.g. tpu:v5e:16x16, gpu:h100:8, gpu:h100:2x8)")
  shape = parts[2]
  if not all(p.isdigit() and int(p) > 0 for p in shape.split("x")) or (
      parts[0] == "gpu" and len(shape.split("x")) > 2):
    raise errors.InputError(f"--target {text!r}: shape {shape!r} must be like 4x4 or 4x4x4 "
                            "(TPU) or N / HOSTSxN (GPU)")
  return Target(parts[0], parts[1], shape)


def gpu_target_config(figures: dict) -> str:
  """An XLA GpuTargetConfig text proto for a GPU model of targets.json: what a
  deviceless compile knows of the device in place of querying one."""
  d = figures["device"]
  major, minor = d["compute_capability"]
  info = {
      "threads_per_block_limit": 1024, "threads_per_warp": 32,
      "shared_memory_per_block": 49152, "shared_memory_per_core": d["shared_memory_per_core"],
      "threads_per_core_limit": 2048, "core_count": d["core_count"],
      "fpus_per_core": d["fpus_per_core"], "block_dim_limit_x": 2147483647,
      "block_dim_limit_y": 65535, "block_dim_limit_z": 65535,
      "memory_bandwidth": d["memory_bandwidth"], "l2_cache_size": d["l2_cache_size"],
      "clock_rate_ghz": d["clock_rate_ghz"], "device_memory_size": d["device_memory_size"],
      "shared_memory_per_block_optin": d["shared_memory_per_block_optin"],
      "registers_per_core_limit": 65536, "registers_per_block_limit": 65536,
  }
  lines = ["gpu_device_info {"]
  lines += [f"  {key}: {value}" for key, value in info.items()]
  lines += [f"  cuda_compute_capability {{ major: {major} minor: {minor} }}", "}",
            'platform_name: "CUDA"', "dnn_version_info { major: 9 minor: 8 }",
            f'device_description_str: "{figures["name"]}"']
  return "\n".join(lines) + "\n"


def _quiet_absent_tpu() -> None:
  """On a host with no TPU, libtpu looks for the pod's workers and prints
  errors when it finds none, and lets one process at a time load it; a
  compile-only topology needs neither the workers nor the chips' lock."""
  if not platforms.accelerators_attached():
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_HOST_BOUNDS", "1,1,1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def peak_flops(target: Target, dtype: str) -> float:
  """The chip's published dense matmul peak (FLOP/s) for the compute dtype."""
  key = "bf16_tflops" if dtype in ("bfloat16", "float16") else "f32_tflops"
  return target.figures[key] * 1e12


def interconnect_bytes_per_s(target: Target) -> float:
  """Bandwidth per chip that collectives use: ICI on a TPU pod; NVLink within
  one GPU host, the network between several."""
  f = target.figures
  if target.kind == "tpu":
    return f["ici_gbps"] * 1e9
  return (f["nvlink_gbps"] if target.gpu_hosts()[0] == 1 else f["network_gbps"]) * 1e9


def devices_platform(devices) -> str:
  return platforms.platform_of(devices[0])


def hosts(devices) -> int:
  return len({d.process_index for d in devices})


def make_mesh(devices, sizes: tuple[int, int, int]) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor) mesh of compile-only devices, laid out as a run's."""
  return sharding.make_mesh(sizes, devices[:math.prod(sizes)])
