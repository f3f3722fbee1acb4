"""Linear probe: splits never share subjects, metrics, sklearn == JAX, the probe task."""

import json

import numpy as np
import pytest

from conftest import load_config
from roi_mae_jax import errors
from roi_mae_jax import linear_probe
from roi_mae_jax import tasks
from roi_mae_jax import pretrained as pretrained_lib
from roi_mae_jax import splits as splits_lib


def test_splits_are_subject_disjoint_and_stratified():
  labels = np.array([0, 1] * 10)
  sites = np.array(["A"] * 8 + ["B"] * 6 + ["C"] * 6)
  subjects = [f"s{i}" for i in range(20)]
  splits = splits_lib.kfold_splits(labels, 5, seeds=(0, 1))
  splits += splits_lib.leave_one_site_out(sites, labels)
  splits_lib.check_disjoint(splits, subjects)
  for split in splits:
    assert not set(split.train) & set(split.test)
    assert len(split.train) + len(split.test) == 20
  kfold = [s for s in splits if s.scheme == "kfold" and s.name.startswith("seed0/")]
  assert sorted(np.concatenate([s.test for s in kfold]).tolist()) == list(range(20))
  assert all(labels[s.test].sum() == 2 for s in kfold)  # 2 of each class per fold
  assert [s.name for s in splits if s.scheme == "loso"] == ["site=A", "site=B", "site=C"]
  leaky = [splits_lib.Split("kfold", "bad", np.array([0, 1]), np.array([2]))]
  with pytest.raises(errors.InputError, match="both sides"):
    splits_lib.check_disjoint(leaky, ["s0", "s1", "s0"])  # one subject, two rows
  with pytest.raises(errors.InputError, match="cannot fill 5"):
    splits_lib.kfold_splits(np.array([0, 0, 0, 1, 1, 1]), 5, seeds=(0,))


def test_binary_metrics():
  m = linear_probe.binary_metrics(np.array([1, 1, 1, 0, 0]), np.array([0.9, 0.8, 0.2, 0.1, 0.6]))
  assert m["accuracy"] == pytest.approx(0.6)
  assert m["sensitivity"] == pytest.approx(2 / 3) and m["specificity"] == pytest.approx(0.5)
  assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 0.5) / 2)
  assert m["roc_auc"] == pytest.approx(5 / 6)
  assert np.isnan(linear_probe.binary_metrics(np.array([1, 1]), np.array([0.7, 0.2]))["roc_auc"])


@pytest.mark.parametrize("dim", [10, 1500])
def test_jax_probe_agrees_with_sklearn(dim):
  rng = np.random.default_rng(dim)
  y, y_test = np.arange(100) % 2, np.arange(300) % 2
  x = rng.standard_normal((100, dim))
  x_test = rng.standard_normal((300, dim))
  x[:, :4] += 1.5 * y[:, None]
  x_test[:, :4] += 1.5 * y_test[:, None]
  p_sk, c_sk = linear_probe.sklearn_probe(x, y, x_test)
  p_jax, c_jax = linear_probe.jax_probe(x, y, x_test)
  auc = [linear_probe.binary_metrics(y_test, p)["roc_auc"] for p in (p_sk, p_jax)]
  assert auc[0] > 0.6 and abs(auc[0] - auc[1]) < 0.03, (auc, c_sk, c_jax)
  assert np.corrcoef(p_sk, p_jax)[0, 1] > 0.95


def test_pooling_by_region(pretrained_dir):
  pre = pretrained_lib.load_pretrained(str(pretrained_dir))
  assert pre.step == 6
  windows = np.random.default_rng(0).standard_normal((2,) + pre.spec.window_shape)
  encoded = np.asarray(pre.encode(pre.params, windows.astype(np.float32)))
  by_region = pre.features(windows, "region").reshape(2, len(pre.pooled_regions), -1)
  first = pre.pooled_regions[0]
  tokens = np.flatnonzero(np.tile(pre.spec.patch_region, pre.spec.num_time) == first)
  np.testing.assert_allclose(by_region[:, 0], encoded[:, tokens].mean(1), atol=1e-5)
  np.testing.assert_allclose(pre.features(windows, "mean"), encoded.mean(1), atol=1e-5)
  with pytest.raises(errors.InputError, match="class token"):
    pre.features(windows, "cls")


def test_probe_task_on_synthetic_subjects_beats_chance(pretrained_dir, tmp_path):
  config = load_config("probe", "test")
  config.checkpoint = str(pretrained_dir)
  tasks.run_task(config, str(tmp_path))
  results = json.loads((tmp_path / "probe_results.json").read_text())
  assert set(results) >= {"kfold", "kfold_jax", "loso", "loso_jax", "meta"}
  assert results["meta"]["subjects"] == 48
  assert results["kfold"]["roc_auc"]["mean"] > 0.7  # the planted limbic/cerebellum effect
  assert abs(results["kfold"]["roc_auc"]["mean"] - results["kfold_jax"]["roc_auc"]["mean"]) < 0.1
  table = (tmp_path / "probe_table.md").read_text()
  assert "| kfold | sklearn |" in table and "±" in table
  assert (tmp_path / "probe_roc.png").stat().st_size > 10_000
  with pytest.raises(errors.InputError, match="already exist"):
    tasks.run_task(config, str(tmp_path))


def test_probe_on_prepared_shards_uses_their_sites(pretrained_dir, prepared_dir, tmp_path):
  config = load_config("probe", "test")
  config.update(checkpoint=str(pretrained_dir), jax_probe=False)
  config.data.shards = str(prepared_dir)
  tasks.run_task(config, str(tmp_path))
  results = json.loads((tmp_path / "probe_results.json").read_text())
  assert results["meta"]["sites"] == ["NYU", "OHSU", "Pittsburgh"]
  assert [s["split"] for s in results["splits"]["loso"]] == [
      "site=NYU", "site=OHSU", "site=Pittsburgh"]
