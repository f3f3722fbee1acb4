"""Output files that are never silently overwritten.

    png, js = claim(workdir, ["masks.png", "summary.json"], overwrite=False)
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from roi_mae_jax import errors

CONFIG_FILE = "config.json"


def claim(workdir: str, names: Sequence[str], overwrite: bool) -> list[str]:
  """Paths for `names` in `workdir`; refuses existing files unless `overwrite`."""
  paths = [os.path.join(workdir, n) for n in names]
  existing = [p for p in paths if os.path.exists(p)]
  if existing and not overwrite:
    raise errors.InputError(
        f"{', '.join(existing)} already exist; pass --config.overwrite=True to "
        f"replace them or choose another --workdir")
  os.makedirs(workdir, exist_ok=True)
  return paths


def _jsonable(value):
  """NumPy scalars and arrays as JSON numbers and lists."""
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_json(path: str, payload: Any) -> None:
  """Writes JSON atomically (a reader never sees half a file)."""
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(payload, f, indent=2, sort_keys=True, default=_jsonable)
    f.write("\n")
  os.replace(tmp, path)


def read_json(path: str) -> Any:
  """A JSON file; an unreadable one is an InputError naming it."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise errors.InputError(f"{path} cannot be read ({e}); move it away to compute it "
                            "again") from None


def check_task(workdir: str, task: str) -> None:
  """Refuses a workdir whose config.json belongs to another task.

  Two tasks in one folder would mix (and, with overwrite=True, delete) each
  other's files, e.g. prepare's output in a pretraining run.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return
  try:
    with open(path, encoding="utf-8") as f:
      other = json.load(f).get("task")
  except (OSError, ValueError, AttributeError) as e:
    raise errors.InputError(f"{path} is unreadable ({type(e).__name__}: {e}); it is left "
                            "as it is: choose another --workdir") from None
  if other is not None and other != task:
    raise errors.InputError(
        f"{workdir} holds a '{other}' run ({path}); task '{task}' does not write into it "
        "(nor delete its files with overwrite=True): choose another --workdir")


def write_config(workdir: str, config: ml_collections.ConfigDict,
                 may_differ: tuple[str, ...] = (), hint: str = "") -> str:
  """Writes WORKDIR/config.json; refuses a workdir that holds another run's config.

  Keys in `may_differ` (e.g. total_steps) may change between a run and its resume.
  Every process checks; process 0 writes.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  current = json.loads(config.to_json_best_effort(sort_keys=True))
  previous = None
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      previous = json.load(f)
    changed = sorted(k for k in set(previous) | set(current)
                     if k not in may_differ and previous.get(k) != current.get(k))
    if changed:
      raise errors.InputError(
          f"{path} holds a run with different settings ({', '.join(changed)}); resume it "
          f"with the same config or choose another --workdir{hint}")
  if jax.process_index() == 0 and previous != current:  # the same run: file untouched
    write_json(path, current)
  return path
