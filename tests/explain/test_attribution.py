"""Integrated gradients: exact on linear models, complete on the MAE classifier, and the
attribute task finds the regions where the synthetic effect was planted."""

import csv
import json

import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

from conftest import load_config
from tests.brain.test_maps import assert_mni_nifti
from roi_mae_jax import tasks
from roi_mae_jax.downstream import classifier
from roi_mae_jax.downstream import pretrained as pretrained_lib
from roi_mae_jax.explain import integrated_gradients as ig
from roi_mae_jax.tasks import attribute


def test_ig_of_a_linear_model_is_input_times_weight():
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.standard_normal((4, 5, 6, 3)), jnp.float32)
  x = jnp.asarray(rng.standard_normal((2, 4, 5, 6, 3)), jnp.float32)
  x0 = jnp.asarray(rng.standard_normal((2, 4, 5, 6, 3)), jnp.float32)
  fn = lambda v: jnp.einsum("bxyzt,xyzt->b", v, w) - 0.3
  attr, delta = ig.integrated_gradients(fn, x, x0, steps=7, chunk=3)  # 3 chunks, 2 padded
  np.testing.assert_allclose(attr, (x - x0) * w, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(delta, fn(x) - fn(x0), rtol=1e-6)
  assert ig.completeness_error(attr, delta).max() < 1e-4


@pytest.mark.parametrize("pool, layers", [("region_std", None), ("region_corr", None),
                                          ("region_std", (1, 2))])
def test_ig_is_complete_on_the_mae_classifier(pretrained_dir, pool, layers):
  pre = pretrained_lib.load_pretrained(str(pretrained_dir))
  rng = np.random.default_rng(1)
  clip = rng.standard_normal((1, 2) + pre.spec.window_shape).astype(np.float32)
  dim = classifier.clip_features(pre, pool, pre.params, jnp.asarray(clip[0]),
                                 layers).shape[0]
  head = classifier.LinearHead(np.zeros(dim, np.float32), np.ones(dim, np.float32),
                               rng.standard_normal(dim).astype(np.float32) / np.sqrt(dim),
                               0.1, pool, 1.0, layers)
  baseline = np.broadcast_to(clip.mean(-1, keepdims=True), clip.shape)
  attr, delta = ig.integrated_gradients(classifier.clip_logit(pre, head), jnp.asarray(clip),
                                        jnp.asarray(baseline), steps=64, chunk=8)
  assert abs(float(delta[0])) > 1e-3
  assert ig.completeness_error(attr, delta)[0] < 0.02


@pytest.mark.slow
@pytest.mark.parametrize("layers", ["", "1"])
def test_attribution_ranks_the_planted_regions_first(pretrained_dir, tmp_path, layers):
  """The realistic preset: four small left regions, amplitude and decoupling only;
  the classifier on the encoder's output, or on an intermediate block (read-out encoder@1)."""
  from roi_mae_jax.data import synthetic
  trained_dir = pretrained_dir
  config = load_config("attribute", "test")
  config.checkpoint = str(trained_dir)
  config.layers = layers
  tasks.run_task(config, str(tmp_path))
  with open(tmp_path / "attribution_regions.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  ranked = [r for r in rows if r["rank"]]
  rank = {r["name"]: int(r["rank"]) for r in ranked}
  planted = synthetic.PRESETS["realistic"]["effect_regions"].split(",")
  decile = max(1, len(ranked) // 10)
  for name in planted:
    mirror = name[:-2] + "_R"
    assert rank[name] <= decile and rank[name] < rank[mirror], (
        name, rank[name], rank[mirror], [r["name"] for r in ranked[:decile]])
  assert [int(r["rank"]) for r in ranked] == list(range(1, len(ranked) + 1))
  assert all(int(r["voxels"]) < config.min_region_voxels for r in rows if not r["rank"])
  summary = json.loads((tmp_path / "attribution_summary.json").read_text())
  assert summary["completeness"]["max_over_mean_delta"] < 0.05 and summary["subjects"] == 48
  assert summary["completeness"]["relative_median"] < 0.05
  pre = pretrained_lib.load_pretrained(str(trained_dir))
  for name in attribute.MAP_FILES:  # 3D, MNI sform and qform, mm
    image = assert_mni_nifti(tmp_path / name)
    assert image.shape == pre.patch_map.atlas.grid.shape
    np.testing.assert_allclose(image.affine, pre.patch_map.atlas.grid.affine)
  # The main map goes straight into nilearn, and ranks the regions: |its region means|.
  from nilearn import plotting
  display = plotting.plot_stat_map(str(tmp_path / "attribution_map.nii.gz"))
  display.savefig(str(tmp_path / "stat_map.png"))
  display.close()
  difference = np.asarray(nib.load(tmp_path / "attribution_map.nii.gz").dataobj)
  top = ranked[0]
  voxels = pre.patch_map.atlas.labels == int(top["id"])
  assert abs(difference[voxels].mean()) == pytest.approx(float(top["contrast"]), rel=1e-4)
  with open(tmp_path / "attribution_groups.csv", newline="") as f:
    group_table = list(csv.DictReader(f))
  groups = {(r["level"], r["name"]) for r in group_table}
  assert {("hemisphere", "L"), ("hemisphere", "R"), ("system", "limbic")} <= groups
  systems = [r for r in group_table if r["level"] == "system"]
  small = [int(r["voxels"]) < config.min_region_voxels for r in systems]
  assert small == sorted(small)  # a group too small to rank (brainstem: 1 voxel) goes last
  assert (tmp_path / "attribution.png").stat().st_size > 10_000
  with open(tmp_path / "reconstruction_by_region.csv", newline="") as f:
    recon = list(csv.DictReader(f))
  assert len(recon) == len(pre.pooled_regions)
  assert float(recon[0]["mse"]) <= float(recon[-1]["mse"])
  assert (tmp_path / "reconstruction_by_region.png").stat().st_size > 10_000
  head = classifier.LinearHead.load(str(tmp_path / "classifier_head.npz"))
  assert head.pool == config.pool and head.weight.shape == head.mean.shape
  assert head.layers == ((1,) if layers else None)  # the read-out the head was fitted on


def test_reconstruction_by_region_equals_dropping_the_region(pretrained_dir):
  """Hiding a region through `keep_valid` scores exactly like an MAE mask of that region."""
  from roi_mae_jax.explain import reconstruction
  from roi_mae_jax.masking import samplers
  pre = pretrained_lib.load_pretrained(str(pretrained_dir))
  window = np.random.default_rng(2).standard_normal((1,) + pre.spec.window_shape)
  window = window.astype(np.float32)
  rows = reconstruction.reconstruction_by_region(pre, window, chunk=8)
  assert len(rows) == len(pre.pooled_regions)
  assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
  assert all(r["mse"] >= 0 and r["r2"] <= 1 for r in rows)
  region_ids = [r.id for r in pre.patch_map.regions]
  for row in (rows[0], rows[-1]):
    index = region_ids.index(row["id"])
    hidden = np.tile(pre.spec.patch_region, pre.spec.num_time) == index
    keep, drop = np.flatnonzero(~hidden), np.flatnonzero(hidden)
    restore = np.argsort(np.concatenate([keep, drop]))
    sample = samplers.MaskSample(*(jnp.asarray(a)[None] for a in (keep, drop, restore, hidden)))
    loss = float(pre.model()(jnp.asarray(window), sample)["loss"])
    assert row["mse"] == pytest.approx(loss, rel=1e-4), row["name"]
