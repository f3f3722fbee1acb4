"""Checkpoints: the only module that imports Orbax.

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=3)
    ckpt.save(step, state, data_iterator=it)     # async for arrays; returns at once
    if ckpt.latest_step() is not None:
      state, resumed_data = ckpt.restore(abstract_state, data_iterator=it)
    ckpt.close()                                  # waits for pending saves

A save is written to a temporary folder and renamed when complete, so a save
cut off by a crash is never listed, and the previous checkpoint is used.
Each save is sealed with a checksum manifest (seals) as soon
as Orbax commits it: a background thread watches for the rename that commits
the save (Orbax's last write to the folder) and seals it then, not at the
next save; the next save, `wait` and `close` seal any it missed. `restore` verifies the manifest first: a corrupt, unreadable,
unsealed or badly sealed checkpoint (a damaged manifest) is reported by path
and the newest intact one is restored (`rejected` lists what was passed over;
`set_aside_rejected` moves those folders to CHECKPOINTS.rejected/ so a resumed
run can save those steps again). An unsealed checkpoint is never restored:
its bytes cannot be verified.
Typed PRNG keys are stored as their raw key data and re-wrapped on restore.
In a multi-process run every process calls save and restore: arrays are
written once, shard by shard, and each process's Grain iterator position goes
to its own file (data/process_<i>-of-<n>.json), since each reads other data.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import threading
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from absl import logging

from roi_mae_jax import errors
from roi_mae_jax.training import seals


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
    self._async = async_save
    self._sealer: threading.Thread | None = None
    self._stop_sealer = threading.Event()
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(keep),
        enable_async_checkpointing=async_save,
        # Not at open: a reader (probe on a live pretraining run) must not delete the
        # writer's in-flight saves. The first `save` drops saves cut off by a crash.
        cleanup_tmp_directories=False,
        create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self._unsealed: list[int] = []      # saved by this object, not sealed yet
    self._saved = False
    self.rejected: list[tuple[int, str, str]] = []   # (step, folder, why) at restore

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _remove_cut_off_saves(self) -> None:
    """Deletes temporary folders of saves a crash cut off (the writer holds the workdir lock)."""
    if jax.process_index() != 0:
      return
    for path in glob.glob(os.path.join(self.directory, "*.orbax-checkpoint-tmp*")):
      logging.info("removing %s, a save cut off by a crash", path)
      shutil.rmtree(path, ignore_errors=True)

  def _seal_when_committed(self, step: int) -> None:
    """Background thread: seals `step` once Orbax has renamed it into place.

    The rename is Orbax's last write to the folder (its metadata and commit
    marker come before it), so the folder is final when it appears. A save
    that fails never appears; `_stop_sealer` ends the wait.
    """
    folder = self.step_dir(step)
    while not self._stop_sealer.is_set():
      if os.path.isdir(folder):
        try:
          if not seals.is_sealed(folder):
            seals.seal(folder)
        except OSError as e:  # e.g. a full disk: sealed again at wait/close, or reported there
          logging.warning("could not seal %s yet: %s", folder, e)
        return
      self._stop_sealer.wait(0.02)

  def _join_sealer(self) -> None:
    if self._sealer is not None:
      self._stop_sealer.set()
      self._sealer.join()
      self._sealer, self._stop_sealer = None, threading.Event()

  def _seal_committed(self) -> None:
    """Seals the saves of this object that Orbax has committed and the hook did not."""
    for step in self._unsealed:
      folder = self.step_dir(step)
      if jax.process_index() == 0 and os.path.isdir(folder) and not seals.is_sealed(folder):
        seals.seal(folder)
    self._unsealed = []

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def has_step(self, step: int) -> bool:
    """Whether `step` is saved: committed, or saved by this object and still in flight."""
    return step in self._unsealed or step in self.all_steps()

  def newest_sealed(self) -> int | None:
    """The newest step with a checksum manifest (what a resume would restore)."""
    sealed = [s for s in self.all_steps() if seals.is_sealed(self.step_dir(s))]
    return max(sealed) if sealed else None

  def save(self, step: int, state: Any, data_iterator=None) -> None:
    """Saves `state` and, when given, the position of a Grain `data_iterator`."""
    items = {"state": ocp.args.StandardSave(_keys_to_data(state))}
    if data_iterator is not None:  # written now (synchronously): the loop moves it on
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self.manager.wait_until_finished()  # Orbax waits here anyway; then seal the last save
    self._join_sealer()
    self._seal_committed()
    if not self._saved:
      self._remove_cut_off_saves()
      self._saved = True
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    self._unsealed.append(step)
    if not self._async:  # committed when save returns
      self._seal_committed()
    elif jax.process_index() == 0:
      self._sealer = threading.Thread(target=self._seal_when_committed, args=(step,),
                                      name=f"seal_checkpoint_{step}", daemon=True)
      self._sealer.start()

  def restore(self, abstract_state: Any, step: int | None = None,
              data_iterator=None, partial: bool = False) -> tuple[Any, bool]:
    """(state, whether `data_iterator` was moved to its saved position).

    `partial`: `abstract_state` names a subset of the saved entries (e.g.
    {"params": ..., "step": ...}); only those are read from disk.

    `step` None: the newest checkpoint that verifies and reads, older ones
    tried in turn (each one passed over is logged and kept in `rejected`);
    a given `step` must itself be intact. The state is laid out like
    `abstract_state`. Raises `InputError` naming every folder and its problem
    when none can be used.
    """
    steps = sorted(self.all_steps(), reverse=True)
    if not steps:
      raise errors.InputError(f"no checkpoint in {self.directory}")
    if step is not None:
      if step not in steps:
        raise errors.InputError(f"no checkpoint for step {step} in {self.directory}; there "
                                f"are {sorted(steps)}")
      steps = [step]
    self.rejected = []
    for candidate in steps:
      folder = self.step_dir(candidate)
      problem = seals.verify(folder)
      if problem == seals.UNSEALED:
        problem = (f"{seals.UNSEALED} ({seals.MANIFEST}): its save was cut off before "
                   "it was sealed, or the file was removed, so its bytes cannot be verified "
                   "and it is not restored")
      if problem is None:
        try:
          restored = self._restore_step(candidate, abstract_state, data_iterator, partial)
        except errors.InputError:
          raise
        except Exception as e:  # pylint: disable=broad-except
          # Orbax and TensorStore raise many types for unreadable bytes.
          first = (str(e).splitlines() or [""])[0][:200]
          problem = f"unreadable ({type(e).__name__}: {first})"
      if problem is None:
        if self.rejected:
          logging.warning("restored %s instead: %d newer checkpoint(s) were not usable",
                          folder, len(self.rejected))
        return restored
      logging.warning("checkpoint %s is not used: %s", folder, problem)
      self.rejected.append((candidate, folder, problem))
    raise errors.InputError(
        "no usable checkpoint: " + "; ".join(f"{f} {p}" for _, f, p in self.rejected) +
        f". Move the damaged folders out of {self.directory} (or choose another --workdir)")

  def _restore_step(self, step: int, abstract_state: Any, data_iterator,
                    partial: bool = False) -> tuple[Any, bool]:
    target = jax.tree.map(_abstract_key_data, abstract_state)
    if partial:
      items = {"state": ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True)}
    else:
      items = {"state": ocp.args.StandardRestore(target)}
    has_data = data_iterator is not None and "data" in self.item_names(step)
    if has_data:
      self._check_process_count(step)
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except ValueError as e:
      shapes = re.search(r"Requested shape: (\(.*?\)) is not compatible with the stored "
                         r"shape: (\(.*?\))", str(e))
      if shapes:  # not damage: a model of other sizes
        raise errors.InputError(
            f"the checkpoint of step {step} in {self.directory} holds a parameter of shape "
            f"{shapes.group(2)} where this model has {shapes.group(1)}: the model, grid, "
            "patch size or the atlas on the grid (one position per brain patch) differ from "
            "when it was written; use those settings, or pretrain again") from None
      if "tree structures do not match" not in str(e):
        raise
      where = str(e).splitlines()[1].rstrip(":") if "\n" in str(e) else ""
      raise errors.InputError(
          f"the checkpoint of step {step} in {self.directory} is laid out differently from "
          f"this model (first difference: {where}); restore it with the model settings it "
          "was written with (model.size, model.scan: scanned layers stack each block's "
          "parameters)") from None
    if partial:  # Orbax reads a subtree as stored, whatever shapes were asked for
      self._check_shapes(step, restored["state"], target)
    return _data_to_keys(restored["state"], abstract_state), has_data

  def _check_shapes(self, step: int, restored: Any, target: Any) -> None:
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(restored),
                                 jax.tree.leaves(target)):
      if tuple(got.shape) != tuple(want.shape):
        raise errors.InputError(
            f"the checkpoint of step {step} in {self.directory} holds "
            f"{jax.tree_util.keystr(path)} of shape {tuple(got.shape)} where this model has "
            f"{tuple(want.shape)}: the model, grid, patch size or the atlas on the grid (one "
            "position per brain patch) differ from when it was written; use those settings, "
            "or pretrain again")

  def set_aside_rejected(self) -> list[str]:
    """Moves the folders `restore` passed over to DIRECTORY.rejected/ (kept, never deleted).

    A resumed run saves those steps again, which Orbax refuses while they
    exist. Returns the new paths.
    """
    if not self.rejected:
      return []
    if jax.process_count() > 1:
      raise errors.InputError(
          f"checkpoints {', '.join(f for _, f, _ in self.rejected)} are damaged; a "
          "multi-process run does not move them: move them out of "
          f"{self.directory} and re-run")
    moved = []
    for step, folder, _ in self.rejected:
      target = os.path.join(f"{self.directory}.rejected", str(step))
      suffix = 1
      while os.path.exists(target):
        suffix += 1
        target = os.path.join(f"{self.directory}.rejected", f"{step}_{suffix}")
      os.makedirs(os.path.dirname(target), exist_ok=True)
      shutil.move(folder, target)
      logging.warning("moved the damaged checkpoint %s to %s", folder, target)
      moved.append(target)
    self.rejected = []
    self.manager.reload()
    return moved

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
    """Waits for pending saves and seals them."""
    self.manager.wait_until_finished()
    self._join_sealer()
    self._seal_committed()

  def close(self) -> None:
    self.wait()
    self.manager.close()
