"""Deterministic synthetic resting-state fMRI on the atlas grid: the embedded default.

Each subject belongs to a site (its own TR, intensity and noise) and is ADHD or
control. Regions are grouped into networks by AAL3 system; each network has a
band-passed (0.01-0.1 Hz at the site's TR) time course, and each region follows
its network with loading `coupling` plus its own band-passed fluctuation. In
ADHD subjects the `effect_regions` are decoupled from their network and their
amplitude changes (and, with `effect_level_percent`, their baseline shifts,
an effect a linear read-out sees directly): the planted effect a probe should
find. Voxels carry
baseline x (1 + signal + spatially smooth noise), where the baseline is a
shared anatomy (a level per region, darker unlabelled white matter) scaled
by the site's intensity; outside the brain is 0.

    data = SyntheticFMRI.from_config(config)          # uses config.data.synthetic
    subject = data.subjects[3]                        # site, label, tr
    window = data.window(3, start=10, frames=8)       # (X, Y, Z, 8) float32
    run = data.run(3)                                 # the whole run

Everything is a pure function of (seed, subject, frame): the same window comes
back from any process, in any order, with no files.
"""

from __future__ import annotations

import csv
import dataclasses
import fnmatch
import functools
import os
from typing import Callable, Sequence

import ml_collections
import nibabel as nib
import numpy as np
from scipy import ndimage

from roi_mae_jax import errors
from roi_mae_jax.brain import atlas as atlas_lib
from roi_mae_jax.brain import grids
from roi_mae_jax.brain import maps
from roi_mae_jax.brain import patches as patches_lib
from roi_mae_jax.config import validation


@dataclasses.dataclass(frozen=True)
class Site:
  name: str
  tr: float             # seconds
  intensity: float      # baseline signal level
  noise_percent: float  # noise std as % of baseline


# TRs follow the ADHD-200 sites of the same names; intensities and noise are made up.
SITES = (
    Site("NYU", 2.0, 1000.0, 1.0),
    Site("OHSU", 2.5, 600.0, 1.5),
    Site("Pittsburgh", 1.5, 8000.0, 0.8),
    Site("KKI", 2.5, 3000.0, 1.2),
)


@dataclasses.dataclass(frozen=True)
class Subject:
  index: int
  subject_id: str
  site: Site
  label: int  # 1 = ADHD, 0 = control


def synthetic_config() -> ml_collections.ConfigDict:
  """The `config.data.synthetic` block."""
  return ml_collections.ConfigDict({
      "num_subjects": 64,
      "run_frames": 48,           # frames per subject run
      "num_sites": 3,             # the first N of SITES
      "adhd_fraction": 0.5,
      "coupling": 0.8,            # region-to-network loading
      "signal_percent": 3.0,      # BOLD fluctuation, % of baseline
      "smoothing_mm": 6.0,        # FWHM of the spatial noise
      "effect_regions": "limbic,cerebellum",  # systems or region-name patterns
      "effect_decoupling": 0.7,   # ADHD loading = coupling * (1 - this)
      "effect_amplitude": 1.6,    # ADHD amplitude factor in effect regions
      "effect_level_percent": 0.0,  # ADHD baseline shift in effect regions (% of baseline)
      "data_seed": -1,            # the subjects' seed; -1: config.seed (runs that differ
                                  # only in their training seed then see other subjects)
  })


# Named effects (`apply_preset`). `strong` is the default of `synthetic_config`:
# two whole systems (about 40 regions), amplitude x1.6, which any feature finds.
# `realistic` is what resting-state group differences look like: a handful of
# small regions of one hemisphere whose own fluctuation doubles while they
# decouple from their network, with no change of mean level, so features that
# average the signal over time see nothing and amplitude or connectivity must.
# `decoupling` keeps only the decoupling: each region's variance is unchanged, so
# only how regions move together (connectivity) tells the groups apart.
PRESETS = {
    "strong": {"effect_regions": "limbic,cerebellum", "effect_decoupling": 0.7,
               "effect_amplitude": 1.6, "effect_level_percent": 0.0},
    "realistic": {"effect_regions": "Amygdala_L,Hippocampus_L,Caudate_L,Cerebellum_4_5_L",
                  "effect_decoupling": 0.7, "effect_amplitude": 2.0,
                  "effect_level_percent": 0.0},
    "decoupling": {"effect_regions": "Amygdala_L,Hippocampus_L,Caudate_L,Cerebellum_4_5_L",
                   "effect_decoupling": 0.7, "effect_amplitude": 1.0,
                   "effect_level_percent": 0.0},
}


def apply_preset(cfg: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """Sets the effect fields of a `data.synthetic` block to the preset `name`, in place.

      apply_preset(config.data.synthetic, "realistic")
  """
  validation.refuse("synthetic_preset", name)
  if name:  # '' keeps the block's effect
    cfg.update(PRESETS[name])
  return cfg


def band_passed(rng: np.random.Generator, shape: tuple[int, ...], tr: float,
                low: float = 0.01, high: float = 0.1) -> np.ndarray:
  """White noise band-passed along the last axis, unit std per series."""
  n = shape[-1]
  spectrum = np.fft.rfft(rng.standard_normal(shape), axis=-1)
  freqs = np.fft.rfftfreq(n, d=tr)
  spectrum[..., (freqs < low) | (freqs > high)] = 0
  series = np.fft.irfft(spectrum, n=n, axis=-1)
  return series / np.maximum(series.std(axis=-1, keepdims=True), 1e-12)


def effect_region_mask(regions: Sequence[atlas_lib.Region], spec: str) -> np.ndarray:
  """(R,) bool: regions whose system or name matches a comma-separated item."""
  items = [s.strip() for s in spec.split(",") if s.strip()]
  unknown = [i for i in items if i not in atlas_lib.SYSTEMS
             and not any(fnmatch.fnmatchcase(r.name, i) for r in regions)]
  if unknown:
    raise errors.InputError(f"data.synthetic.effect_regions: {', '.join(unknown)} match "
                            "no system and no region name")
  return np.array([r.system in items or any(fnmatch.fnmatchcase(r.name, i) for i in items)
                   for r in regions])


class SyntheticFMRI:
  """Synthetic subjects on `on_grid` (an atlas resampled to the target grid)."""

  def __init__(self, on_grid: atlas_lib.Atlas, cfg: ml_collections.ConfigDict, seed: int):
    validation.refuse("synthetic.num_sites", cfg.num_sites)
    self.atlas = on_grid
    self.cfg = cfg
    self.seed = int(seed)
    self.grid: grids.Grid = on_grid.grid
    self.brain = patches_lib.brain_envelope(on_grid.labels, min(on_grid.grid.voxel_size_mm))
    # Voxel -> region index (0..R-1), -1 for brain voxels with no label.
    index_of = {r.id: i for i, r in enumerate(on_grid.regions)}
    lut = np.full(int(on_grid.labels.max()) + 1, -1, np.int32)
    for rid, i in index_of.items():
      if rid < len(lut):
        lut[rid] = i
    self.voxel_region = np.where(self.brain, lut[on_grid.labels], -1)
    systems = sorted({r.system for r in on_grid.regions})
    self.region_network = np.array([systems.index(r.system) for r in on_grid.regions])
    self.num_networks = len(systems)
    self.effect = effect_region_mask(on_grid.regions, cfg.effect_regions)
    rng = np.random.default_rng([self.seed, 0xA7])
    sigma = self._sigma_voxels()
    # Anatomy shared by all subjects: each region its own baseline (grey
    # matter), unlabelled brain darker (white matter), a mild smooth field.
    region_level = 1.0 + 0.08 * rng.standard_normal(len(on_grid.regions))
    level = np.where(self.voxel_region >= 0, region_level[self.voxel_region], 0.8)
    field = ndimage.gaussian_filter(rng.standard_normal(self.grid.shape), 2 * sigma)
    tissue = level * (1.0 + 0.05 * field / field.std())
    self.tissue = np.where(self.brain, tissue, 0.0).astype(np.float32)
    # Std of smoothed unit noise, measured once so every frame is scaled alike.
    self.noise_std = float(ndimage.gaussian_filter(
        rng.standard_normal(self.grid.shape, np.float32), sigma).std())
    self.subjects = self._make_subjects()

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, multiple_of: int = 1) -> "SyntheticFMRI":
    seed = config.data.synthetic.get("data_seed", -1)
    return cls(atlas_lib.atlas_from_config(config, multiple_of=multiple_of),
               config.data.synthetic, config.seed if seed < 0 else seed)

  def _sigma_voxels(self) -> float:
    return self.cfg.smoothing_mm / 2.3548 / min(self.grid.voxel_size_mm)

  def _make_subjects(self) -> tuple[Subject, ...]:
    n = int(self.cfg.num_subjects)
    sites = [SITES[i % self.cfg.num_sites] for i in range(n)]
    labels = np.zeros(n, np.int64)
    rng = np.random.default_rng([self.seed, 0x5B])
    for site in SITES[:self.cfg.num_sites]:  # the same ADHD share at every site; fixed order
      members = np.array([i for i in range(n) if sites[i] == site], np.int64)
      chosen = rng.permutation(members)[:int(round(len(members) * self.cfg.adhd_fraction))]
      labels[chosen] = 1
    return tuple(Subject(i, f"{1000000 + i:07d}", sites[i], int(labels[i])) for i in range(n))

  @property
  def run_frames(self) -> int:
    return int(self.cfg.run_frames)

  def components(self, subject: int) -> dict[str, np.ndarray]:
    """What each region's fluctuation is made of (ground truth for read-out studies):
    network (R, run_frames) its network's series, own (R, run_frames) its own, both
    unit std; coupling and amplitude (R,), this subject's loadings."""
    s = self.subjects[subject]
    rng = np.random.default_rng([self.seed, 0x11, subject])
    network = band_passed(rng, (self.num_networks, self.run_frames), s.site.tr)
    own = band_passed(rng, (len(self.region_network), self.run_frames), s.site.tr)
    coupling = np.full(len(own), self.cfg.coupling)
    amplitude = np.ones(len(own))
    if s.label == 1:
      coupling[self.effect] *= 1.0 - self.cfg.effect_decoupling
      amplitude[self.effect] *= self.cfg.effect_amplitude
    return {"network": network[self.region_network], "own": own, "coupling": coupling,
            "amplitude": amplitude}

  @functools.lru_cache(maxsize=256)
  def region_series(self, subject: int) -> np.ndarray:
    """(R, run_frames) BOLD fluctuation of each region, in % of baseline."""
    c = self.components(subject)
    coupling = c["coupling"][:, None]
    series = coupling * c["network"] + np.sqrt(1 - coupling ** 2) * c["own"]
    return (self.cfg.signal_percent * c["amplitude"][:, None] * series).astype(np.float32)

  def window(self, subject: int, start: int, frames: int) -> np.ndarray:
    """(X, Y, Z, frames) float32 volumes of `subject` from frame `start`."""
    if not 0 <= start <= self.run_frames - frames:
      raise errors.InputError(f"window [{start}, {start + frames}) is outside the "
                              f"{self.run_frames}-frame synthetic run")
    s = self.subjects[subject]
    series = self.region_series(subject)[:, start:start + frames]
    labelled = self.voxel_region >= 0
    signal = np.zeros(self.grid.shape + (frames,), np.float32)
    signal[labelled] = series[self.voxel_region[labelled]]
    noise = np.empty_like(signal)
    sigma = self._sigma_voxels()
    for t in range(frames):  # a pure function of (subject, frame)
      rng = np.random.default_rng([self.seed, 0x22, subject, start + t])
      field = ndimage.gaussian_filter(rng.standard_normal(self.grid.shape, np.float32), sigma)
      noise[..., t] = field
    noise *= s.site.noise_percent / self.noise_std
    tissue = self.tissue
    if s.label == 1 and self.cfg.get("effect_level_percent", 0.0):
      in_effect = (self.voxel_region >= 0) & self.effect[np.maximum(self.voxel_region, 0)]
      tissue = tissue * (1 + in_effect * self.cfg.effect_level_percent / 100)
    volume = s.site.intensity * tissue[..., None] * (1 + (signal + noise) / 100)
    return np.where(self.brain[..., None], volume, 0).astype(np.float32)

  def run(self, subject: int) -> np.ndarray:
    return self.window(subject, 0, self.run_frames)


ADHD200_PHENOTYPE_COLUMNS = ("ScanDir ID", "Site", "Gender", "Age", "DX", "QC_Rest_1")


def athena_grid() -> grids.Grid:
  """The grid of the ADHD-200 Athena release: 49x58x47 voxels of 4 mm, LAS."""
  affine = np.array([[-4.0, 0, 0, 96], [0, 4, 0, -132], [0, 0, 4, -78], [0, 0, 0, 1]])
  return grids.Grid((49, 58, 47), affine)


def adhd200_scan_path(root: str, subject: Subject) -> str:
  """Where the ADHD-200 (Athena pipeline) layout keeps a subject's rest scan."""
  sid = subject.subject_id
  return os.path.join(root, subject.site.name, sid, f"sfnwmrda{sid}_session_1_rest_1.nii.gz")


def write_adhd200(data: SyntheticFMRI, root: str, subjects: Sequence[int] | None = None,
                  orientation: str = "",
                  on_written: Callable[[int, int], None] | None = None) -> list[str]:
  """Writes subjects as NIfTI in the ADHD-200 layout; returns the scan paths.

      root/SITE/SID/sfnwmrdaSID_session_1_rest_1.nii.gz   (TR in pixdim[4])
      root/SITE/SITE_phenotypic.csv                        (DX: 0 control, 1 ADHD)

  `orientation` (e.g. 'LAS') flips voxel axes to that orientation with the
  affine updated, as real sites differ; existing files are never replaced.
  `on_written(done, total)` is called after each scan (progress lines).
  """
  chosen = [data.subjects[i] for i in (range(len(data.subjects)) if subjects is None else subjects)]
  paths = [adhd200_scan_path(root, s) for s in chosen]
  existing = [p for p in paths if os.path.exists(p)]
  if existing:
    raise errors.InputError(f"{existing[0]} already exists ({len(existing)} scans); "
                            "write to an empty folder")
  rows: dict[str, list[list]] = {}
  for done, (s, path) in enumerate(zip(chosen, paths), 1):
    volume, affine = data.run(s.index), data.grid.affine
    if orientation:
      volume, affine = _reorient(volume, affine, orientation)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    maps.save_mni(volume, affine, path, "synthetic resting-state run", tr=s.site.tr)
    rng = np.random.default_rng([data.seed, 0x77, s.index])
    rows.setdefault(s.site.name, []).append(
        [s.subject_id, s.site.name, int(rng.integers(0, 2)), round(float(rng.uniform(7, 18)), 2),
         s.label, 1])
    if on_written is not None:
      on_written(done, len(chosen))
  for site, site_rows in rows.items():
    table = os.path.join(root, site, f"{site}_phenotypic.csv")
    with open(table, "w", newline="", encoding="utf-8") as f:
      writer = csv.writer(f)
      writer.writerow(ADHD200_PHENOTYPE_COLUMNS)
      writer.writerows(site_rows)
  return paths


TRUTH_COLUMNS = ("subject", "site", "tr", "label", "effect_regions")


def ground_truth(data: SyntheticFMRI) -> list[dict]:
  """One row per subject: its site, TR, label and the regions that carry the
  planted effect in it (';'-joined AAL3 names; '' for controls), so a study
  run on written files can be scored against what was planted.

      rows = ground_truth(data)   # [{'subject': '1000000', 'site': 'NYU', ...}, ...]
  """
  effect = ";".join(r.name for r, e in zip(data.atlas.regions, data.effect) if e)
  return [{"subject": s.subject_id, "site": s.site.name, "tr": s.site.tr, "label": s.label,
           "effect_regions": effect if s.label == 1 else ""} for s in data.subjects]


def _reorient(volume: np.ndarray, affine: np.ndarray, orientation: str):
  current = nib.orientations.io_orientation(affine)
  target = nib.orientations.axcodes2ornt(tuple(orientation))
  transform = nib.orientations.ornt_transform(current, target)
  spatial = volume.shape[:3]
  new_volume = nib.orientations.apply_orientation(volume, transform)
  new_affine = affine @ nib.orientations.inv_ornt_aff(transform, spatial)
  return np.ascontiguousarray(new_volume), new_affine
