"""Is a scan where the atlas says it is? Header form codes and brain overlap with the template.

    rules = RegistrationRules.from_config(config.registration)
    template = template_brain(grid)                      # (X, Y, Z) bool on the target grid
    problem = form_code_problem(image.header)            # None, or why the affine is no position
    note = form_code_note(image.header)                  # '' or a caution (scanner-space codes)
    fit = measure(mean_abs, scan_affine, template, grid.affine, rules)   # while the run is read
    fit.inside, fit.dice                                 # 0..1; rules.verdict(fit) -> (ok, warning)

A scan in another space (native, shifted, a wrong affine) has plausible
voxel sizes, axes and field of view, yet the atlas then covers the wrong
tissue: its brain lies partly outside the template's brain. So each scan's
own brain (voxels whose mean absolute signal exceeds `brain_threshold` of the
98th percentile: works for raw, masked and band-passed data alike) is put on
the target grid through its affine and compared with the template brain:

  inside  share of the scan's brain that falls inside the template brain
          (a shift or a larger brain moves part of it out);
  dice    2|A & B| / (|A| + |B|) between the scan's brain A and the template
          brain B, in mm^3 (a smaller brain, or half a brain, lowers it).

A scan whose signal fills more than half its field of view has no outline to
compare (used with a warning). The template brain is nilearn's MNI152 (2009) brain mask on the target grid,
joined with the atlas brain (the atlas must be covered). A scan below
`min_inside` or `min_dice` is skipped with both figures in its reason; one
within `warn_margin` above a threshold is used with a warning; both figures
go into index.csv.

Form codes: NIfTI says which space the affine maps to (sform/qform code 1
scanner, 2 aligned anatomy, 3 Talairach, 4 MNI 152, 5 another template). With
both codes 0 the header gives no position at all (nibabel falls back to the
voxel sizes around the array centre): such a scan is skipped. A scan whose
only code is 1 (scanner) or 3 (Talairach) does not claim MNI space: it is
used only if the overlap passes, and the report carries a warning.
"""

from __future__ import annotations

import dataclasses
import functools

import nibabel as nib
import numpy as np

CODE_NAMES = {0: "unknown", 1: "scanner", 2: "aligned", 3: "talairach", 4: "mni", 5: "template"}
TEMPLATE_CODES = (2, 4, 5)  # aligned to an anatomy or template: what MNI-space tools write
# A brain is ~20% of an fMRI field of view (1.5 l of 8.5 l for 64x64x33 at 3.75x3.75x4.5 mm, or
# of a 2 mm MNI box); past half, the "brain" found is not an outline.
MAX_FOV_SHARE = 0.5


@dataclasses.dataclass(frozen=True)
class RegistrationRules:
  """Thresholds of the module doc, from `config.registration`."""

  # Measured on the synthetic Athena scans (4 and 8 mm grids): placed correctly 0.97-0.98
  # inside, Dice 0.94; shifted 10 mm 0.89, 15-20 mm 0.79-0.86, 30 mm 0.69; a native
  # 3.5x3.5x4 mm affine 0.85 (Dice 0.71). Dice stays lenient: a band-passed scan's
  # thresholded brain can be much smaller than the template's.
  min_inside: float = 0.88
  min_dice: float = 0.5
  warn_margin: float = 0.04
  brain_threshold: float = 0.2

  @classmethod
  def from_config(cls, block) -> "RegistrationRules":
    if block is None:
      return cls()
    return cls(**{f.name: float(block[f.name]) for f in dataclasses.fields(cls)
                  if f.name in block})


@dataclasses.dataclass(frozen=True)
class Fit:
  inside: float   # share of the scan's brain inside the template brain
  dice: float     # overlap of the two brains
  scan_brain_ml: float
  fov_share: float = 0.0   # share of the scan's field of view its "brain" fills

  def describe(self) -> str:
    return (f"{100 * self.inside:.0f}% of its brain inside the template brain, "
            f"Dice {self.dice:.2f}")


def _codes(header) -> tuple[int, int]:
  return int(header["sform_code"]), int(header["qform_code"])


def form_code_problem(header) -> str | None:
  """Why the header gives the image no position in any space (None when it gives one)."""
  sform, qform = _codes(header)
  if sform == 0 and qform == 0:
    return ("sform and qform codes are both 0 (unknown space): the header gives no position, "
            "so the atlas cannot be placed on it; set the sform code to 4 (MNI) if the affine "
            "is in MNI space")
  return None


def form_code_note(header) -> str:
  """A caution when the codes in use do not claim template space ('' when they do)."""
  sform, qform = _codes(header)
  used = sform if sform else qform   # nibabel uses the sform when its code is set
  if used in TEMPLATE_CODES or sform in TEMPLATE_CODES or qform in TEMPLATE_CODES:
    return ""
  return (f"sform code {sform} ({CODE_NAMES.get(sform, sform)}) and qform code {qform} "
          f"({CODE_NAMES.get(qform, qform)}): the header does not say the scan is in MNI space")


@functools.lru_cache(maxsize=4)
def _mni_mask_on(shape: tuple[int, ...], affine_key: tuple[float, ...]) -> np.ndarray:
  from nilearn import datasets  # pylint: disable=g-import-not-at-top  (slow import, used once)
  from roi_mae_jax.data import resample  # pylint: disable=g-import-not-at-top
  mask = datasets.load_mni152_brain_mask(resolution=2)
  affine = np.asarray(affine_key).reshape(4, 4)
  ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
  sampler = resample.TrilinearSampler(mask.affine, mask.shape,
                                      nib.affines.apply_affine(affine, ijk))
  values = sampler(np.asarray(mask.dataobj, np.float32)[..., None])[:, 0]
  return (values >= 0.5).reshape(shape, order="C")


def template_brain(shape: tuple[int, int, int], affine: np.ndarray,
                   atlas_brain: np.ndarray | None = None) -> np.ndarray:
  """(X, Y, Z) bool: the MNI152 brain mask on a grid, joined with `atlas_brain`."""
  brain = _mni_mask_on(tuple(shape), tuple(float(v) for v in np.asarray(affine).ravel()))
  return brain | atlas_brain if atlas_brain is not None else brain.copy()


def scan_brain(mean_abs: np.ndarray, threshold: float) -> np.ndarray:
  """The scan's own brain: mean |signal| above `threshold` x its 98th percentile."""
  values = mean_abs[mean_abs > 0]
  if not values.size:
    return np.zeros(mean_abs.shape, bool)
  return mean_abs > threshold * float(np.percentile(values, 98))


def measure(mean_abs: np.ndarray, scan_affine: np.ndarray, template: np.ndarray,
            grid_affine: np.ndarray, rules: RegistrationRules) -> Fit:
  """The overlap of the scan's brain (in its own voxels) with `template` (target grid)."""
  brain = scan_brain(mean_abs, rules.brain_threshold)
  voxels = np.argwhere(brain)
  scan_voxel_ml = abs(np.linalg.det(scan_affine[:3, :3])) / 1000
  grid_voxel_ml = abs(np.linalg.det(grid_affine[:3, :3])) / 1000
  if not len(voxels):
    return Fit(0.0, 0.0, 0.0, 0.0)
  world = nib.affines.apply_affine(scan_affine, voxels)
  ijk = np.round(nib.affines.apply_affine(np.linalg.inv(grid_affine), world)).astype(np.int64)
  in_box = np.all((ijk >= 0) & (ijk < np.asarray(template.shape)), axis=1)
  hit = np.zeros(len(voxels), bool)
  hit[in_box] = template[tuple(ijk[in_box].T)]
  inside = float(hit.mean())
  scan_ml = len(voxels) * scan_voxel_ml
  template_ml = float(template.sum()) * grid_voxel_ml
  dice = 2 * float(hit.sum()) * scan_voxel_ml / (scan_ml + template_ml)
  return Fit(round(inside, 4), round(dice, 4), round(scan_ml, 1), round(float(brain.mean()), 4))


def verdict(fit: Fit, rules: RegistrationRules) -> tuple[str | None, str]:
  """(why the scan is skipped or None, a warning for a scan near a threshold or '').

  A scan whose signal fills most of its field of view (no dark background:
  a synthetic box, an unusual mask) shows no brain outline to compare: it is
  used with a warning, not judged by the overlap.
  """
  if fit.fov_share > MAX_FOV_SHARE:
    return None, (f"its signal fills {100 * fit.fov_share:.0f}% of its field of view: no brain "
                  "outline to check the registration against")
  failed = [f"{name} {value:.2f} < {limit:.2f}" for name, value, limit in
            (("inside", fit.inside, rules.min_inside), ("dice", fit.dice, rules.min_dice))
            if value < limit]
  if failed:
    return (f"not in template (MNI) space: {fit.describe()} ({', '.join(failed)} needed; "
            "config.registration): the atlas would cover other tissue"), ""
  near = [f"{name} {value:.2f}" for name, value, limit in
          (("inside", fit.inside, rules.min_inside), ("dice", fit.dice, rules.min_dice))
          if value < limit + rules.warn_margin]
  if near:
    return None, (f"registration near the threshold ({', '.join(near)}; {fit.describe()}): "
                  "check that the scan is in MNI space")
  return None, ""
