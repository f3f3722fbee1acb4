"""Checkpoints: the only module that imports Orbax.

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=3)
    ckpt.save(step, state, data_iterator=it)     # async for arrays; returns at once
    if ckpt.latest_step() is not None:
      state, resumed_data = ckpt.restore(abstract_state, data_iterator=it)
    ckpt.close()                                  # waits for pending saves

A save is written to a temporary folder and renamed when complete, so a save
cut off by a crash is never listed, and the previous checkpoint is used.
Typed PRNG keys are stored as their raw key data and re-wrapped on restore.
In a multi-process run every process calls save and restore: arrays are
written once, shard by shard, and each process's Grain iterator position goes
to its own file (data/process_<i>-of-<n>.json), since each reads other data.
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from roi_mae_jax import errors


def _is_key(x) -> bool:
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys_to_data(tree):
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _abstract_key_data(x):
  if not _is_key(x):
    return x
  data = jax.eval_shape(jax.random.key_data, x)
  sharding = getattr(x, "sharding", None)
  if isinstance(sharding, jax.sharding.NamedSharding):  # keys are replicated here
    sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
  return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)


def _data_to_keys(restored, abstract):
  def back(value, target):
    if _is_key(target):
      # Abstract keys (ShapeDtypeStruct) only carry the impl on their dtype.
      impl = jax.random.key_impl(target) if isinstance(target, jax.Array) else target.dtype._impl
      return jax.random.wrap_key_data(value, impl=impl)
    return value
  return jax.tree.map(back, restored, abstract)


class Checkpointer:
  """Keeps the last `keep` checkpoints of a train state and its data iterator."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(keep),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,  # drop saves cut off by a crash
        create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, data_iterator=None) -> None:
    """Saves `state` and, when given, the position of a Grain `data_iterator`."""
    items = {"state": ocp.args.StandardSave(_keys_to_data(state))}
    if data_iterator is not None:  # written now (synchronously): the loop moves it on
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, abstract_state: Any, step: int | None = None,
              data_iterator=None) -> tuple[Any, bool]:
    """(state, whether `data_iterator` was moved to its saved position) of `step`.

    `step` defaults to the latest; the state is laid out like `abstract_state`.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise errors.InputError(f"no checkpoint in {self.directory}")
    target = jax.tree.map(_abstract_key_data, abstract_state)
    items = {"state": ocp.args.StandardRestore(target)}
    has_data = data_iterator is not None and "data" in self.item_names(step)
    if has_data:
      self._check_process_count(step)
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except ValueError as e:
      if "tree structures do not match" not in str(e):
        raise
      where = str(e).splitlines()[1].rstrip(":") if "\n" in str(e) else ""
      raise errors.InputError(
          f"the checkpoint of step {step} in {self.directory} is laid out differently from "
          f"this model (first difference: {where}); restore it with the model settings it "
          "was written with (model.size, model.scan: scanned layers stack each block's "
          "parameters)") from None
    return _data_to_keys(restored["state"], abstract_state), has_data

  def _check_process_count(self, step: int) -> None:
    folder = os.path.join(self.directory, str(step), "data")
    mine = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if not os.path.exists(os.path.join(folder, mine)):
      saved = sorted(n for n in os.listdir(folder) if n.startswith("process_"))
      raise errors.InputError(
          f"{folder} holds the data positions {', '.join(saved)}, not {mine}: resume with "
          "the number of processes that wrote the checkpoint")

  def data_state(self, step: int) -> dict | None:
    """This process's saved iterator position at `step` (None when not saved)."""
    path = os.path.join(self.directory, str(step), "data",
                        f"process_{jax.process_index()}-of-{jax.process_count()}.json")
    if not os.path.exists(path):
      return None
    with open(path, encoding="utf-8") as f:
      return json.load(f)

  def item_names(self, step: int) -> list[str]:
    path = os.path.join(self.directory, str(step))
    return [n for n in os.listdir(path) if not n.startswith("_")] if os.path.isdir(path) else []

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
