"""Task synthesize: a synthetic ADHD-200 release that prepare reads, with its ground truth."""

import csv
import hashlib
import json

import nibabel as nib
import pytest

from conftest import load_config, prepare_config
from roi_mae_jax import errors
from roi_mae_jax import tasks
from roi_mae_jax.data import shards


def _rows(path):
  with open(path, newline="", encoding="utf-8") as f:
    return list(csv.DictReader(f))


def _digest(root):
  return {p.relative_to(root).as_posix(): hashlib.sha256(
      nib.load(p).get_fdata().tobytes()).hexdigest() for p in sorted(root.glob("*/*/*.nii.gz"))}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  root = tmp_path_factory.mktemp("release")
  tasks.run_task(load_config("synthesize", "test"), str(root))
  return root


def test_release_has_the_layout_the_truth_and_a_summary(release):
  truth = _rows(release / "ground_truth.csv")
  assert [r["subject"] for r in truth] == ["1000000", "1000001", "1000002", "1000003"]
  phenotype = {r["ScanDir ID"]: r for site in ("NYU", "OHSU")
               for r in _rows(release / site / f"{site}_phenotypic.csv")}
  for row in truth:  # the table a prepare reads says what the truth says
    assert phenotype[row["subject"]]["DX"] == row["label"]
    assert phenotype[row["subject"]]["Site"] == row["site"]
    planted = row["effect_regions"].split(";") if row["effect_regions"] else []
    assert planted == ([] if row["label"] == "0" else
                       ["Hippocampus_L", "Amygdala_L", "Caudate_L", "Cerebellum_4_5_L"])
  image = nib.load(next(release.glob("NYU/*/*.nii.gz")))
  assert nib.aff2axcodes(image.affine) == ("L", "A", "S") and image.shape == (49, 58, 47, 8)
  summary = json.loads((release / "synthesize_summary.json").read_text())
  assert summary["subjects"] == 4 and summary["adhd"] == 2
  assert summary["preset"] == "realistic" and summary["effect"]["effect_amplitude"] == 2.0


def test_prepare_reads_the_release_with_its_labels(release, tmp_path):
  tasks.run_task(prepare_config(release), str(tmp_path))
  index = {r["subject"]: r for r in _rows(tmp_path / shards.INDEX_FILE)}
  assert {s: int(r["label"]) for s, r in index.items()} == \
      {r["subject"]: int(r["label"]) for r in _rows(release / "ground_truth.csv")}


def test_same_seed_same_scans_other_seed_other_scans(release, tmp_path):
  tasks.run_task(load_config("synthesize", "test"), str(tmp_path / "again"))
  assert _digest(tmp_path / "again") == _digest(release)
  other = load_config("synthesize", "test")
  other.seed = 102
  tasks.run_task(other, str(tmp_path / "other"))
  assert set(_digest(tmp_path / "other").values()).isdisjoint(_digest(release).values())


def test_a_release_is_never_written_over_nor_into_by_another_task(release, tmp_path):
  before = _digest(release)
  with pytest.raises(errors.InputError, match="already holds a release.*ground_truth.csv"):
    tasks.run_task(load_config("synthesize", "test"), str(release))
  with pytest.raises(errors.InputError, match="holds a 'synthesize' run"):
    tasks.run_task(prepare_config(release), str(release))
  assert _digest(release) == before
  stray = tmp_path / "stray"  # scans left by an interrupted write: refused, not mixed
  tasks.run_task(load_config("synthesize", "test"), str(stray))
  (stray / "ground_truth.csv").unlink()
  (stray / "synthesize_summary.json").unlink()
  with pytest.raises(errors.InputError, match="already exists"):
    tasks.run_task(load_config("synthesize", "test"), str(stray))
