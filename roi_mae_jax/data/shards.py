"""Prepared datasets on disk: one ArrayRecord shard per scan, one record per frame.

    WORKDIR/dataset.json                grid, crop box, dtype, TR, normalisation
    WORKDIR/index.csv                   one row per prepared scan
    WORKDIR/shards/SCAN.array_record    frames of the crop box, float16, C order
    WORKDIR/shards/SCAN.json            the scan's index row, written last

    data = PreparedDataset("runs/prepared")
    data.rows[0]["subject"], data.rows[0]["label"]     # -1: unlabelled
    window = data.frames(0, start=10, count=8)         # (X, Y, Z, 8) float32

A scan is finished when its JSON row exists: the shard is written under a
temporary name and renamed first, so an interrupted prepare leaves nothing
that looks finished. Frames are single records (group size 1), so a random
window reads only its own frames. Opening a dataset checks that every shard
is readable and holds the frames index.csv gives it; a damaged shard found
then or while reading stops with one `InputError` naming the file and why.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import hashlib
import json
import os
from typing import Iterable, Sequence

import numpy as np
from array_record.python import array_record_module
from array_record.python import array_record_data_source

from roi_mae_jax import errors
from roi_mae_jax import outputs
from roi_mae_jax.brain import grids

DATASET_FILE = "dataset.json"
INDEX_FILE = "index.csv"
BRAIN_MASK_FILE = "brain_mask.nii.gz"
SHARDS_DIR = "shards"
SHARD_SUFFIX = ".array_record"
INDEX_COLUMNS = ("scan", "subject", "site", "label", "frames", "tr", "shard", "source_frames",
                 "source_tr", "tr_source", "brain_with_data", "nonfinite_voxels",
                 "sform_code", "qform_code", "brain_inside_template", "brain_dice", "warning",
                 "denoise", "confounds", "confound_count", "detrend", "high_pass_hz",
                 "low_pass_hz", "dropped_frames", "path")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What every shard of a prepared dataset shares."""

  grid_shape: tuple[int, int, int]
  affine: tuple[float, ...]          # 16 numbers, row-major
  crop_start: tuple[int, int, int]   # the stored box inside the grid
  crop_shape: tuple[int, int, int]
  tr: float
  normalise: str
  dtype: str = "float16"
  # sha1 of the atlas labels on the grid: shards hold its brain, so a changed
  # atlas (file or resampling) means they no longer fit.
  atlas_sha1: str = ""

  @property
  def grid(self) -> grids.Grid:
    return grids.Grid(self.grid_shape, np.asarray(self.affine).reshape(4, 4))

  @property
  def crop(self) -> tuple[slice, slice, slice]:
    return tuple(slice(s, s + n) for s, n in zip(self.crop_start, self.crop_shape))

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, payload: dict) -> "DatasetInfo":
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: tuple(v) if isinstance(v, list) else v
              for k, v in payload.items() if k in fields}
    return cls(**values)


@dataclasses.dataclass(frozen=True)
class _FileInstruction:
  """ArrayRecord's FileInstruction protocol: a whole file of known length."""

  filename: str
  skip: int
  take: int
  examples_in_shard: int


def shard_path(workdir: str, scan: str) -> str:
  return os.path.join(workdir, SHARDS_DIR, scan + SHARD_SUFFIX)


def write_shard(workdir: str, scan: str, frames: Iterable[np.ndarray], row: dict,
                dtype: str = "float16") -> dict:
  """Writes the frames of one scan, then its row; returns the row with `shard` set."""
  path = shard_path(workdir, scan)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
  count = 0
  try:
    for frame in frames:
      writer.write(np.ascontiguousarray(frame, dtype=dtype).tobytes())
      count += 1
  finally:
    writer.close()
  os.replace(tmp, path)
  row = dict(row, shard=os.path.relpath(path, workdir), frames=count)
  outputs.write_json(path[:-len(SHARD_SUFFIX)] + ".json", row)
  return row


def finished_rows(workdir: str) -> dict[str, dict]:
  """scan -> row of every finished scan."""
  rows = {}
  for path in sorted(glob.glob(os.path.join(workdir, SHARDS_DIR, "*.json"))):
    shard = path[:-len(".json")] + SHARD_SUFFIX
    if os.path.exists(shard):
      with open(path, encoding="utf-8") as f:
        row = json.load(f)
      rows[row["scan"]] = row
  return rows


def remove_unfinished(workdir: str) -> list[str]:
  """Deletes temporary shards and shards without a row; returns what it removed."""
  folder = os.path.join(workdir, SHARDS_DIR)
  removed = glob.glob(os.path.join(folder, "*.tmp"))
  for shard in glob.glob(os.path.join(folder, "*" + SHARD_SUFFIX)):
    if not os.path.exists(shard[:-len(SHARD_SUFFIX)] + ".json"):
      removed.append(shard)
  for path in removed:
    os.remove(path)
  return removed


def remove_scan(workdir: str, scan: str) -> None:
  """Deletes the row, then the shard, of `scan` (in that order: never a row without data)."""
  path = shard_path(workdir, scan)
  for name in (path[:-len(SHARD_SUFFIX)] + ".json", path):
    if os.path.exists(name):
      os.remove(name)


def write_table(path: str, columns: Sequence[str], rows: Iterable[dict]) -> None:
  """A CSV with `columns`, written atomically."""
  tmp = path + ".tmp"
  with open(tmp, "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
  os.replace(tmp, path)


def read_info(workdir: str) -> DatasetInfo:
  path = os.path.join(workdir, DATASET_FILE)
  if not os.path.exists(path):
    raise errors.InputError(f"{workdir} is not a prepared dataset ({DATASET_FILE} is missing); "
                            "make one with task=prepare (configs/prepare.py)")
  with open(path, encoding="utf-8") as f:
    return DatasetInfo.from_json(json.load(f))


def fingerprint(workdir: str) -> dict:
  """What identifies a prepared dataset: SHA-256 of dataset.json, index.csv and each listed
  shard's name and size (cheap: shards are not read), with counts for messages.

      {"fingerprint": "3f2a...", "scans": 40, "frames": 7040, "path": "/abs/runs/prepared"}

  Preparing other scans (or the same ones with other settings) into the folder
  changes it; copying the folder elsewhere does not.
  """
  digest = hashlib.sha256()
  index = os.path.join(workdir, INDEX_FILE)
  scans = frames = 0
  for name in (DATASET_FILE, INDEX_FILE):
    path = os.path.join(workdir, name)
    if os.path.exists(path):
      with open(path, "rb") as f:
        digest.update(name.encode() + b"\0" + f.read() + b"\0")
  if os.path.exists(index):
    with open(index, newline="", encoding="utf-8") as f:
      for row in csv.DictReader(f):
        shard = os.path.join(workdir, row.get("shard", ""))
        size = os.path.getsize(shard) if os.path.exists(shard) else -1
        digest.update(f"{row.get('shard')}:{size}\0".encode())
        scans, frames = scans + 1, frames + int(row.get("frames") or 0)
  return {"fingerprint": digest.hexdigest()[:16], "scans": scans, "frames": frames,
          "path": os.path.abspath(workdir)}


_REDO = ("delete that shard and its .json and re-run task prepare into {workdir} to redo "
         "the scan")


def _reason(error: Exception) -> str:
  return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:160]}"


def _check_shard(path: str, frames: int, index: str) -> None:
  """Raises `InputError` unless `path` opens and holds `frames` records."""
  workdir = os.path.dirname(os.path.dirname(path))
  try:
    reader = array_record_module.ArrayRecordReader(path)
    try:
      found = reader.num_records()
    finally:
      reader.close()
  except Exception as e:  # pylint: disable=broad-except
    raise errors.InputError(f"{path} is not a readable shard ({_reason(e)}); "
                            f"{_REDO.format(workdir=workdir)}") from None
  if found != frames:
    raise errors.InputError(f"{path} holds {found} frames but {index} says {frames}; "
                            f"{_REDO.format(workdir=workdir)}")


class PreparedDataset:
  """Random access to the frames of a prepared dataset (picklable, opens lazily)."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.info = read_info(workdir)
    index = os.path.join(workdir, INDEX_FILE)
    if not os.path.exists(index):
      raise errors.InputError(f"{index} is missing: the prepare run in {workdir} did not finish")
    with open(index, newline="", encoding="utf-8") as f:
      self.rows = [dict(r, label=int(r["label"]), frames=int(r["frames"]))
                   for r in csv.DictReader(f)]
    if not self.rows:
      raise errors.InputError(f"{index} lists no scans")
    missing = [r["shard"] for r in self.rows
               if not os.path.exists(os.path.join(workdir, r["shard"]))]
    if missing:
      raise errors.InputError(f"{len(missing)} shards listed in {index} are missing, "
                              f"e.g. {os.path.join(workdir, missing[0])}")
    for row in self.rows:
      _check_shard(os.path.join(workdir, row["shard"]), row["frames"], index)
    counts = [r["frames"] for r in self.rows]
    self.offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    self._source = None
    self._frame_bytes = int(np.prod(self.info.crop_shape)) * np.dtype(self.info.dtype).itemsize

  @property
  def source(self) -> array_record_data_source.ArrayRecordDataSource:
    if self._source is None:
      # FileInstructions with known lengths: no file is opened until read.
      paths = [_FileInstruction(os.path.join(self.workdir, r["shard"]), 0, r["frames"],
                                r["frames"]) for r in self.rows]
      self._source = array_record_data_source.ArrayRecordDataSource(paths)
    return self._source

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_source"] = None
    return state

  def __len__(self) -> int:
    return len(self.rows)

  def frames(self, scan: int, start: int, count: int) -> np.ndarray:
    """(X, Y, Z, count) float32 frames of scan number `scan` on the full grid."""
    row = self.rows[scan]
    if not 0 <= start <= row["frames"] - count:
      raise errors.InputError(f"frames [{start}, {start + count}) are outside scan "
                              f"{row['scan']} ({row['frames']} frames)")
    keys = list(range(self.offsets[scan] + start, self.offsets[scan] + start + count))
    try:
      records = self.source.__getitems__(keys)
    except Exception as e:  # pylint: disable=broad-except
      # Riegeli reports damage deep inside Grain's threads without the file name.
      raise errors.InputError(
          f"{os.path.join(self.workdir, row['shard'])}: frames {start}-{start + count - 1} "
          f"are unreadable ({_reason(e)}); {_REDO.format(workdir=self.workdir)}") from None
    out = np.zeros(self.info.grid_shape + (count,), np.float32)
    for t, record in enumerate(records):
      if len(record) != self._frame_bytes:
        raise errors.InputError(f"{os.path.join(self.workdir, row['shard'])}: frame "
                                f"{start + t} has {len(record)} bytes, expected "
                                f"{self._frame_bytes}")
      frame = np.frombuffer(record, dtype=self.info.dtype).reshape(self.info.crop_shape)
      out[self.info.crop + (t,)] = frame
    return out
