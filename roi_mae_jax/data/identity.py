"""Which prepared dataset a pretraining run trains on, and refusing to resume onto another.

    data.identity.check_and_record(workdir, "runs/prepared", resuming=True,
                                      allow_change=False)   # InputError if it changed

WORKDIR/data_fingerprint.json records `shards.fingerprint` of the dataset
(index.csv, dataset.json and shard sizes) when a run starts. A resume
compares it with the dataset as it is now: `prepare --overwrite=True` with
other scans into the same folder keeps the path (and so config.json) the
same, but the checkpoint was trained on other data. That resume is refused
with one line naming both, unless `resume_onto_changed_data=True`, which
goes on and appends the change to the record's `history`. A workdir without
a record (a run started before records were kept) gets one, unchecked.
"""

from __future__ import annotations

import os
import time

import jax
from absl import logging

from roi_mae_jax import errors
from roi_mae_jax import outputs
from roi_mae_jax.data import shards

RECORD_FILE = "data_fingerprint.json"


def _describe(record: dict) -> str:
  return (f"{record.get('path')} (fingerprint {record.get('fingerprint')}, "
          f"{record.get('scans')} scans, {record.get('frames')} frames)")


def check_and_record(workdir: str, shards_dir: str, resuming: bool,
                     allow_change: bool = False) -> dict | None:
  """Checks the dataset in `shards_dir` against the run's record, then records it.

  Returns the fingerprint (None for the built-in synthetic data, which
  config.json already pins). Raises `InputError` when a resume would train
  on another dataset and `allow_change` is False.
  """
  if not shards_dir:
    return None
  current = shards.fingerprint(shards_dir)
  path = os.path.join(workdir, RECORD_FILE)
  record = outputs.read_json(path) if os.path.exists(path) else None
  if record is not None and record.get("fingerprint") == current["fingerprint"]:
    return current
  history = list(record.get("history", [])) if record else []
  if record is not None and resuming:
    if not allow_change:
      raise errors.InputError(
          f"{workdir} was trained on the prepared dataset {_describe(record)}, but "
          f"{_describe(current)} now holds other data (prepared again since): resuming would "
          "train one model on two datasets; choose another --workdir, or pass "
          "--config.resume_onto_changed_data=True to go on (recorded in "
          f"{path})")
    logging.warning("resuming onto a changed dataset: trained on %s, now %s (allowed by "
                    "resume_onto_changed_data; recorded in %s)", _describe(record),
                    _describe(current), path)
    history.append(dict({k: v for k, v in record.items() if k != "history"},
                        replaced_at=time.strftime("%Y-%m-%d %H:%M:%S")))
  if jax.process_index() == 0:
    outputs.write_json(path, dict(current, history=history))
  return current
