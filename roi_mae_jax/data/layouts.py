"""Finding the scans of a dataset and their labels, layout by layout.

    entries, skipped = find_scans(config)   # config.source picks the layout

Layouts (`config.source`):
  adhd200       the Athena preprocessed release: <Site>/<ID>/sfnwmrda<ID>_session_1_rest_1.nii.gz
                (or snwmrda...), phenotypes in <Site>/<Site>_phenotypic.csv
                (`ScanDir ID`, `Site`, `Gender`, `Age`, `DX`, `QC_Rest_1`).
  nilearn_adhd  nilearn's ADHD download: data/<ID>/<ID>_rest_tshift_RPI_voreg_mni.nii.gz and
                ADHD200_40subs_motion_parameters_and_phenotypics.csv (Subject, site, adhd).
  fmriprep      BIDS derivatives: sub-*/[ses-*/]func/*task-rest*space-MNI152*desc-preproc_bold.nii.gz,
                participants.tsv with the label in `config.label_column`; TR from the JSON sidecar.
  manifest      a CSV (`config.manifest`) with columns path, subject, site, label and optional tr;
                relative paths are relative to the CSV.

Labels map through `config.label_values` ('0=0,1=1,2=1,3=1': ADHD-200's DX, where 1-3 are
ADHD subtypes); 'pending', empty or unknown values leave a scan unlabelled (label -1): it
still serves pretraining unless `config.require_label`.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import os
import re

from roi_mae_jax import errors

SOURCES = ("adhd200", "nilearn_adhd", "fmriprep", "manifest")
UNLABELLED = -1
NILEARN_PHENOTYPES = "ADHD200_40subs_motion_parameters_and_phenotypics.csv"


@dataclasses.dataclass(frozen=True)
class ScanEntry:
  """One scan to prepare."""

  scan: str          # unique, safe as a file name
  subject: str
  site: str
  label: int         # 1 positive (ADHD), 0 control, -1 unlabelled
  path: str
  tr: float | None = None   # overrides the header when given
  note: str = ""            # kept in the report (e.g. why the label is missing)


@dataclasses.dataclass(frozen=True)
class Skipped:
  """A scan (or a table row) that will not be prepared, and why."""

  subject: str
  path: str
  reason: str


def safe_name(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "scan"


def parse_label_values(spec: str) -> dict[str, int]:
  """'0=0,1=1,2=1' -> {'0': 0, '1': 1, '2': 1}."""
  mapping = {}
  for item in filter(None, (s.strip() for s in spec.split(","))):
    key, sep, value = item.partition("=")
    if not sep or value.strip() not in ("0", "1"):
      raise errors.InputError(f"config.label_values: {item!r} is not VALUE=0 or VALUE=1")
    mapping[key.strip().lower()] = int(value)
  return mapping


def _label(raw: str | None, values: dict[str, int], where: str) -> tuple[int, str]:
  text = (raw or "").strip().strip('"').lower()
  if text in values:
    return values[text], ""
  try:  # '1.0' in some tables
    number = float(text)
    if number.is_integer() and str(int(number)) in values:
      return values[str(int(number))], ""
  except ValueError:
    pass
  if text in ("", "pending", "n/a", "na", "nan"):
    return UNLABELLED, f"no label ({where} is {text or 'empty'}): pretraining only"
  return UNLABELLED, f"label {text!r} ({where}) is not in config.label_values: pretraining only"


def _read_table(path: str, delimiter: str = ",") -> list[dict[str, str]]:
  with open(path, newline="", encoding="utf-8-sig") as f:
    reader = csv.DictReader(f, delimiter=delimiter)
    return [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]


def _id_key(text: str) -> str:
  """Subject ids compare as numbers when they are numbers ('0010001' == '10001')."""
  text = text.strip().strip('"')
  return str(int(text)) if text.isdigit() else text


def _find_adhd200(config) -> tuple[list[ScanEntry], list[Skipped]]:
  root, values = config.input_dir, parse_label_values(config.label_values)
  entries, skipped = [], []
  sites = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
  for site in sites:
    site_dir = os.path.join(root, site)
    table = os.path.join(site_dir, f"{site}_phenotypic.csv")
    rows = {}
    if os.path.exists(table):
      rows = {_id_key(r.get("ScanDir ID", "")): r for r in _read_table(table)}
    subjects = sorted(d for d in os.listdir(site_dir) if os.path.isdir(os.path.join(site_dir, d)))
    for sid in subjects:
      names = [f"{p}{sid}_session_1_rest_1.nii.gz" for p in ("sfnwmrda", "snwmrda")]
      paths = [os.path.join(site_dir, sid, n) for n in names]
      path = next((p for p in paths if os.path.exists(p)), paths[0])
      row = rows.pop(_id_key(sid), None)
      if row is None:
        missing = "is missing" if not os.path.exists(table) else "has no row for it"
        label, note = UNLABELLED, f"{table} {missing}: pretraining only"
      else:
        label, note = _label(row.get("DX"), values, "DX")
        qc = row.get(config.qc_column, "") if config.qc_column else ""
        if qc.strip() == "0":
          skipped.append(Skipped(sid, path, f"failed quality control ({config.qc_column} = 0)"))
          continue
      entries.append(ScanEntry(safe_name(f"{site}_{sid}"), sid, site, label, path, note=note))
    for key, row in rows.items():  # phenotype rows without a scan folder
      sid = row.get("ScanDir ID", key)
      skipped.append(Skipped(sid, os.path.join(site_dir, sid), "missing file: no scan folder "
                             f"for this {os.path.basename(table)} row"))
  return entries, skipped


def _find_nilearn_adhd(config) -> tuple[list[ScanEntry], list[Skipped]]:
  root, values = config.input_dir, parse_label_values(config.label_values)
  table = os.path.join(root, NILEARN_PHENOTYPES)
  if not os.path.exists(table):
    raise errors.InputError(f"{table} is missing: input_dir must be nilearn's 'adhd' folder")
  entries, skipped = [], []
  for row in _read_table(table):
    sid = row.get("Subject", "").strip('"')
    if not sid:
      continue
    folder = sid.zfill(7) if sid.isdigit() else sid
    path = os.path.join(root, "data", folder, f"{folder}_rest_tshift_RPI_voreg_mni.nii.gz")
    label, note = _label(row.get("adhd"), values, "adhd")
    site = row.get("site", "").strip().strip('"') or "unknown"
    entries.append(ScanEntry(safe_name(f"{site}_{folder}"), folder, site, label, path,
                             note=note))
  return entries, skipped


def _fmriprep_tr(path: str) -> float | None:
  sidecar = re.sub(r"\.nii(\.gz)?$", ".json", path)
  if os.path.exists(sidecar):
    with open(sidecar, encoding="utf-8") as f:
      value = json.load(f).get("RepetitionTime")
    return float(value) if value else None
  return None


def _find_fmriprep(config) -> tuple[list[ScanEntry], list[Skipped]]:
  root, values = config.input_dir, parse_label_values(config.label_values)
  pattern = "*task-rest*space-MNI152*desc-preproc_bold.nii.gz"
  paths = sorted(glob.glob(os.path.join(root, "sub-*", "func", pattern)) +
                 glob.glob(os.path.join(root, "sub-*", "ses-*", "func", pattern)))
  table = os.path.join(root, "participants.tsv")
  participants = {}
  if os.path.exists(table):
    participants = {r.get("participant_id", "").removeprefix("sub-"): r
                    for r in _read_table(table, delimiter="\t")}
  entries, skipped, runs = [], [], {}
  for path in paths:
    name = os.path.basename(path)
    subject = name.split("_")[0]
    run = re.sub(r"_(space|res|desc)-[^_]+", "", name)  # the same run in another space
    if run in runs:
      skipped.append(Skipped(subject, path, f"another space of this run is used ({runs[run]})"))
      continue
    runs[run] = name
    row = participants.get(subject.removeprefix("sub-"))
    if not config.label_column:
      label, note = UNLABELLED, "config.label_column is not set: pretraining only"
    elif row is None:
      label, note = UNLABELLED, f"not in {table}: pretraining only"
    else:
      label, note = _label(row.get(config.label_column), values, config.label_column)
    site = (row or {}).get(config.site_column, "") or "unknown"
    scan = safe_name(name.removesuffix("_desc-preproc_bold.nii.gz"))
    entries.append(ScanEntry(scan, subject, site, label, path, tr=_fmriprep_tr(path), note=note))
  return entries, skipped


def _find_manifest(config) -> tuple[list[ScanEntry], list[Skipped]]:
  manifest, values = config.manifest, parse_label_values(config.label_values)
  if not os.path.exists(manifest):
    raise errors.InputError(f"manifest {manifest} does not exist")
  rows = _read_table(manifest)
  needed = {"path", "subject", "site", "label"}
  if not rows or not needed <= set(rows[0]):
    have = ", ".join(rows[0]) if rows else "no rows"
    raise errors.InputError(f"manifest {manifest} needs columns path, subject, site, label "
                            f"(and optional tr); it has {have}")
  base = os.path.dirname(os.path.abspath(manifest))
  entries, seen = [], {}
  for line, row in enumerate(rows, start=2):
    path = row["path"] if os.path.isabs(row["path"]) else os.path.join(base, row["path"])
    label, note = _label(row["label"], values, f"label on line {line}")
    try:
      tr = float(row["tr"]) if row.get("tr") else None
    except ValueError as e:
      raise errors.InputError(f"manifest {manifest} line {line}: tr {row['tr']!r} is not a "
                              "number") from e
    scan = safe_name(row["subject"])
    seen[scan] = seen.get(scan, 0) + 1
    if seen[scan] > 1:
      scan = f"{scan}_{seen[scan]}"
    entries.append(ScanEntry(scan, row["subject"], row["site"] or "unknown", label, path, tr,
                             note))
  return entries, []


def find_scans(config) -> tuple[list[ScanEntry], list[Skipped]]:
  """The scans of `config.source` under `config.input_dir` (or `config.manifest`)."""
  finders = {"adhd200": _find_adhd200, "nilearn_adhd": _find_nilearn_adhd,
             "fmriprep": _find_fmriprep, "manifest": _find_manifest}
  if config.source not in finders:
    raise errors.InputError(f"config.source must be one of {', '.join(SOURCES)}, "
                            f"got {config.source!r}")
  if config.source != "manifest" and not os.path.isdir(config.input_dir or ""):
    raise errors.InputError(f"config.input_dir {config.input_dir!r} is not a folder "
                            f"(source {config.source} reads a folder)")
  entries, skipped = finders[config.source](config)
  if config.require_label:
    kept = []
    for e in entries:
      if e.label == UNLABELLED:
        skipped.append(Skipped(e.subject, e.path, e.note.replace(": pretraining only", "") +
                               " (config.require_label)"))
      else:
        kept.append(e)
    entries = kept
  return sorted(entries, key=lambda e: e.scan), skipped
