"""FSDP on 8 fake CPU devices: parameters and optimizer state split over the fsdp axis."""

import jax
import numpy as np
import pytest

from conftest import load_config
from roi_mae_jax import errors
from roi_mae_jax.devices import sharding
from roi_mae_jax.training import train_step


def _state(config, axes):
  config.mesh.update(data=axes[0], fsdp=axes[1], tensor=axes[2])
  mesh = sharding.mesh_from_config(config.mesh, jax.devices()[:8])
  return train_step.TrainSetup.from_config(config, mesh).init()


def _bytes_on_device0(tree):
  device = jax.devices()[0]
  return sum(s.data.nbytes for leaf in jax.tree.leaves(tree)
             for s in leaf.addressable_shards if s.device == device)


def test_fsdp_splits_parameters_and_optimizer_state():
  config = load_config("pretrain_aal3", "test")
  replicated = _state(config, (8, 1, 1))
  sharded = _state(config, (1, 8, 1))
  # Every parameter with an `embed` axis that 8 divides is split on it; the rest is replicated.
  for path, leaf in jax.tree_util.tree_leaves_with_path(sharded["params"]):
    spec = leaf.sharding.spec
    if "fsdp" in tuple(spec):
      axis = tuple(spec).index("fsdp")
      assert leaf.shape[axis] % 8 == 0, path
      assert leaf.addressable_shards[0].data.shape[axis] == leaf.shape[axis] // 8
  for part in ("params", "opt_state"):
    full = _bytes_on_device0(replicated[part])
    split = _bytes_on_device0(sharded[part])
    assert split < full / 7, (part, full, split)  # 1/7.7 here: a few small leaves stay whole
  total = sum(leaf.nbytes for leaf in jax.tree.leaves(sharded["params"]))
  assert _bytes_on_device0(replicated["params"]) == total


def test_a_batch_that_does_not_divide_the_mesh_names_both_numbers():
  config = load_config("pretrain_aal3", "test")
  config.mesh.update(data=2, fsdp=2, tensor=2)
  mesh = sharding.mesh_from_config(config.mesh, jax.devices()[:8])
  with pytest.raises(errors.InputError, match=r"batch_size 6 must be a multiple of data x fsdp = 4"):
    sharding.check_batch_size(6, mesh)
  np.testing.assert_equal(sharding.mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8), (2, 2, 2))
