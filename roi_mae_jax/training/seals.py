"""Checksum manifests of committed checkpoints, verified before a restore.

    seal("runs/demo/checkpoints/300")            # writes 300/_CHECKSUMS.json
    problem = verify("runs/demo/checkpoints/300")   # None, or why it must not be used

The manifest lists every file of the step folder with its size and SHA-256,
so a flipped bit, a truncated or deleted file (e.g. Orbax's `_METADATA`) or
an added one is found before any byte is restored. A manifest that is not
valid JSON, or valid JSON of another shape (a renamed key, a wrong type), is
damage like any other. A folder without a manifest is "unsealed": its bytes
cannot be verified (Checkpointer seals a save as soon as Orbax commits it, so
only a crash in between, or a copy that dropped the file, leaves one).
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


def _manifest_shape_problem(expected) -> str | None:
  """Why `expected` is not {relative path: {"bytes": int, "sha256": 64 hex}} (None if it is)."""
  if not isinstance(expected, dict):
    return f"'files' is a {type(expected).__name__}, not a table"
  for rel, want in expected.items():
    if not isinstance(want, dict) or set(want) != {"bytes", "sha256"}:
      keys = sorted(want) if isinstance(want, dict) else type(want).__name__
      return f"the entry of {rel} holds {keys}, not bytes and sha256"
    if not isinstance(want["bytes"], int) or isinstance(want["bytes"], bool):
      return f"the size of {rel} is not a whole number"
    if not (isinstance(want["sha256"], str) and len(want["sha256"]) == 64):
      return f"the checksum of {rel} is not a SHA-256"
  return None


def verify(step_dir: str) -> str | None:
  """None when every file matches the manifest; otherwise the first problem found."""
  path = os.path.join(step_dir, MANIFEST)
  if not os.path.exists(path):
    return UNSEALED
  try:
    with open(path, encoding="utf-8") as f:
      expected = json.load(f)["files"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f"its manifest {MANIFEST} is unreadable or damaged ({type(e).__name__})"
  shape_problem = _manifest_shape_problem(expected)
  if shape_problem:
    return f"its manifest {MANIFEST} is damaged ({shape_problem})"
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
