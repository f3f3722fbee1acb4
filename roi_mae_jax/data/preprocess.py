"""Preparing one scan: check, resample onto the target grid, denoise, resample to the
common TR, normalise, write.

    job = ScanJob.create(on_grid, rules, normalise="global")
    row = prepare_scan(entry, job, workdir)     # raises nifti.ScanRejected with the reason

Only the atlas brain (the envelope of AAL3 on the target grid) is resampled
and kept; the rest of the crop box is 0. Denoising (`data/denoise.py`) runs
on those brain voxels at the scan's TR: it is linear and the same for every
voxel, so it gives what denoising the whole image and then resampling would.
Memory is one chunk of source frames plus the resampled run of this scan
(about 3 x brain voxels x frames x 4 bytes), never more than one scan per
worker.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from roi_mae_jax.brain import atlas as atlas_lib
from roi_mae_jax.brain import patches as patches_lib
from roi_mae_jax.data import denoise
from roi_mae_jax.data import layouts
from roi_mae_jax.data import nifti
from roi_mae_jax.data import registration
from roi_mae_jax.data import resample
from roi_mae_jax.data import shards

CHUNK_FRAMES = 16


@dataclasses.dataclass(frozen=True)
class ScanJob:
  """What every scan of one prepare run shares (sent once to each worker)."""

  rules: nifti.ScanRules
  info: shards.DatasetInfo
  brain_world_mm: np.ndarray   # (N, 3) world coordinates of the brain voxels
  brain_in_crop: tuple         # 3 x (N,) voxel indices inside the crop box
  denoising: denoise.DenoiseRules = denoise.DenoiseRules()
  template: np.ndarray | None = None    # (X, Y, Z) template brain on the grid; None: no check
  registration: registration.RegistrationRules = registration.RegistrationRules()

  @classmethod
  def create(cls, on_grid: atlas_lib.Atlas, rules: nifti.ScanRules, normalise: str,
             denoise_rules: denoise.DenoiseRules = denoise.DenoiseRules(),
             registration_rules: registration.RegistrationRules | None = None) -> "ScanJob":
    """`registration_rules` None: the overlap with the template is not checked."""
    brain = patches_lib.brain_envelope(on_grid.labels, min(on_grid.grid.voxel_size_mm))
    voxels = np.argwhere(brain)
    start, stop = voxels.min(0), voxels.max(0) + 1
    grid = on_grid.grid
    info = shards.DatasetInfo(
        grid_shape=grid.shape, affine=tuple(float(v) for v in grid.affine.ravel()),
        crop_start=tuple(int(s) for s in start), crop_shape=tuple(int(s) for s in stop - start),
        tr=rules.target_tr, normalise=normalise,
        atlas_sha1=hashlib.sha1(np.ascontiguousarray(on_grid.labels, np.int32)).hexdigest())
    template = None if registration_rules is None else \
        registration.template_brain(grid.shape, grid.affine, brain)
    return cls(rules, info, grid.world_coords(voxels), tuple((voxels - start).T),
               denoise_rules, template, registration_rules or registration.RegistrationRules())

  @property
  def num_brain_voxels(self) -> int:
    return len(self.brain_world_mm)


def _frame_list(frames: list[int]) -> str:
  shown = ", ".join(map(str, frames[:5]))
  return shown + (f" and {len(frames) - 5} more" if len(frames) > 5 else "")


def check_registration(scan: nifti.Scan, job: ScanJob,
                       abs_sum: np.ndarray) -> registration.Fit | None:
  """The scan's brain against the template (None when the job does not check);
  raises `ScanRejected` with the figures when it is not in template space."""
  if job.template is None:
    return None
  fit = registration.measure(abs_sum / scan.frames, scan.affine, job.template,
                             job.info.grid.affine, job.registration)
  problem, _ = registration.verdict(fit, job.registration)
  if problem:
    raise nifti.ScanRejected(problem)
  return fit


def resampled_run(scan: nifti.Scan, job: ScanJob
                  ) -> tuple[np.ndarray, np.ndarray, float, registration.Fit | None]:
  """(N, frames) values at the brain voxels, (N,) voxels with data, NaN share, and how
  the scan's brain fits the template.

  Raises `ScanRejected` for too many non-finite voxels, an all-NaN frame, a
  scan out of template space, constant values or a signal that does not
  change over time.
  """
  sampler = resample.TrilinearSampler(scan.affine, scan.shape, job.brain_world_mm)
  values = np.empty((job.num_brain_voxels, scan.frames), np.float32)
  nonfinite = np.zeros(scan.shape, bool)
  abs_sum = np.zeros(scan.shape, np.float64)  # the scan's own brain, for the registration check
  dead_frames = []
  for start, chunk in scan.frame_chunks(CHUNK_FRAMES):
    finite = np.isfinite(chunk)
    if not finite.all():
      nonfinite |= ~finite.all(axis=-1)
      per_frame = finite.reshape(-1, chunk.shape[-1]).any(axis=0)
      dead_frames += [start + t for t in np.flatnonzero(~per_frame)]
      chunk = np.where(finite, chunk, 0.0)
    abs_sum += np.abs(chunk).sum(axis=-1, dtype=np.float64)
    values[:, start:start + chunk.shape[-1]] = sampler(chunk)
  if dead_frames:
    which = "frame" if len(dead_frames) == 1 else "frames"
    verb = "is" if len(dead_frames) == 1 else "are"
    raise nifti.ScanRejected(f"{which} {_frame_list(dead_frames)} {verb} NaN/inf in every voxel")
  bad = sampler.touches(nonfinite) if nonfinite.any() else np.zeros(len(values), bool)
  bad_share = float(bad.mean())
  if bad_share > job.rules.max_nonfinite_fraction:
    raise nifti.ScanRejected(
        f"NaN/inf values in {100 * bad_share:.1f}% of the brain voxels (at most "
        f"{100 * job.rules.max_nonfinite_fraction:g}% are tolerated and zeroed)")
  fit = check_registration(scan, job, abs_sum)
  inside = values[sampler.covered & ~bad]
  if inside.size and inside.min() == inside.max():
    raise nifti.ScanRejected(f"constant values: every brain voxel is {float(inside[0, 0]):g} "
                             "in every frame (no signal)")
  with_data = sampler.covered & ~bad & np.any(values != 0, axis=1)
  share = float(with_data.mean())
  if share < job.rules.min_signal_fraction:
    raise nifti.ScanRejected(
        f"only {100 * share:.0f}% of the atlas brain has data in this scan (needs "
        f"{100 * job.rules.min_signal_fraction:.0f}%): empty or not in MNI space")
  moving = float((np.ptp(values[with_data], axis=1) > 0).mean())
  if moving < job.rules.min_signal_fraction:
    raise nifti.ScanRejected(
        f"the signal changes over time in only {100 * moving:.0f}% of the brain voxels with "
        f"data (needs {100 * job.rules.min_signal_fraction:.0f}%): the frames repeat one volume")
  return values, with_data, bad_share, fit


def _registration_columns(scan: nifti.Scan, fit: registration.Fit | None, job: ScanJob) -> dict:
  """index.csv columns: form codes, overlap figures, and a warning when near a threshold."""
  warnings = [scan.form_note] if scan.form_note else []
  if fit is not None:
    warnings.append(registration.verdict(fit, job.registration)[1])
  return {"sform_code": int(scan.image.header["sform_code"]),
          "qform_code": int(scan.image.header["qform_code"]),
          "brain_inside_template": fit.inside if fit else "",
          "brain_dice": fit.dice if fit else "",
          "warning": "; ".join(w for w in warnings if w)}


def prepare_scan(entry: layouts.ScanEntry, job: ScanJob, workdir: str) -> dict:
  """Writes the shard of `entry`; returns its index row."""
  scan = nifti.open_scan(entry.path, job.rules, job.brain_world_mm, entry.tr)
  plan = denoise.plan_for(entry.path, job.denoising)
  # Confounds first: a missing table fails the scan before the costly read.
  confounds = denoise.load_confounds(entry.path, plan, scan.frames)
  values, with_data, bad_share, fit = resampled_run(scan, job)
  if plan.active:
    values = denoise.clean(values, np.flatnonzero(with_data), scan.tr, plan, confounds)
    usable = nifti.frames_at_tr(values.shape[1], scan.tr, job.info.tr)
    if usable < job.rules.min_frames:
      raise nifti.ScanRejected(f"too few frames after dropping {confounds.drop_leading} "
                               f"non-steady-state frames: {usable} at TR {job.info.tr:g} s; "
                               f"windows need {job.rules.min_frames}")
  run = resample.resample_time(values, scan.tr, job.info.tr)
  del values
  z = resample.normalise(run, with_data, job.info.normalise)
  del run

  def frames():
    box = np.zeros(job.info.crop_shape, np.float16)
    for t in range(z.shape[1]):
      box[job.brain_in_crop] = z[:, t]
      yield box

  row = {"scan": entry.scan, "subject": entry.subject, "site": entry.site, "label": entry.label,
         "tr": job.info.tr, "source_frames": scan.frames, "source_tr": round(scan.tr, 6),
         "tr_source": scan.tr_source, "brain_with_data": round(float(with_data.mean()), 4),
         "nonfinite_voxels": round(bad_share, 6), "path": entry.path,
         **_registration_columns(scan, fit, job),
         **denoise.describe(plan, scan.tr, confounds)}
  return shards.write_shard(workdir, entry.scan, frames(), row, dtype=job.info.dtype)
