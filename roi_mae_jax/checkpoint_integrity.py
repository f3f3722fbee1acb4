"""Checksum manifests of committed checkpoints, verified before a restore.

    seal("runs/demo/checkpoints/300")            # writes 300/_CHECKSUMS.json
    problem = verify("runs/demo/checkpoints/300")   # None, or why it must not be used

The manifest lists every file of the step folder with its size and SHA-256,
so a flipped bit, a truncated or deleted file (e.g. Orbax's `_METADATA`) or
an added one is found before any byte is restored. A folder without a
manifest is "unsealed": a run stopped between Orbax's commit and the seal.
"""

from __future__ import annotations

import hashlib
import json
import os

MANIFEST = "_CHECKSUMS.json"
UNSEALED = "has no checksum manifest"


def _files(step_dir: str) -> list[str]:
  found = []
  for root, _, names in os.walk(step_dir):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), step_dir)
      if rel != MANIFEST:
        found.append(rel)
  return sorted(found)


def _digest(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def seal(step_dir: str) -> None:
  """Writes the manifest of `step_dir` (atomically: a reader sees all of it or none)."""
  files = {rel: {"bytes": os.path.getsize(os.path.join(step_dir, rel)),
                 "sha256": _digest(os.path.join(step_dir, rel))} for rel in _files(step_dir)}
  path = os.path.join(step_dir, MANIFEST)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump({"files": files}, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def is_sealed(step_dir: str) -> bool:
  return os.path.exists(os.path.join(step_dir, MANIFEST))


def verify(step_dir: str) -> str | None:
  """None when every file matches the manifest; otherwise the first problem found."""
  path = os.path.join(step_dir, MANIFEST)
  if not os.path.exists(path):
    return UNSEALED
  try:
    with open(path, encoding="utf-8") as f:
      expected = json.load(f)["files"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f"its manifest {MANIFEST} is unreadable ({type(e).__name__})"
  present = set(_files(step_dir))
  missing = sorted(set(expected) - present)
  if missing:
    return f"{missing[0]} is missing" + (f" (and {len(missing) - 1} more)" if missing[1:] else "")
  extra = sorted(present - set(expected))
  if extra:
    return f"{extra[0]} was added after the checkpoint was written"
  for rel, want in sorted(expected.items()):
    full = os.path.join(step_dir, rel)
    size = os.path.getsize(full)
    if size != want["bytes"]:
      return f"{rel} has {size} bytes, {want['bytes']} were written"
    try:
      if _digest(full) != want["sha256"]:
        return f"{rel} changed on disk (checksum mismatch)"
    except OSError as e:
      return f"{rel} is unreadable ({e})"
  return None
