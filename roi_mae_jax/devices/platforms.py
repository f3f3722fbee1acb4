"""Where a model is compiled for: the platform of its mesh, and the CPU-only paths.

The attention kernel and a few code paths depend on the hardware the step is
compiled for. That is the platform of the devices of the mesh the step is
sharded over, not the host's `jax.default_backend()`: a CPU host compiles for a
TPU pod or for H100s ahead of time (`python -m roi_mae_jax.bench aot`).

    target = platforms.Target.of_mesh(mesh)      # Target('tpu', mesh, cpu_paths=False)
    target = platforms.Target.host()             # this process's default backend, no mesh
    model = MaskedAutoencoder(spec, config.model, rngs=rngs, target=target)

CPU-only paths: this is the one place that says which they are and why. They
are on where the mesh's platform is 'cpu' (`cpu_paths_for`); on TPUs and GPUs
the model uses the standard JAX patterns (nnx modules, autodiff, `nnx.remat`
with named checkpoint policies inside `nnx.scan`), which XLA's accelerator
backends are built for. Each was measured on XLA's CPU backend only:

  fused_layers     layer norm -> dense and GELU -> dense with custom VJPs that
                   recompute the elementwise half in backward, each backward
                   ordered by a full reduction over the cotangent (XLA:CPU's
                   scheduler otherwise holds every layer's recomputed arrays at
                   once); the weight gradient in the form XLA:CPU's matmul
                   libraries run fastest (per dtype)
  layer carry      scanned layers carry float32 holding bfloat16 values (XLA:CPU
                   slices a bfloat16 stack through a float32 copy of it)
  scan_slices      bfloat16 arrays sliced in loops as their uint16 bits (same reason)
  recomputed scan  `remat=block` with scanned layers as a hand-written scan that
                   keeps each layer's input in the compute dtype
  dense attention  `auto` takes the cache-sized head loop only on CPUs
  scheduler        XLA:CPU's memory-optimised scheduler (train_step.compiler_options)

`bench aot --cpu_paths` compiles a target with them on, to compare.
"""

from __future__ import annotations

import dataclasses
import glob
import os

import jax

PLATFORMS = ("cpu", "gpu", "tpu")
# PCI vendors of accelerators JAX has plugins for: NVIDIA, AMD, Google (TPU).
_ACCELERATOR_VENDORS = {"0x10de", "0x1002", "0x1ae0"}
_ACCELERATOR_NODES = ("/dev/nvidia[0-9]*", "/dev/accel[0-9]*", "/dev/kfd")


def accelerators_attached() -> bool:
  """Whether this host has a GPU or TPU attached (device nodes or PCI devices)."""
  if any(glob.glob(pattern) for pattern in _ACCELERATOR_NODES):
    return True
  for device in glob.glob("/sys/bus/pci/devices/*"):
    try:
      with open(os.path.join(device, "vendor"), encoding="ascii") as f:
        vendor = f.read().strip()
      with open(os.path.join(device, "class"), encoding="ascii") as f:
        device_class = f.read().strip()
    except OSError:
      continue
    # Display and processing-accelerator classes (a NIC of the same vendor is neither).
    if vendor in _ACCELERATOR_VENDORS and device_class.startswith(("0x03", "0x12")):
      return True
  return False


def use_cpu_without_accelerators() -> None:
  """Where JAX_PLATFORMS is unset and no accelerator is attached, run on the CPU
  only. Call before JAX starts its backends (the CLI's first step): installed
  TPU or CUDA plugins (what `bench aot` compiles with) would otherwise print
  tracebacks while looking for hardware that is not there."""
  if os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms:
    return
  if not accelerators_attached():
    jax.config.update("jax_platforms", "cpu")


def platform_of(device) -> str:
  """'cpu', 'gpu' or 'tpu' for a device (a compile-only one of a topology too)."""
  name = str(device.platform).lower()
  return "gpu" if name in ("gpu", "cuda", "rocm") else name


def cpu_paths_for(platform: str) -> bool:
  """Whether the CPU-only paths (module docstring) are on for `platform`."""
  return platform == "cpu"


@dataclasses.dataclass(frozen=True)
class Target:
  """The platform a model is compiled for, its mesh (None: one device, no
  shard_map) and whether the CPU-only paths are on. Hashable: a static
  attribute of the model."""

  platform: str
  mesh: jax.sharding.Mesh | None = None
  cpu_paths: bool = True

  @classmethod
  def of_mesh(cls, mesh: jax.sharding.Mesh | None, cpu_paths: bool | None = None) -> "Target":
    """The target of a step sharded over `mesh` (None: `host()`)."""
    if mesh is None:
      return cls.host(cpu_paths)
    platform = platform_of(mesh.devices.flat[0])
    return cls(platform, mesh, cpu_paths_for(platform) if cpu_paths is None else cpu_paths)

  @classmethod
  def host(cls, cpu_paths: bool | None = None) -> "Target":
    """This process's default backend, unsharded (a notebook, a probe on one device)."""
    platform = platform_of(jax.devices()[0])
    return cls(platform, None, cpu_paths_for(platform) if cpu_paths is None else cpu_paths)
