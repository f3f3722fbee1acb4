"""NIfTI files and label tables as neuroimaging tools expect them.

    save_mni(volume, grid.affine, "map.nii.gz", "IG contrast")   # mm/sec units, MNI codes
    write_label_table("atlas_labels.tsv", atlas.regions)         # BIDS dseg.tsv
    rows = read_label_table("atlas_labels.tsv")                  # [{"index": 1, "name": ...}]

Every volume the package writes is on an MNI grid, so both its sform and its
qform say so (code 4, 'mni') and carry the same affine; spatial units are mm,
time units seconds. nibabel, nilearn, FSL and AFNI then read the files alike:
`nilearn.plotting.plot_stat_map("map.nii.gz")` places them on the MNI template.
The label table is the BIDS `dseg.tsv` format (index, name, extra columns),
which `nilearn.maskers.NiftiLabelsMasker(lut=...)` reads.
"""

from __future__ import annotations

import csv
from typing import Iterable

import nibabel as nib
import numpy as np

from roi_mae_jax import errors

MNI_CODE = "mni"     # NIfTI xform code 4: aligned to a template in MNI space
MISSING = "n/a"      # BIDS' value for an empty cell
LABEL_COLUMNS = ("index", "name", "hemisphere", "system")


def mni_image(volume: np.ndarray, affine: np.ndarray,
              description: str = "") -> nib.Nifti1Image:
  """A NIfTI-1 image of `volume` (3D, or 4D with time last) in MNI space, units mm and s."""
  image = nib.Nifti1Image(np.asarray(volume), affine)
  image.header.set_xyzt_units("mm", "sec")
  image.set_sform(affine, code=MNI_CODE)
  image.set_qform(affine, code=MNI_CODE)
  if description:
    image.header["descrip"] = description.encode("ascii", "replace")[:79]
  return image


def save_mni(volume: np.ndarray, affine: np.ndarray, path: str, description: str = "",
             tr: float = 0.0) -> None:
  """Writes `mni_image(volume, affine, description)`; `tr` (s) for 4D series."""
  image = mni_image(volume, affine, description)
  if tr:
    image.header["pixdim"][4] = tr
  nib.save(image, path)


def write_label_table(path: str, regions: Iterable) -> None:
  """index, name, hemisphere, system per region (anything with those attributes; `id` is
  the index); row 0 is the background, as the labels image has it."""
  rows = [{"index": 0, "name": "Background", "hemisphere": MISSING, "system": MISSING}]
  rows += [{"index": int(r.id), "name": r.name, "hemisphere": r.hemisphere or MISSING,
            "system": r.system or MISSING} for r in regions]
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, LABEL_COLUMNS, delimiter="\t", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)


def read_label_table(path: str) -> list[dict]:
  """The rows of a label table, `index` as int; a table without index/name is an error."""
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f, delimiter="\t")
    if not {"index", "name"} <= set(reader.fieldnames or ()):
      raise errors.InputError(f"{path} is not a label table: it needs 'index' and 'name' "
                              f"columns (tab-separated), found {reader.fieldnames}")
    rows = list(reader)
  try:
    for row in rows:
      row["index"] = int(row["index"])
  except ValueError as e:
    raise errors.InputError(f"{path}: an index that is not a whole number ({e})") from None
  return rows

