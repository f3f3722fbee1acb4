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
                `config.space` picks the template (MNI152NLin2009cAsym, MNI152NLin6Asym, ...);
                a run found in several spaces without it is an error naming the files.
  manifest      a CSV (`config.manifest`) with columns path, subject, site, label and optional tr;
                relative paths are relative to the CSV.

Every scan file found is reported: used, skipped (and why), or ignored (e.g. a
second run of an Athena subject: only session_1 rest_1 is prepared). Scan keys
(shard names) are unique, case-insensitively; a key already taken gets _2, _3,
... and the report says so. Tables are read with their delimiter detected
(',', ';' or tab). A label table that cannot be trusted skips the scans it
would label, each with a reason naming the file and lines: unreadable, without
its ID, label or QC column, or giving one ID on several rows (identical
repeats in an ADHD-200 phenotypic table are used once). A scan list that
cannot be read (manifest, nilearn's table) stops the run. A file listed twice
in a manifest is prepared once.

Labels map through `config.label_values` ('0=0,1=1,2=1,3=1': ADHD-200's DX, where 1-3 are
ADHD subtypes); 'pending', empty or unknown values leave a scan unlabelled (label -1): it
still serves pretraining unless `config.require_label`.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re

from roi_mae_jax import errors
from roi_mae_jax.config import validation
from roi_mae_jax.data import tables

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
  status: str = "skipped"   # or "ignored": a file that is not this subject's scan


def safe_name(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "scan"


def parse_label_values(spec: str) -> dict[str, int]:
  """'0=0,1=1,2=1' -> {'0': 0, '1': 1, '2': 1}."""
  validation.refuse("label_values", spec)
  items = (item.partition("=") for item in filter(None, (s.strip() for s in spec.split(","))))
  return {key.strip().lower(): int(value) for key, _, value in items}


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


def _id_key(text: str) -> str:
  """Subject ids compare as numbers when they are numbers ('0010001' == '10001')."""
  text = text.strip().strip('"')
  return str(int(text)) if text.isdigit() else text


ATHENA_PREFIXES = ("sfnwmrda", "snwmrda")  # filtered first, as the Athena release prefers
ATHENA_ID = "ScanDir ID"


def _phenotypes(table: str, columns: tuple[str, ...]) -> tuple[dict, dict, str]:
  """(id -> row, id -> problem with its rows, problem with the whole table) of one site."""
  if not os.path.exists(table):
    return {}, {}, ""
  try:
    read = tables.read_table(table, expected=columns)
    read.require(*columns)
  except tables.TableError as e:
    return {}, {}, f"{e}: its scans are not prepared"
  rows, problems = {}, {}
  for sid, lines in read.duplicates(lambda r: _id_key(r.get(ATHENA_ID, ""))).items():
    values = {tuple(row.get(c, "") for c in columns[1:]) for line, row in read.rows
              if line in lines}
    if len(values) > 1:
      problems[sid] = (f"{table} lines {', '.join(map(str, lines))} all give {ATHENA_ID} "
                       f"{sid} with different values ({', '.join(columns[1:])}): not prepared "
                       "until one row is left")
  for line, row in read.rows:
    rows.setdefault(_id_key(row.get(ATHENA_ID, "")), dict(row, _line=line))
  return rows, problems, ""


def _athena_scan(site_dir: str, sid: str) -> tuple[str, list[Skipped]]:
  """This subject's scan path (which may be missing) and the other NIfTI files, ignored."""
  folder = os.path.join(site_dir, sid)
  paths = [os.path.join(folder, f"{p}{sid}_session_1_rest_1.nii.gz") for p in ATHENA_PREFIXES]
  path = next((p for p in paths if os.path.exists(p)), paths[0])
  others = sorted(n for n in os.listdir(folder) if re.search(r"\.nii(\.gz)?$", n) and
                  os.path.join(folder, n) != path)
  why = (f"not used: {os.path.basename(path)} is this subject's scan" if os.path.exists(path)
         else "not used: no " + " or ".join(os.path.basename(p) for p in paths))
  why += " (one scan per subject: session_1 rest_1, sfnwmrda before snwmrda)"
  return path, [Skipped(sid, os.path.join(folder, n), why, "ignored") for n in others]


def _find_adhd200(config) -> tuple[list[ScanEntry], list[Skipped]]:
  root, values = config.input_dir, parse_label_values(config.label_values)
  columns = (ATHENA_ID, "DX") + ((config.qc_column,) if config.qc_column else ())
  entries, skipped = [], []
  sites = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
  for site in sites:
    site_dir = os.path.join(root, site)
    table = os.path.join(site_dir, f"{site}_phenotypic.csv")
    rows, problems, table_problem = _phenotypes(table, columns)
    subjects = sorted(d for d in os.listdir(site_dir) if os.path.isdir(os.path.join(site_dir, d)))
    for sid in subjects:
      path, ignored = _athena_scan(site_dir, sid)
      skipped += ignored
      row = rows.pop(_id_key(sid), None)
      problem = table_problem or problems.get(_id_key(sid))
      if problem:
        skipped.append(Skipped(sid, path, problem))
        continue
      if row is None:
        missing = "is missing" if not os.path.exists(table) else "has no row for it"
        label, note = UNLABELLED, f"{table} {missing}: pretraining only"
      else:
        label, note = _label(row.get("DX"), values, f"DX on line {row['_line']} of {table}")
        qc = row.get(config.qc_column, "") if config.qc_column else ""
        if qc.strip() == "0":
          skipped.append(Skipped(sid, path, f"failed quality control ({config.qc_column} = 0) "
                                 f"on line {row['_line']} of {table}"))
          continue
      entries.append(ScanEntry(safe_name(f"{site}_{sid}"), sid, site, label, path, note=note))
    for key, row in rows.items():  # phenotype rows without a scan folder
      sid = row.get(ATHENA_ID, key)
      skipped.append(Skipped(sid, os.path.join(site_dir, sid), "missing file: no scan folder "
                             f"for line {row['_line']} of {table}"))
  return entries, skipped


def _find_nilearn_adhd(config) -> tuple[list[ScanEntry], list[Skipped]]:
  root, values = config.input_dir, parse_label_values(config.label_values)
  table = os.path.join(root, NILEARN_PHENOTYPES)
  if not os.path.exists(table):
    raise errors.InputError(f"{table} is missing: input_dir must be nilearn's 'adhd' folder")
  read = tables.read_table(table, expected=("Subject", "adhd"))
  read.require("Subject")
  duplicates = read.duplicates(lambda r: r.get("Subject", "").strip('"'))
  entries, skipped = [], []
  for line, row in read.rows:
    sid = row.get("Subject", "").strip('"')
    if not sid:
      continue
    folder = sid.zfill(7) if sid.isdigit() else sid
    path = os.path.join(root, "data", folder, f"{folder}_rest_tshift_RPI_voreg_mni.nii.gz")
    if sid in duplicates:
      if line == duplicates[sid][0]:
        skipped.append(Skipped(folder, path, f"{table} lines "
                               f"{', '.join(map(str, duplicates[sid]))} all give Subject {sid}: "
                               "not prepared until one row is left"))
      continue
    label, note = _label(row.get("adhd"), values, f"adhd on line {line}")
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


def _one_space_per_run(paths: list[str], space: str, skipped: list[Skipped]) -> list[str]:
  """The file of each run in template `space` ('' when each run has one file).

  Files of other spaces are reported as ignored; a run without a file in
  `space` is skipped; several candidates and no `space` stop the run, naming
  the files, since which template is used must not depend on sort order.
  """
  runs: dict[str, list[str]] = {}
  for path in paths:  # the same run in another space or resolution
    runs.setdefault(re.sub(r"_(space|res|desc)-[^_]+", "", os.path.basename(path)), []).append(path)
  chosen, ambiguous = [], []
  for run, candidates in runs.items():
    subject = run.split("_")[0]
    if space:
      matching = [p for p in candidates if f"_space-{space}_" in os.path.basename(p)]
      for p in candidates:
        if p not in matching:
          skipped.append(Skipped(subject, p, f"not used: another space than config.space="
                                 f"{space}", "ignored"))
      if not matching:
        skipped.append(Skipped(subject, candidates[0], f"no space-{space} file for this run "
                               f"(found {', '.join(os.path.basename(p) for p in candidates)})"))
      candidates = matching
    if len(candidates) > 1:
      ambiguous.append(candidates)
    elif candidates:
      chosen.append(candidates[0])
  if ambiguous:
    names = "; ".join(", ".join(candidates) for candidates in ambiguous[:3])
    more = f" (and {len(ambiguous) - 3} more runs)" if len(ambiguous) > 3 else ""
    raise errors.InputError(
        f"{len(ambiguous)} fMRIPrep runs have several candidate files: {names}{more}; set "
        "--config.space to the template to use (e.g. MNI152NLin2009cAsym, or "
        "MNI152NLin2009cAsym_res-2 when resolutions differ too)")
  return chosen


def _find_fmriprep(config) -> tuple[list[ScanEntry], list[Skipped]]:
  root, values = config.input_dir, parse_label_values(config.label_values)
  pattern = "*task-rest*space-MNI152*desc-preproc_bold.nii.gz"
  paths = sorted(glob.glob(os.path.join(root, "sub-*", "func", pattern)) +
                 glob.glob(os.path.join(root, "sub-*", "ses-*", "func", pattern)))
  table = os.path.join(root, "participants.tsv")
  participants, problems, table_problem = {}, {}, ""
  if os.path.exists(table):
    try:
      read = tables.read_table(table, expected=("participant_id",), default="\t")
      read.require("participant_id")
    except tables.TableError as e:
      table_problem = f"{e}: its scans are not prepared"
    else:
      pid = lambda r: r.get("participant_id", "").removeprefix("sub-")
      for sid, lines in read.duplicates(pid).items():
        problems[sid] = (f"{table} lines {', '.join(map(str, lines))} all give participant "
                         f"sub-{sid}: not prepared until one row is left")
      participants = {pid(r): r for _, r in read.rows}
  entries, skipped = [], []
  for path in _one_space_per_run(paths, config.get("space", ""), skipped):
    name = os.path.basename(path)
    subject = name.split("_")[0]
    row = participants.get(subject.removeprefix("sub-"))
    problem = table_problem or problems.get(subject.removeprefix("sub-"))
    if problem:
      skipped.append(Skipped(subject, path, problem))
      continue
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
  read = tables.read_table(manifest, expected=("path", "subject", "site", "label"))
  if not read.rows or not {"path", "subject", "site", "label"} <= set(read.columns):
    have = ", ".join(read.columns) if read.rows else "no rows"
    raise errors.InputError(f"manifest {manifest} needs columns path, subject, site, label "
                            f"(and optional tr); it has {have}")
  base = os.path.dirname(os.path.abspath(manifest))
  entries, skipped, first_line = [], [], {}
  for line, row in read.rows:
    path = row["path"] if os.path.isabs(row["path"]) else os.path.join(base, row["path"])
    label, note = _label(row["label"], values, f"label on line {line}")
    try:
      tr = float(row["tr"]) if row.get("tr") else None
    except ValueError as e:
      raise errors.InputError(f"manifest {manifest} line {line}: tr {row['tr']!r} is not a "
                              "number") from e
    same = os.path.normpath(path)
    if same in first_line:  # trained on twice otherwise
      skipped.append(Skipped(row["subject"], path, f"the same file as line {first_line[same]} "
                             f"of {manifest} (line {line}): prepared once"))
      continue
    first_line[same] = line
    entries.append(ScanEntry(safe_name(row["subject"]), row["subject"], row["site"] or "unknown",
                             label, path, tr, note))
  return entries, skipped


def unique_scan_keys(entries: list[ScanEntry]) -> list[ScanEntry]:
  """Entries with unique scan keys, compared case-insensitively (shard file names).

  A key taken by an earlier entry gets the first free _2, _3, ...; a suffix is
  never one another entry has as its own key.
  """
  taken = {e.scan.lower() for e in entries}
  used, out = set(), []
  for entry in entries:
    key = entry.scan
    if key.lower() in used:
      n = 2
      while f"{entry.scan}_{n}".lower() in used | taken:
        n += 1
      key = f"{entry.scan}_{n}"
      note = f"scan key {key}: {entry.scan} is another scan's"
      entry = dataclasses.replace(entry, scan=key, note="; ".join(filter(None, [entry.note,
                                                                                note])))
    used.add(key.lower())
    out.append(entry)
  return out


def find_scans(config) -> tuple[list[ScanEntry], list[Skipped]]:
  """The scans of `config.source` under `config.input_dir` (or `config.manifest`)."""
  finders = {"adhd200": _find_adhd200, "nilearn_adhd": _find_nilearn_adhd,
             "fmriprep": _find_fmriprep, "manifest": _find_manifest}
  validation.refuse("source", config.source)
  if config.source != "manifest" and not os.path.isdir(config.input_dir or ""):
    raise errors.InputError(f"config.input_dir {config.input_dir!r} is not a folder "
                            f"(source {config.source} reads a folder)")
  entries, skipped = finders[config.source](config)
  entries = unique_scan_keys(entries)
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
