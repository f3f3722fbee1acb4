"""The synthetic resting-state generator, its NIfTI writer, and the Grain pipeline."""

import csv

import nibabel as nib
import numpy as np
import pytest

from conftest import load_config
from roi_mae_jax import errors
from roi_mae_jax.data import pipeline
from roi_mae_jax.data import synthetic


@pytest.fixture(scope="module")
def data():
  config = load_config("pretrain_aal3", "test")
  config.data.synthetic.num_subjects = 24
  config.data.synthetic.run_frames = 64
  return synthetic.SyntheticFMRI.from_config(config, multiple_of=4)


def test_windows_are_pure_functions_of_subject_and_frame(data):
  again = synthetic.SyntheticFMRI(data.atlas, data.cfg, data.seed)
  np.testing.assert_array_equal(data.window(5, 10, 6), again.window(5, 10, 6))
  np.testing.assert_array_equal(data.window(5, 10, 6)[..., 2:], data.window(5, 12, 4))
  assert not np.allclose(data.window(5, 10, 4), data.window(6, 10, 4))
  other_seed = synthetic.SyntheticFMRI(data.atlas, data.cfg, data.seed + 1)
  assert not np.allclose(data.window(5, 10, 4), other_seed.window(5, 10, 4))
  with pytest.raises(errors.InputError, match="outside"):
    data.window(0, 60, 8)


def test_volumes_are_zero_outside_brain_and_scaled_by_site(data):
  run = data.run(0)
  assert run.shape == data.grid.shape + (data.run_frames,)
  assert np.all(run[~data.brain] == 0)
  means = {}
  for s in data.subjects[:6]:
    means[s.site.name] = data.window(s.index, 0, 2)[data.brain].mean()
    assert means[s.site.name] == pytest.approx(s.site.intensity, rel=0.05)
  assert len({s.site.tr for s in data.subjects}) == data.cfg.num_sites


def test_region_series_are_band_passed(data):
  for subject in (0, 1, 2):  # sites with TR 2.0, 2.5 and 1.5 s
    s = data.subjects[subject]
    series = data.region_series(subject)
    power = np.abs(np.fft.rfft(series, axis=1)) ** 2
    freqs = np.fft.rfftfreq(series.shape[1], d=s.site.tr)
    outside = (freqs < 0.01) | (freqs > 0.1)
    assert power[:, outside].sum() < 1e-8 * power.sum()


def test_labels_are_balanced_per_site(data):
  for site in {s.site.name for s in data.subjects}:
    labels = [s.label for s in data.subjects if s.site.name == site]
    assert sum(labels) == round(len(labels) * data.cfg.adhd_fraction)


def test_adhd_effect_decouples_and_amplifies_effect_regions(data):
  effect = np.flatnonzero(data.effect)
  assert {data.atlas.regions[i].system for i in effect} == {"limbic", "cerebellum"}
  cerebellum = [i for i in effect if data.atlas.regions[i].system == "cerebellum"]

  def coupling_and_amplitude(label):
    corr, amp = [], []
    for s in data.subjects:
      if s.label != label:
        continue
      series = data.region_series(s.index)[cerebellum]
      c = np.corrcoef(series)
      corr.append(c[np.triu_indices(len(cerebellum), 1)].mean())
      amp.append(series.std())
    return np.mean(corr), np.mean(amp)

  corr_control, amp_control = coupling_and_amplitude(0)
  corr_adhd, amp_adhd = coupling_and_amplitude(1)
  assert corr_control > 0.5 and corr_adhd < 0.2
  assert amp_adhd / amp_control == pytest.approx(data.cfg.effect_amplitude, rel=0.1)


def test_decoupling_preset_changes_coupling_not_amplitude():
  config = load_config("pretrain_aal3", "test")
  config.data.synthetic.num_subjects = 8
  synthetic.apply_preset(config.data.synthetic, "decoupling")
  data = synthetic.SyntheticFMRI.from_config(config, multiple_of=4)
  effect = np.flatnonzero(data.effect)
  assert len(effect) == 4
  by_label = {0: [], 1: []}
  for s in data.subjects:
    c = data.components(s.index)
    by_label[s.label].append((c["coupling"][effect], c["amplitude"][effect]))
  (coupling_c, amplitude_c), (coupling_a, amplitude_a) = (
      np.mean(by_label[k], axis=0) for k in (0, 1))
  np.testing.assert_allclose(coupling_a, coupling_c * (1 - 0.7))
  np.testing.assert_array_equal(amplitude_a, amplitude_c)  # the variance is the same


def test_unknown_effect_region_is_an_input_error(data):
  with pytest.raises(errors.InputError, match="Nowhere"):
    synthetic.effect_region_mask(data.atlas.regions, "limbic,Nowhere_*")


def test_write_adhd200_layout(data, tmp_path):
  written = []
  paths = synthetic.write_adhd200(data, str(tmp_path), subjects=[0, 1, 3], orientation="LAS",
                                  on_written=lambda done, total: written.append((done, total)))
  assert written == [(1, 3), (2, 3), (3, 3)]
  assert paths[0] == synthetic.adhd200_scan_path(str(tmp_path), data.subjects[0])
  image = nib.load(paths[1])
  assert nib.aff2axcodes(image.affine) == ("L", "A", "S")
  assert image.header.get_zooms()[3] == pytest.approx(data.subjects[1].site.tr)
  # Same world position, same value, whatever the voxel order on disk.
  ras = data.run(1)
  world = data.grid.affine @ np.array([10, 20, 15, 1])
  ijk = np.rint(np.linalg.inv(image.affine) @ world).astype(int)[:3]
  np.testing.assert_allclose(image.get_fdata(dtype=np.float32)[tuple(ijk)], ras[10, 20, 15])
  with open(tmp_path / "NYU" / "NYU_phenotypic.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert [r["ScanDir ID"] for r in rows] == [data.subjects[0].subject_id, data.subjects[3].subject_id]
  assert [int(r["DX"]) for r in rows] == [data.subjects[0].label, data.subjects[3].label]
  with pytest.raises(errors.InputError, match="already exists"):
    synthetic.write_adhd200(data, str(tmp_path), subjects=[0])


def test_ground_truth_names_the_planted_regions_of_adhd_subjects_only(data):
  rows = synthetic.ground_truth(data)
  assert [r["label"] for r in rows] == [s.label for s in data.subjects]
  planted = {r.name for r, e in zip(data.atlas.regions, data.effect) if e}
  assert planted and all(
      set(filter(None, r["effect_regions"].split(";"))) == (planted if r["label"] else set())
      for r in rows)


def test_pipeline_batches_resume_and_process_split(data):
  source = pipeline.SyntheticWindows(data, frames=4)
  ds = pipeline.training_dataset(source, local_batch=4, seed=3, process_index=0, process_count=1)
  it = iter(ds.to_iter_dataset(pipeline.read_options()))
  first = next(it)
  assert first["windows"].shape == (4,) + data.grid.shape + (4,)
  brain = first["windows"][0][data.brain]
  assert abs(brain.mean()) < 1e-4 and brain.std() == pytest.approx(1.0, rel=1e-3)
  state = it.get_state()
  expected = [next(it) for _ in range(7)]  # crosses an epoch boundary (24 subjects)
  resumed = iter(ds.to_iter_dataset(pipeline.read_options()))
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    np.testing.assert_array_equal(got["subject"], want["subject"])
    np.testing.assert_array_equal(got["windows"], want["windows"])
  epoch = np.concatenate([first["subject"]] + [b["subject"] for b in expected[:5]])
  assert sorted(epoch) == list(range(24))  # every subject once per epoch
  halves = [pipeline.training_dataset(source, 4, 3, process_index=i, process_count=2) for i in range(2)]
  seen = [set(np.concatenate([halves[i][k]["subject"] for k in range(3)])) for i in range(2)]
  assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 24
