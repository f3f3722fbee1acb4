r"""Task `prepare`: NIfTI datasets -> ArrayRecord shards that pretraining reads.

    python -m roi_mae_jax.main --config=configs/prepare.py --workdir=runs/prepared \
        --config.source=adhd200 --config.input_dir=/data/ADHD200_Athena
    python -m roi_mae_jax.main --config=configs/pretrain_aal3.py --workdir=runs/adhd \
        --config.data.shards=runs/prepared

Writes to WORKDIR: shards/ (one ArrayRecord file per scan, one float16 frame
per record), index.csv (one row per prepared scan), prepare_report.csv (every
scan file found: used | skipped | ignored, and the reason), dataset.json, atlas_labels.nii.gz
and brain_mask.nii.gz (the atlas on the target grid; MNI sform/qform, mm),
atlas_labels.tsv (its label table: index, name, hemisphere, system), patch_map.csv (which
AAL3 region each brain patch belongs to), prepared_example.png (the first
scan with the atlas over it), prepare_summary.json, config.json.

Scans that are not denoised yet are denoised (`config.denoise`, see
roi_mae_jax/data/denoise.py): fMRIPrep confounds through nilearn's
load_confounds_strategy, nilearn ADHD regressors, detrending and band-pass
through nilearn.signal.clean; the Athena sfnwmrda files are left as they
are. index.csv and the report say per scan what was applied.

Bad scans are reported and skipped; the run fails (exit status 2) only when
no scan is usable. Re-running the same command resumes: finished scans are
kept, unfinished ones redone. Different settings in the same WORKDIR are
refused unless `--config.overwrite=True`, which deletes the earlier prepare
output (only the files listed above; a workdir holding another task's run is
refused before anything is touched). A full disk stops the run (status 1)
with the finished scans kept. SIGTERM or Ctrl-C stops the workers at once
(their scans in flight are dropped, and redone on resume), writes index.csv
and the report for the scans finished (the others are `pending`), and raises
`errors.Stopped` (status 143 / 130); re-running the same command resumes.
Worker processes exit when this process is gone, even by SIGKILL.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import multiprocessing
import os
import shutil
import signal
import time

import ml_collections
import numpy as np
from absl import logging

from roi_mae_jax import errors
from roi_mae_jax import metrics
from roi_mae_jax import outputs
from roi_mae_jax import plots
from roi_mae_jax import preemption
from roi_mae_jax import process_guard
from roi_mae_jax.brain import atlas as atlas_lib
from roi_mae_jax.brain import maps
from roi_mae_jax.brain import patches as patches_lib
from roi_mae_jax.data import denoise
from roi_mae_jax.data import layouts
from roi_mae_jax.data import nifti
from roi_mae_jax.data import preprocess
from roi_mae_jax.data import registration
from roi_mae_jax.data import shards

REQUIRED_KEYS = ("source", "grid.voxel_size_mm", "patches.size", "frames", "tr", "normalise")
RESUMABLE_CHANGES = ("workers", "overwrite", "fault_kill_after_scans")
REPORT_FILE = "prepare_report.csv"
EXAMPLE_FIGURE = "prepared_example.png"
REPORT_COLUMNS = ("scan", "subject", "site", "label", "path", "status", "reason", "denoise")
OUTPUT_NAMES = (shards.SHARDS_DIR, shards.INDEX_FILE, shards.DATASET_FILE, REPORT_FILE,
                "atlas_labels.nii.gz", "atlas_labels.tsv", shards.BRAIN_MASK_FILE,
                "patch_map.csv", "prepare_summary.json", EXAMPLE_FIGURE, outputs.CONFIG_FILE)


def _clear(workdir: str) -> None:
  """overwrite=True: removes a previous prepare's output (and nothing else)."""
  for name in OUTPUT_NAMES:
    path = os.path.join(workdir, name)
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)


def _write_atlas_outputs(workdir: str, on_grid: atlas_lib.Atlas, patch_map, brain) -> None:
  affine = on_grid.grid.affine
  maps.save_mni(on_grid.labels.astype(np.int16), affine,
                      os.path.join(workdir, "atlas_labels.nii.gz"), "atlas labels")
  maps.write_label_table(os.path.join(workdir, "atlas_labels.tsv"), on_grid.regions)
  maps.save_mni(brain.astype(np.uint8), affine,
                      os.path.join(workdir, shards.BRAIN_MASK_FILE), "brain mask")
  rows = []
  origins = patch_map.patch_origin_voxels(patch_map.brain_patches)
  centres = on_grid.grid.world_coords(origins + (patch_map.patch_size - 1) / 2.0)
  for token, (patch, origin, centre) in enumerate(zip(patch_map.brain_patches, origins, centres)):
    r = int(patch_map.region[patch])
    region = patch_map.regions[r] if r >= 0 else None
    rows.append({"token": token, "patch": int(patch), "i": origin[0], "j": origin[1],
                 "k": origin[2], "x_mm": round(float(centre[0]), 1),
                 "y_mm": round(float(centre[1]), 1), "z_mm": round(float(centre[2]), 1),
                 "brain_fraction": round(float(patch_map.brain_fraction[patch]), 3),
                 "region_id": region.id if region else "", "region": region.name if region else "",
                 "hemisphere": region.hemisphere if region else "",
                 "system": region.system if region else ""})
  shards.write_table(os.path.join(workdir, "patch_map.csv"), list(rows[0]), rows)


# --- Running scans (in this process or in worker processes) -----------------

_WORKER: dict = {}


def _init_worker(job: preprocess.ScanJob, workdir: str) -> None:
  _WORKER.update(job=job, workdir=workdir)
  process_guard.worker_init()  # the parent handles Ctrl-C; no worker outlives it


def _attempt(entry: layouts.ScanEntry, job=None, workdir=None) -> tuple[str, object, float]:
  """('used', row, peak MiB) or ('skipped', reason, peak MiB); never raises for a bad scan."""
  job, workdir = job or _WORKER["job"], workdir or _WORKER["workdir"]
  try:
    status, payload = "used", preprocess.prepare_scan(entry, job, workdir)
  except nifti.ScanRejected as e:
    status, payload = "skipped", str(e)
  except MemoryError:
    status, payload = "skipped", "out of memory while preparing this scan"
  except Exception as e:  # pylint: disable=broad-except
    if errors.is_disk_full(e):
      raise  # not this scan's fault: every later scan would fail the same way
    # One odd file must not end a run over hundreds; the report names it.
    status, payload = "skipped", f"unexpected error ({type(e).__name__}: {e})"
  return status, payload, metrics.peak_rss_mib()


def _terminate(pool: concurrent.futures.ProcessPoolExecutor) -> None:
  """Ends the pool's workers now (their scans in flight are redone on resume)."""
  kill = getattr(pool, "terminate_workers", None)  # Python 3.14+
  if callable(kill):
    kill()
    return
  for process in list((getattr(pool, "_processes", None) or {}).values()):
    process.terminate()


def _results(todo, job, workdir: str, workers: int, stop: preemption.StopOnSignal):
  """Yields (entry, status, payload, peak MiB of the process that ran it) as scans finish,
  until `stop` is requested (a scan in this process finishes first; workers are ended, and
  scans they finished before that are still yielded)."""
  if workers <= 1:
    for entry in todo:
      if stop.requested:
        return
      yield (entry,) + _attempt(entry, job, workdir)
    return
  context = multiprocessing.get_context("spawn")  # no fork of a threaded parent
  pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=context,
                                                initializer=_init_worker,
                                                initargs=(job, workdir))
  futures = {pool.submit(_attempt, entry): entry for entry in todo}
  pending = set(futures)
  try:
    while pending and not stop.requested:
      # A short wait, not as_completed: a signal is seen within this time.
      done, pending = concurrent.futures.wait(
          pending, timeout=0.2, return_when=concurrent.futures.FIRST_COMPLETED)
      for future in done:
        yield (futures[future],) + future.result()
    if pending:  # stopped: end the workers, then report the scans that finished meanwhile
      _terminate(pool)
      pool.shutdown(wait=True, cancel_futures=True)
      finished = [f for f in pending if f.done() and not f.cancelled() and not f.exception()]
      pending = set()
      for future in finished:
        yield (futures[future],) + future.result()
  except concurrent.futures.process.BrokenProcessPool as e:
    raise errors.TrainingError(
        f"a prepare worker died (killed by the system, often for lack of memory) while "
        f"preparing into {workdir}; finished scans are kept: re-run the same command to "
        "resume, with fewer --config.workers") from e
  finally:  # stopped, failed or done: no worker is left running
    if pending:
      _terminate(pool)
    pool.shutdown(wait=True, cancel_futures=True)


def _disk_checked(results, workdir: str):
  """`results`, with a full disk turned into one message saying what is kept."""
  try:
    yield from results
  except Exception as e:  # pylint: disable=broad-except
    if not errors.is_disk_full(e):
      raise
    kept = len(shards.finished_rows(workdir))
    raise errors.TrainingError(
        f"no space left on device while writing shards into {workdir} ({e}); the {kept} "
        "finished scans are kept: free space and re-run the same command to resume") from None


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  if config.overwrite:
    _clear(workdir)
  outputs.write_config(workdir, config, may_differ=RESUMABLE_CHANGES,
                       hint=" (or pass --config.overwrite=True to replace it)")

  # --- Target grid, atlas, brain --------------------------------------------
  on_grid = atlas_lib.atlas_from_config(config, multiple_of=int(config.patches.size))
  patch_map = patches_lib.patch_map_from_config(config)
  job = preprocess.ScanJob.create(
      on_grid, nifti.ScanRules.from_config(config), config.normalise,
      denoise.DenoiseRules.from_config(config.denoise),
      registration.RegistrationRules.from_config(config.get("registration")))
  _check_earlier_dataset(workdir, job.info)
  outputs.write_json(os.path.join(workdir, shards.DATASET_FILE),
                     dict(job.info.to_json(), atlas=on_grid.source))
  brain = np.zeros(on_grid.grid.shape, bool)
  brain[tuple(np.asarray(i) + s for i, s in zip(job.brain_in_crop, job.info.crop_start))] = True
  _write_atlas_outputs(workdir, on_grid, patch_map, brain)
  logging.info("target grid %s, %d brain voxels stored in a %s box, TR %g s, %s normalisation",
               on_grid.grid.describe(), job.num_brain_voxels,
               "x".join(map(str, job.info.crop_shape)), config.tr, config.normalise)

  # --- Scans ----------------------------------------------------------------
  entries, skipped = layouts.find_scans(config)
  removed = shards.remove_unfinished(workdir)
  if removed:
    logging.info("removed %d unfinished shard files of an interrupted run", len(removed))
  finished, redone = _reusable(workdir, entries)
  todo = [e for e in entries if e.scan not in finished]
  logging.info("%d scans found (%d already prepared, %d to do), %d skipped while listing",
               len(entries), len(entries) - len(todo), len(todo), len(skipped))

  report = {}
  for e in entries:
    if e.scan in finished:
      reason = "; ".join(filter(None, ["prepared in an earlier run", e.note]))
      report[e.scan] = dict(_report_row(e), status="used", reason=reason,
                            denoise=finished[e.scan].get("denoise", ""))
  # Labels and sites come from the tables as they are now, not as they were.
  used = {e.scan: dict(finished[e.scan], subject=e.subject, site=e.site, label=e.label)
          for e in entries if e.scan in finished}
  start, counts, worker_peak = time.time(), {"used": 0, "skipped": 0}, 0.0
  with preemption.StopOnSignal() as stop:
    results = _results(todo, job, workdir, int(config.workers), stop)
    for done, (entry, status, payload, peak) in enumerate(_disk_checked(results, workdir),
                                                          start=1):
      counts[status] += 1
      worker_peak = max(worker_peak, peak)
      if status == "used":
        used[entry.scan] = payload
        report[entry.scan] = dict(_report_row(entry), status="used",
                                  reason="; ".join(filter(None, [redone.get(entry.scan),
                                                                 entry.note,
                                                                 payload.get("warning")])),
                                  denoise=payload["denoise"])
        if payload.get("warning"):
          logging.warning("used %s with a warning: %s", entry.path, payload["warning"])
      else:
        report[entry.scan] = dict(_report_row(entry), status="skipped", reason=payload)
        logging.warning("skipped %s: %s", entry.path, payload)
      rate = done / max(time.time() - start, 1e-9) * 60
      logging.info("prepare %s %d/%d scans (%.0f%%) | %.1f scans/min | eta %s | %d used, "
                   "%d skipped", metrics.progress_bar(done, len(todo)), done, len(todo),
                   100 * done / len(todo), rate,
                   metrics.duration((len(todo) - done) / rate * 60),
                   counts["used"], counts["skipped"])
      if done == config.get("fault_kill_after_scans", 0):
        os.kill(os.getpid(), signal.SIGKILL)  # fault injection for resume tests
  seconds = time.time() - start
  left = [e for e in todo if e.scan not in report]
  for entry in left:  # stopped by a signal before these were prepared
    report[entry.scan] = dict(_report_row(entry), status="pending",
                              reason=f"not prepared yet: stopped by {stop.name}; re-run the "
                                     "same command to prepare it")

  # --- Index, report, summary -------------------------------------------------
  rows = [used[k] for k in sorted(used)]
  report_rows = [report[k] for k in sorted(report)] + [
      {"scan": "", "subject": s.subject, "site": "", "label": "", "path": s.path,
       "status": s.status, "reason": s.reason} for s in skipped]
  shards.write_table(os.path.join(workdir, REPORT_FILE), REPORT_COLUMNS, report_rows)
  shards.write_table(os.path.join(workdir, shards.INDEX_FILE), shards.INDEX_COLUMNS, rows)
  summary = _summary(rows, report_rows, counts, seconds, len(todo), worker_peak)
  outputs.write_json(os.path.join(workdir, "prepare_summary.json"), summary)
  labels = summary["labels"]
  logging.info("%d scans prepared (%d ADHD, %d control, %d unlabelled), %d skipped, %d other "
               "files ignored; report: %s", len(rows), labels["adhd"], labels["control"],
               labels["unlabelled"], summary["scans_skipped"], summary["files_ignored"],
               os.path.join(workdir, REPORT_FILE))
  if stop.requested:
    raise stop.stopped(
        f"prepare stopped with {len(rows)} scans prepared and {len(left)} not yet; "
        f"{shards.INDEX_FILE} and {REPORT_FILE} in {workdir} list the finished ones: re-run "
        "the same command to prepare the rest")
  if not rows:
    raise errors.InputError(f"no usable scan among {len(report_rows)} found; the reasons are "
                            f"in {os.path.join(workdir, REPORT_FILE)}")
  first = shards.PreparedDataset(workdir)
  fig = plots.prepared_scan_figure(first.frames(0, 0, 1)[..., 0], on_grid, brain,
                                   config.get("figure_point_mm", (30.0, -20.0, 8.0)),
                                   title=f"{first.rows[0]['scan']}, frame 0")
  plots.save(fig, os.path.join(workdir, EXAMPLE_FIGURE))


def _summary(rows: list[dict], report_rows: list[dict], counts: dict, seconds: float,
             todo: int, worker_peak: float) -> dict:
  """prepare_summary.json: counts, labels, speed, memory, denoising."""
  labels = [int(r["label"]) for r in rows]
  ignored = sum(r["status"] == "ignored" for r in report_rows)
  pending = sum(r["status"] == "pending" for r in report_rows)
  return {"scans_used": len(rows),
          "scans_skipped": len(report_rows) - len(rows) - ignored - pending,
          "scans_pending": pending, "files_ignored": ignored,
          "prepared_this_run": counts["used"], "seconds_this_run": round(seconds, 2),
          "scans_per_minute": round(todo / seconds * 60, 2) if todo and seconds else None,
          "peak_rss_mib": {"main": round(metrics.peak_rss_mib(), 1),
                           "largest_worker": round(worker_peak, 1)},
          "labels": {"adhd": labels.count(1), "control": labels.count(0),
                     "unlabelled": labels.count(-1)},
          "frames": int(sum(int(r["frames"]) for r in rows)),
          "registration_warnings": sum(bool(r.get("warning")) for r in rows),
          "denoise": {"with_confounds": sum(bool(r.get("confounds")) for r in rows),
                      "detrended_or_filtered": sum(
                          str(r.get("detrend")) == "True" or bool(r.get("high_pass_hz")) or
                          bool(r.get("low_pass_hz")) for r in rows),
                      "untouched": sum(str(r.get("denoise", "")).startswith("none")
                                       for r in rows)}}


def _check_earlier_dataset(workdir: str, info: shards.DatasetInfo) -> None:
  """Refuses to resume onto shards made for another grid, crop or atlas.

  The config can be the same while the atlas on the grid is not (another
  atlas file, or a change in how it is resampled): the finished shards then
  hold another brain than brain_mask.nii.gz would.
  """
  path = os.path.join(workdir, shards.DATASET_FILE)
  finished = shards.finished_rows(workdir)
  if not finished or not os.path.exists(path):
    return
  earlier = shards.read_info(workdir)
  if earlier == info:
    return
  changed = [f.name for f in dataclasses.fields(info)
             if getattr(earlier, f.name) != getattr(info, f.name)]
  raise errors.InputError(
      f"{path}: the {len(finished)} scans prepared earlier in {workdir} were made for another "
      f"{', '.join(changed)} (the atlas or its resampling onto the grid changed); they do not "
      "fit this run: pass --config.overwrite=True to prepare them again")


def _reusable(workdir: str, entries) -> tuple[dict[str, dict], dict[str, str]]:
  """(scan -> row of finished shards this run keeps, scan -> why a shard is redone).

  A shard under a scan's key made from another file (the manifest changed
  between runs) is deleted and prepared again, never reused under a new name.
  """
  finished, redone = shards.finished_rows(workdir), {}
  for entry in entries:
    row = finished.get(entry.scan)
    if row is not None and os.path.normpath(row["path"]) != os.path.normpath(entry.path):
      shards.remove_scan(workdir, entry.scan)
      del finished[entry.scan]
      redone[entry.scan] = f"prepared again: the earlier shard {entry.scan} was of {row['path']}"
  return finished, redone


def _report_row(entry: layouts.ScanEntry) -> dict:
  return {"scan": entry.scan, "subject": entry.subject, "site": entry.site,
          "label": entry.label, "path": entry.path}


def read_report(workdir: str) -> list[dict]:
  """The rows of WORKDIR/prepare_report.csv."""
  with open(os.path.join(workdir, REPORT_FILE), newline="", encoding="utf-8") as f:
    return list(csv.DictReader(f))
