"""Device mesh from config, logical axis rules, and batches as global arrays.

The mesh has three axes: `data` (pure data parallel), `fsdp` (data parallel
with parameters sharded along 'embed') and `tensor` (heads and MLP split).

    mesh = mesh_from_config(config.mesh)              # {'data': -1, 'fsdp': 1, 'tensor': 1}
    shardings = param_shardings(abstract_params, mesh)
    batch = global_batch({"windows": local_np}, mesh)  # sharded over data x fsdp
"""

from __future__ import annotations

import math
from typing import Mapping

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from roi_mae_jax import errors
from roi_mae_jax.config import validation

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical parameter axis -> mesh axis (None: replicated), as in maxtext.
LOGICAL_RULES = {
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv": None,
    "layers": None,  # the stacked-layer axis of scanned blocks
}


def mesh_config(data: int = -1, fsdp: int = 1, tensor: int = 1) -> ml_collections.ConfigDict:
  """The `config.mesh` block: devices per axis; one axis may be -1 (the rest)."""
  return ml_collections.ConfigDict({"data": data, "fsdp": fsdp, "tensor": tensor})


def mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int) -> tuple[int, int, int]:
  """Resolves -1 and checks the product; raises `InputError` when it cannot fit."""
  validation.validate(mesh_cfg, where="mesh")
  sizes = [int(mesh_cfg[a]) for a in AXES]
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % fixed:
      raise errors.InputError(f"config.mesh {dict(zip(AXES, sizes))} does not divide "
                              f"{num_devices} devices")
    sizes[sizes.index(-1)] = num_devices // fixed
  if math.prod(sizes) > num_devices:
    raise errors.InputError(f"config.mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} "
                            f"devices; {num_devices} are visible")
  return tuple(sizes)


def mesh_from_config(mesh_cfg: Mapping[str, int], devices=None) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor) mesh with Auto axes (sharding propagated by XLA)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  used = math.prod(shape)
  if used < len(devices) and jax.process_count() > 1:  # a process without devices gets no data
    raise errors.InputError(f"config.mesh {dict(zip(AXES, shape))} uses {used} of the "
                            f"{len(devices)} devices of this {jax.process_count()}-process "
                            "run; a multi-process mesh must use them all (set one axis to -1)")
  if used < len(devices):
    logging.warning("mesh %s uses %d of %d devices", dict(zip(AXES, shape)), used, len(devices))
  return make_mesh(shape, devices[:used])


def make_mesh(shape: tuple[int, int, int], devices) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor) mesh of `devices` laid out on their physical topology,
  splitting a torus axis where an axis size needs it (tensor=2 on a 4x4x4 TPU
  v5p slice)."""
  # Auto axes: the mask sampler gathers constants by sharded indices, which
  # Explicit axes reject.
  auto = (jax.sharding.AxisType.Auto,) * len(shape)
  try:
    return jax.make_mesh(shape, AXES, axis_types=auto, devices=devices)
  except NotImplementedError:  # no assignment without splitting a physical axis
    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    return jax.sharding.Mesh(grid, AXES, axis_types=auto)


def logical_to_mesh(spec: P | None) -> P:
  """PartitionSpec of logical names -> PartitionSpec of mesh axes."""
  if spec is None:
    return P()
  return P(*(LOGICAL_RULES.get(name) if name else None for name in spec))


def param_shardings(params: nnx.State, mesh: jax.sharding.Mesh) -> dict:
  """NamedShardings (as a pure dict) for an `nnx.State` of annotated Params.

  Works on abstract states too (from `nnx.eval_shape`). An axis stays
  replicated when its mesh axis does not divide it.
  """
  specs = nnx.to_pure_dict(nnx.get_partition_spec(params))
  shapes = nnx.to_pure_dict(params)

  def one(spec, value):
    mesh_spec = tuple(logical_to_mesh(spec)) + (None,) * len(value.shape)
    dims = [axis if axis and size % mesh.shape[axis] == 0 else None
            for size, axis in zip(value.shape, mesh_spec)]
    return NamedSharding(mesh, P(*dims))

  return jax.tree.map(one, specs, shapes, is_leaf=lambda x: isinstance(x, P) or x is None)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) axis over data x fsdp; the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def batch_divisor(mesh: jax.sharding.Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch_size(batch_size: int, mesh: jax.sharding.Mesh) -> None:
  """InputError unless `batch_size` splits evenly over the mesh and the processes."""
  validation.refuse("batch_size", batch_size, divisor=batch_divisor(mesh),
                           processes=jax.process_count())


def global_batch(local: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """This process's slice of the batch -> global arrays sharded over data x fsdp."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}
