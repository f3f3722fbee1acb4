"""Output files that are never silently overwritten.

    png, js = claim(workdir, ["masks.png", "summary.json"], overwrite=False)
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from roi_mae_jax import errors


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


def write_json(path: str, payload: Any) -> None:
  """Writes JSON atomically (a reader never sees half a file)."""
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(payload, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)
