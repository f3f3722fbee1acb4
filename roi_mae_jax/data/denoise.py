"""Denoising a scan's brain voxels: confound regression, detrending, band-pass.

    rules = DenoiseRules.from_config(config.denoise)
    plan = plan_for(entry.path, rules)             # what this file gets, and why
    confounds = load_confounds(entry.path, plan, frames=scan.frames)  # ScanRejected
    cleaned = clean(values, rows, scan.tr, plan, confounds)          # (N, T') float32

Which files get what (`denoise.apply = 'auto'`, decided by file name):

| file                                            | confounds                                | filter |
|-------------------------------------------------|------------------------------------------|--------|
| fMRIPrep `*desc-preproc_bold.nii*`              | load_confounds_strategy(denoise.strategy) | yes   |
| nilearn ADHD `*_rest_tshift_RPI_voreg_mni.nii*` | `<ID>_regressors.csv` beside it          | yes    |
| Athena `sfnwmrda*`                              | none: already regressed and band-passed  | no     |
| Athena `snwmrda*`                               | none: already nuisance-regressed         | yes    |
| anything else (a manifest)                      | none                                     | no     |

'filter' is detrending (`denoise.detrend`) and the band `denoise.high_pass` -
`denoise.low_pass` Hz (0: that side open). `apply = 'on'` filters the files
marked no as well (still without confounds); `'off'` leaves every file as it is.
All of it is one `nilearn.signal.clean` call (confounds regressed orthogonally
to the filter, as nilearn does) at the scan's own TR, before the resampling
to the common TR; it runs on the brain voxels only, a block of voxels at a
time. Frames that fMRIPrep marks as non-steady-state at the start of a run
are dropped; a strategy that censors frames inside the run (scrubbing) would
leave unevenly spaced frames, so such a scan is skipped with the reason.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re

import numpy as np

from roi_mae_jax.data import nifti

APPLY = ("auto", "on", "off")
# nilearn's presets that read the desc-preproc_bold file ('ica_aroma' reads
# fMRIPrep's desc-smoothAROMAnonaggr_bold instead).
STRATEGIES = ("simple", "scrubbing", "compcor")
VOXEL_BLOCK = 16384  # voxels per nilearn call: float64 copies of (T, block) only

FMRIPREP_SUFFIX = re.compile(r"desc-preproc_bold\.nii(\.gz)?$")
NILEARN_ADHD_SUFFIX = re.compile(r"_rest_tshift_RPI_voreg_mni\.nii(\.gz)?$")


@dataclasses.dataclass(frozen=True)
class DenoiseRules:
  """`config.denoise` of a prepare run."""

  apply: str = "auto"
  strategy: str = "simple"
  detrend: bool = True
  high_pass: float = 0.01   # Hz; 0: no high-pass
  low_pass: float = 0.1     # Hz; 0: no low-pass

  @classmethod
  def from_config(cls, block) -> "DenoiseRules":
    return cls(apply=str(block.apply), strategy=str(block.strategy),
               detrend=bool(block.detrend), high_pass=float(block.high_pass or 0),
               low_pass=float(block.low_pass or 0))


@dataclasses.dataclass(frozen=True)
class Plan:
  """What one file gets: `confounds` ('' | 'fmriprep' | 'nilearn_adhd'), `filter`."""

  confounds: str
  filter: bool
  why: str              # for the index and report when nothing or less is done
  rules: DenoiseRules

  @property
  def active(self) -> bool:
    return bool(self.confounds) or self.filter


def plan_for(path: str, rules: DenoiseRules) -> Plan:
  """The denoising `path` gets under `rules` (see the module docstring)."""
  name = os.path.basename(path)
  if rules.apply == "off":
    return Plan("", False, "off (denoise.apply='off')", rules)
  force = rules.apply == "on"
  if FMRIPREP_SUFFIX.search(name):
    return Plan("fmriprep", True, "", rules)
  if NILEARN_ADHD_SUFFIX.search(name):
    return Plan("nilearn_adhd", True, "", rules)
  if name.startswith("sfnwmrda"):
    why = "Athena sfnwmrda: already nuisance-regressed and band-passed"
    return Plan("", True, why + ", filtered again (denoise.apply='on')", rules) if force \
        else Plan("", False, why, rules)
  if name.startswith("snwmrda"):
    return Plan("", True, "Athena snwmrda: already nuisance-regressed", rules)
  if force:
    return Plan("", True, "no confounds file known for this file name", rules)
  return Plan("", False, "not an fMRIPrep, nilearn ADHD or Athena file name (denoise.apply="
              "'on' filters it)", rules)


@dataclasses.dataclass(frozen=True)
class Confounds:
  """Regressors of one run: (T, K) values, their source, leading frames to drop."""

  values: np.ndarray | None
  source: str           # file read
  drop_leading: int = 0


def nilearn_regressors_path(path: str) -> str:
  """`data/<ID>/<ID>_regressors.csv` beside nilearn's ADHD func file."""
  return NILEARN_ADHD_SUFFIX.sub("_regressors.csv", path)


def read_regressors(path: str) -> np.ndarray:
  """A numeric table (nilearn's ADHD `_regressors.csv`: tab-separated, one header line)."""
  try:
    with open(path, encoding="utf-8") as f:
      lines = [line for line in f.read().splitlines() if line.strip()]
  except (OSError, UnicodeDecodeError) as e:
    raise nifti.ScanRejected(f"confounds file {path} is unreadable ({e})") from None
  if not lines:
    raise nifti.ScanRejected(f"confounds file {path} is empty")
  delimiter = next((d for d in ("\t", ",", ";") if d in lines[0]), None)

  def fields(line):
    return [v.strip().strip('"') for v in line.split(delimiter)]

  def numbers(line):
    return [float(v) for v in fields(line)]

  try:
    numbers(lines[0])
    start = 0
  except ValueError:
    start = 1  # a header line
  rows = []
  for number, line in enumerate(lines[start:], start + 1):
    try:
      rows.append(numbers(line))
    except ValueError:
      raise nifti.ScanRejected(f"confounds file {path} line {number} is not numbers: "
                               f"{line[:80]!r}") from None
  if not rows or len({len(r) for r in rows}) != 1:
    raise nifti.ScanRejected(f"confounds file {path} has no rows or rows of different lengths")
  return np.asarray(rows, dtype=np.float64)


def fmriprep_confounds_path(path: str) -> str:
  """The confounds table fMRIPrep writes beside a `desc-preproc_bold` file (the
  run's entities without space/res/desc; `_regressors.tsv` before fMRIPrep 20.2)."""
  run = re.sub(r"_(space|res|desc)-[^_]+", "", os.path.basename(path))
  stem = os.path.join(os.path.dirname(path), re.sub(r"_bold\.nii(\.gz)?$", "", run))
  candidates = [f"{stem}_desc-confounds_{kind}.tsv" for kind in ("timeseries", "regressors")]
  return next((c for c in candidates if os.path.exists(c)), candidates[0])


def _fmriprep_confounds(path: str, strategy: str) -> Confounds:
  from nilearn.interfaces import fmriprep  # pylint: disable=g-import-not-at-top
  try:
    table, sample_mask = fmriprep.load_confounds_strategy(path, denoise_strategy=strategy)
  except Exception as e:  # nilearn raises ValueError and its own MissingConfound
    first = (str(e).splitlines() or [type(e).__name__])[0]
    if "Could not find associated confound file" in str(e):
      raise nifti.ScanRejected(
          f"denoising is on but the fMRIPrep confounds file is missing (expected "
          f"{fmriprep_confounds_path(path)} and its .json; set denoise.apply='off' to "
          "prepare without)") from None
    raise nifti.ScanRejected(f"fMRIPrep confounds ({strategy}) unreadable: "
                             f"{type(e).__name__}: {first}") from None
  values = np.asarray(table, dtype=np.float64)
  drop = 0
  if sample_mask is not None:
    kept = np.asarray(sample_mask)
    frames = len(values)
    mask = np.zeros(frames, bool)
    mask[kept] = True
    drop = int(np.argmax(mask)) if mask.any() else frames
    if not mask[drop:].all():
      censored = int((~mask[drop:]).sum())
      raise nifti.ScanRejected(
          f"denoise.strategy '{strategy}' censors {censored} frames inside the run; windows "
          "need evenly spaced frames: use a strategy without scrubbing (e.g. 'simple')")
  return Confounds(values, fmriprep_confounds_path(path), drop)


def load_confounds(path: str, plan: Plan, frames: int) -> Confounds:
  """The regressors `plan` asks for (None when it asks for none); `ScanRejected` when the
  file is missing, unreadable or does not have one row per frame."""
  if plan.confounds == "fmriprep":
    found = _fmriprep_confounds(path, plan.rules.strategy)
  elif plan.confounds == "nilearn_adhd":
    table = nilearn_regressors_path(path)
    if not os.path.exists(table):
      raise nifti.ScanRejected(f"denoising is on but the confounds file {table} is missing "
                               "(set denoise.apply='off' to prepare without)")
    found = Confounds(read_regressors(table), table)
  else:
    return Confounds(None, "")
  if len(found.values) != frames:
    raise nifti.ScanRejected(f"confounds in {found.source} have {len(found.values)} rows for "
                             f"{frames} frames")
  if not np.all(np.isfinite(found.values[found.drop_leading:])):
    raise nifti.ScanRejected(f"confounds in {found.source} hold NaN/inf values")
  return found


def band(plan: Plan, tr: float) -> tuple[float | None, float | None]:
  """(high_pass, low_pass) Hz that apply at `tr`; a low-pass at or over Nyquist is none."""
  if not plan.filter:
    return None, None
  high = plan.rules.high_pass or None
  low = plan.rules.low_pass or None
  if low is not None and low >= 0.5 / tr:
    low = None
  return high, low


@functools.cache
def _no_standardize():
  """nilearn's 'do not standardize': None from 0.14 (False warns), False before (None fails)."""
  from nilearn import signal  # pylint: disable=g-import-not-at-top
  try:
    signal.clean(np.arange(6.0).reshape(3, 2), detrend=False, standardize=None, filter=False)
  except ValueError:
    return False
  return None


def clean(values: np.ndarray, rows: np.ndarray, tr: float, plan: Plan,
          confounds: Confounds) -> np.ndarray:
  """(N, T) voxel time series -> (N, T - dropped frames) float32: `rows` cleaned per
  `plan`, every other voxel 0 (voxels without data)."""
  from nilearn import signal  # pylint: disable=g-import-not-at-top
  drop = confounds.drop_leading
  regressors = None if confounds.values is None else confounds.values[drop:]
  high, low = band(plan, tr)
  out = np.zeros((values.shape[0], values.shape[1] - drop), np.float32)
  for start in range(0, len(rows), VOXEL_BLOCK):
    block = rows[start:start + VOXEL_BLOCK]
    out[block] = signal.clean(
        values[block, drop:].T, detrend=plan.filter and plan.rules.detrend,
        standardize=_no_standardize(), confounds=regressors,
        filter="butterworth" if (high or low) else False, high_pass=high, low_pass=low,
        t_r=tr, butterworth__copy=True).T  # copy: one vectorised filter, not one per voxel
  return out


def describe(plan: Plan, tr: float, confounds: Confounds) -> dict:
  """The index columns saying what was applied to one scan."""
  high, low = band(plan, tr)
  what = []
  if plan.confounds:
    count = 0 if confounds.values is None else confounds.values.shape[1]
    what.append(f"{count} confounds ({plan.confounds}"
                f"{':' + plan.rules.strategy if plan.confounds == 'fmriprep' else ''})")
  if plan.filter and plan.rules.detrend:
    what.append("detrend")
  if high or low:
    what.append(f"band {high or 0:g}-{low or 'Nyquist'} Hz")
  if confounds.drop_leading:
    what.append(f"first {confounds.drop_leading} frames dropped (non-steady state)")
  text = ", ".join(what) or "none"
  if plan.why:
    text += f" ({plan.why})"
  return {"denoise": text,
          "confounds": plan.confounds + (f":{plan.rules.strategy}"
                                         if plan.confounds == "fmriprep" else ""),
          "confound_count": 0 if confounds.values is None else int(confounds.values.shape[1]),
          "detrend": bool(plan.filter and plan.rules.detrend),
          "high_pass_hz": high or "", "low_pass_hz": low or "",
          "dropped_frames": confounds.drop_leading}
