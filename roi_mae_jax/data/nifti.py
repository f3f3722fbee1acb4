"""Opening and checking one 4D fMRI NIfTI file before it is prepared.

    scan = open_scan(path, rules, brain_world_mm, tr=None)   # raises ScanRejected
    for start, frames in scan.frame_chunks(16):               # (X, Y, Z, n) float32
      ...

Rules (each failure is one reason; the header checks are all reported together):
  - the file exists and is a readable NIfTI (a corrupt or truncated gzip is
    found when the data are read, and reported the same way);
  - the image is 4D with at least `min_frames` frames once resampled to the
    common TR;
  - TR: a per-scan value (manifest `tr`, BIDS sidecar) wins; otherwise the
    header's pixdim[4] in its time unit (a value over 100 in 'sec' or
    unknown units is read as milliseconds); otherwise `config.default_tr`;
    it must lie in 0.2-10 s;
  - the sform or qform code gives the affine a space (both 0: skipped; only
    scanner or Talairach codes: a warning, see data/registration.py);
  - the affine is finite and not singular (each named as such), and plausibly
    MNI: voxel sizes 0.5-10 mm, axes within
    `max_oblique_degrees` of the cardinal axes (images in MNI space are not
    oblique; native EPI usually is) and a field of view that covers at least
    `min_coverage` of the atlas brain on the target grid;
  - values: a voxel that is NaN or inf in any frame is treated as missing
    for the whole run (set to 0 and left out of the normalisation); when
    such voxels exceed `max_nonfinite_fraction` of the brain the scan is
    rejected, and so is a scan with a frame that is non-finite everywhere;
  - signal: a scan whose brain voxels all hold one value, or whose signal
    does not change over time in most of the brain, is rejected (it would
    normalise to nothing or to noise).
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import zlib
from typing import Iterator

import nibabel as nib
import numpy as np

from roi_mae_jax import errors
from roi_mae_jax.data import registration

TR_RANGE_S = (0.2, 10.0)
VOXEL_RANGE_MM = (0.5, 10.0)


class ScanRejected(errors.InputError):
  """A scan that cannot be used; the message is the reason."""


@dataclasses.dataclass(frozen=True)
class ScanRules:
  """The checks of the module docstring, from a prepare config."""

  target_tr: float
  min_frames: int                  # at the target TR
  default_tr: float = 0.0          # 0: none
  max_oblique_degrees: float = 1.0
  min_coverage: float = 0.9
  max_nonfinite_fraction: float = 0.01
  min_signal_fraction: float = 0.5

  @classmethod
  def from_config(cls, config) -> "ScanRules":
    return cls(target_tr=float(config.tr), min_frames=int(config.frames),
               default_tr=float(config.default_tr),
               max_oblique_degrees=float(config.max_oblique_degrees),
               min_coverage=float(config.min_coverage),
               max_nonfinite_fraction=float(config.max_nonfinite_fraction),
               min_signal_fraction=float(config.min_signal_fraction))


def frames_at_tr(frames: int, source_tr: float, target_tr: float) -> int:
  """Frames left after linear resampling of `frames` from `source_tr` to `target_tr`."""
  if abs(source_tr - target_tr) < 1e-6:
    return frames
  return int(np.floor((frames - 1) * source_tr / target_tr + 1e-9)) + 1


def header_tr(header) -> float | None:
  """TR in seconds from pixdim[4] and the time unit; None when absent."""
  value = float(header["pixdim"][4])
  if not np.isfinite(value) or value <= 0:
    return None
  unit = header.get_xyzt_units()[1]
  if unit == "msec":
    return value / 1000.0
  if unit == "usec":
    return value / 1e6
  if value > 100:  # 'sec' or 'unknown' with a millisecond value
    return value / 1000.0
  return value


def coverage(affine: np.ndarray, shape: tuple[int, ...], world_mm: np.ndarray) -> float:
  """Share of the points `world_mm` (N, 3) inside the image's field of view."""
  ijk = nib.affines.apply_affine(np.linalg.inv(affine), world_mm)
  inside = np.all((ijk >= -0.5) & (ijk <= np.asarray(shape[:3]) - 0.5), axis=1)
  return float(inside.mean()) if len(inside) else 0.0


def _read_error(path: str, error: Exception) -> ScanRejected:
  if isinstance(error, (EOFError, zlib.error, gzip.BadGzipFile)):
    return ScanRejected(f"corrupt or truncated gzip ({type(error).__name__}: {error})")
  return ScanRejected(f"unreadable data ({type(error).__name__}: {error})")


@dataclasses.dataclass
class Scan:
  """A checked, opened scan: header facts and a chunked frame reader."""

  path: str
  image: nib.Nifti1Image
  tr: float            # seconds
  tr_source: str       # where the TR came from
  frames: int          # in the file
  form_note: str = ""  # a caution about the sform/qform codes ('' when they claim MNI)

  @property
  def affine(self) -> np.ndarray:
    return self.image.affine

  @property
  def shape(self) -> tuple[int, int, int]:
    return tuple(int(s) for s in self.image.shape[:3])

  @property
  def zero_level(self) -> float:
    """Decoded values below this magnitude are background (0).

    Integers stored with scl_slope / scl_inter decode a background of 0 to
    the level nearest 0, e.g. -1e-7: within half a quantisation step of 0,
    so it is 0 to the precision of the file.
    """
    if not np.issubdtype(self.image.get_data_dtype(), np.integer):
      return 0.0
    slope = getattr(self.image.dataobj, "slope", 1.0)
    slope = float(slope) if slope is not None and np.isfinite(slope) and slope else 1.0
    return abs(slope) / 2

  def frame_chunks(self, chunk: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first frame, (X, Y, Z, n) float32) in order; only one chunk in memory.

    Float64 files and scaled integers are read in float64 and, when their
    magnitude is far from 1 (beyond float32's range: 1e300, 1e-300),
    multiplied by one power of two for the whole scan, taken from the first
    chunk: the normalisation is scale-free, so the shard is the same, and
    float32 neither overflows nor flushes them to 0. A later chunk beyond
    float32 after that scaling is non-finite (and so reported).
    """
    zero, scale = self.zero_level, None
    # float64 only where float32 may not hold the values: float64 files, scaled integers.
    wide = self.image.get_data_dtype().itemsize >= 8 or zero
    for start in range(0, self.frames, chunk):
      stop = min(start + chunk, self.frames)
      try:
        data = np.asarray(self.image.dataobj[..., start:stop],
                          dtype=np.float64 if wide else np.float32)
      except (EOFError, OSError, ValueError, zlib.error) as e:
        raise _read_error(self.path, e) from e
      if zero:
        data[np.abs(data) < zero] = 0.0
      if scale is None:
        scale = _power_of_two_scale(data)
      if scale != 1.0:
        data *= scale
      with np.errstate(over="ignore"):  # beyond float32 becomes inf: reported as non-finite
        yield start, data.astype(np.float32)


def _power_of_two_scale(data: np.ndarray) -> float:
  """1, or the power of two that brings the largest finite |value| near 1 when it lies
  outside 1e-20..1e20 (float32 holds 1e-38..3e38)."""
  finite = np.abs(data[np.isfinite(data)])
  peak = float(finite.max()) if finite.size else 0.0
  if peak == 0.0 or 1e-20 <= peak <= 1e20:
    return 1.0
  return float(2.0 ** -np.round(np.log2(peak)))


def _affine_problems(affine: np.ndarray, shape, rules: ScanRules,
                     brain_world_mm: np.ndarray) -> list[str]:
  """Why the affine does not place the image in MNI space ([] when it does)."""
  if not np.all(np.isfinite(affine)):
    return ["the affine (sform/qform) has NaN or inf entries: the image has no position in "
            "space"]
  sizes = nib.affines.voxel_sizes(affine)
  if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
    return [f"the affine is singular (voxel sizes {np.round(sizes, 2).tolist()} mm): the "
            "image has no position in space"]
  if not np.all((sizes >= VOXEL_RANGE_MM[0]) & (sizes <= VOXEL_RANGE_MM[1])):
    return [f"voxel sizes {np.round(sizes, 2).tolist()} mm are not those of an MNI-space "
            "image"]
  reasons = []
  oblique = float(np.degrees(np.max(nib.affines.obliquity(affine))))
  if oblique > rules.max_oblique_degrees:
    reasons.append(f"oblique affine ({oblique:.1f} deg off the axes): not resampled to "
                   "MNI space")
  covered = coverage(affine, shape, brain_world_mm)
  if covered < rules.min_coverage:
    reasons.append(f"field of view covers {100 * covered:.0f}% of the MNI brain (needs "
                   f"{100 * rules.min_coverage:.0f}%): not in MNI space")
  return reasons


def open_scan(path: str, rules: ScanRules, brain_world_mm: np.ndarray,
              tr: float | None = None) -> Scan:
  """Opens `path` and checks its header; raises `ScanRejected` with every reason."""
  if not os.path.exists(path):
    raise ScanRejected("missing file")
  try:
    # keep_file_open: frame chunks are read in order from one gzip stream.
    image = nib.load(path, keep_file_open=True)
  except Exception as e:  # nibabel raises many types for a bad file
    if isinstance(e, (EOFError, zlib.error, gzip.BadGzipFile)):
      raise _read_error(path, e) from e
    raise ScanRejected(f"not a readable NIfTI image ({type(e).__name__}: {e})") from e
  if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
    raise ScanRejected(f"not a NIfTI image ({type(image).__name__})")
  reasons = []
  shape = image.shape
  if len(shape) == 3 or (len(shape) == 4 and shape[3] == 1):
    raise ScanRejected(f"a single 3D volume (shape {'x'.join(map(str, shape))}): a 4D run "
                       "is needed")
  if len(shape) != 4:
    raise ScanRejected(f"{len(shape)}D image (shape {shape}): a 4D run is needed")

  if tr is not None and tr > 0:
    scan_tr, tr_source = float(tr), "given"
  else:
    scan_tr, tr_source = header_tr(image.header), "header"
    if scan_tr is not None and not TR_RANGE_S[0] <= scan_tr <= TR_RANGE_S[1]:
      if not rules.default_tr:
        reasons.append(f"implausible TR {scan_tr:g} s in the header (pixdim[4]); give the TR "
                       "in a manifest or config.default_tr")
      scan_tr = None
    if scan_tr is None and rules.default_tr:
      scan_tr, tr_source = rules.default_tr, "config.default_tr"
    elif scan_tr is None and not reasons:
      reasons.append("no TR in the header (pixdim[4] is 0); give it in a manifest or "
                     "config.default_tr")
  if scan_tr is not None and not TR_RANGE_S[0] <= scan_tr <= TR_RANGE_S[1]:
    reasons.append(f"TR {scan_tr:g} s is outside {TR_RANGE_S[0]}-{TR_RANGE_S[1]} s")
    scan_tr = None

  frames = int(shape[3])
  if scan_tr is not None:
    usable = frames_at_tr(frames, scan_tr, rules.target_tr)
    if usable < rules.min_frames:
      resampled = "" if usable == frames else \
          f" at TR {scan_tr:g} s give {usable} at TR {rules.target_tr:g} s"
      reasons.append(f"too few frames: {frames}{resampled}; windows need {rules.min_frames}")
  elif frames < rules.min_frames:
    reasons.append(f"too few frames: {frames}; windows need {rules.min_frames}")

  codes = registration.form_code_problem(image.header)
  reasons += [codes] if codes else _affine_problems(image.affine, shape, rules, brain_world_mm)
  if reasons:
    raise ScanRejected("; ".join(reasons))
  return Scan(path, image, scan_tr, tr_source, frames, registration.form_code_note(image.header))
