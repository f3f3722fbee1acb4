"""Linear probe: splits never share subjects, metrics, the exact row-space fit, the probe task."""

import json

import numpy as np
import pytest

from conftest import load_config
from roi_mae_jax import errors
from roi_mae_jax import tasks
from roi_mae_jax.config import validation
from roi_mae_jax.downstream import logistic
from roi_mae_jax.downstream import pairing
from roi_mae_jax.downstream import pretrained as pretrained_lib
from roi_mae_jax.downstream import splits as splits_lib


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
  m = logistic.binary_metrics(np.array([1, 1, 1, 0, 0]), np.array([0.9, 0.8, 0.2, 0.1, 0.6]))
  assert m["accuracy"] == pytest.approx(0.6)
  assert m["sensitivity"] == pytest.approx(2 / 3) and m["specificity"] == pytest.approx(0.5)
  assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 0.5) / 2)
  assert m["roc_auc"] == pytest.approx(5 / 6)
  assert np.isnan(logistic.binary_metrics(np.array([1, 1]), np.array([0.7, 0.2]))["roc_auc"])


def test_removed_jax_probe_flag_says_why():
  message = validation.flag_error(KeyError("jax_probe"), ["--config.jax_probe=True"])
  assert message.startswith("--config.jax_probe: no config key 'jax_probe': the JAX logistic")


@pytest.mark.slow
def test_probe_task_scores_the_encoder_beside_the_baselines(pretrained_dir, tmp_path):
  config = load_config("probe", "test")
  config.update(checkpoint=str(pretrained_dir))
  tasks.run_task(config, str(tmp_path))
  results = json.loads((tmp_path / "probe_results.json").read_text())
  assert set(results) >= {"features", "splits", "differences", "meta"}
  assert set(results["features"]) == {"encoder", "region_stats", "fc", "init"}
  assert results["meta"]["subjects"] == 48 and results["meta"]["pool"] == config.pool
  assert results["meta"]["synthetic_preset"] == "realistic"
  # Every feature set on the same splits; differences paired over them.
  names = {k: [s["split"] for s in v["kfold"]] for k, v in results["splits"].items()}
  assert len({tuple(v) for v in names.values()}) == 1 and len(names["fc"]) == 3
  diff = results["differences"]["init"]["kfold"]["balanced_accuracy"]
  assert diff["n"] == 3 and diff["ci_low"] <= diff["mean"] <= diff["ci_high"]
  # The realistic effect (amplitude in four small regions) is found by region statistics.
  assert results["features"]["region_stats"]["kfold"]["balanced_accuracy"]["mean"] > 0.7
  table = (tmp_path / "probe_table.md").read_text()
  assert f"| encoder ({config.pool}) | kfold |" in table and "| fc | loso |" in table
  assert "(reference)" in table and "±" in table
  predictions = (tmp_path / "probe_predictions.csv").read_text()
  assert "region_stats,kfold," in predictions and "init,loso," in predictions
  assert (tmp_path / "probe_roc.png").stat().st_size > 10_000
  # pair_probes on two of its feature sets gives the probe's own paired difference.
  pair = load_config("pair_probes")
  pair.update(a=str(tmp_path), b=f"{tmp_path}:init")
  tasks.run_task(pair, str(tmp_path / "pair"))
  paired = json.loads((tmp_path / "pair" / "pair_results.json").read_text())
  for scheme in ("kfold", "loso"):
    for key in ("mean", "ci_low", "ci_high"):
      assert paired["differences"][scheme]["balanced_accuracy"][key] == pytest.approx(
          results["differences"]["init"][scheme]["balanced_accuracy"][key])
  assert results["meta"]["subjects_digest"] == pairing._digest_from_predictions(
      str(tmp_path / "probe_predictions.csv"), "encoder")
  with pytest.raises(errors.InputError, match="already exist"):
    tasks.run_task(config, str(tmp_path))


def test_probe_on_prepared_shards_uses_their_sites(pretrained_dir, prepared_dir, tmp_path):
  config = load_config("probe", "test")
  config.update(checkpoint=str(pretrained_dir), baselines="region_stats", pool="region_std")
  config.data.shards = str(prepared_dir)
  tasks.run_task(config, str(tmp_path))
  results = json.loads((tmp_path / "probe_results.json").read_text())
  assert results["meta"]["sites"] == ["NYU", "OHSU", "Pittsburgh"]
  assert results["meta"]["synthetic_preset"] == ""
  assert [s["split"] for s in results["splits"]["encoder"]["loso"]] == [
      "site=NYU", "site=OHSU", "site=Pittsburgh"]
  on_grid = pretrained_lib.load_pretrained(str(pretrained_dir)).patch_map.atlas
  present = sum(1 for r in on_grid.regions if np.any(on_grid.labels == r.id))
  assert results["meta"]["features"]["region_stats"] == 2 * present  # mean and std per region


@pytest.mark.parametrize("c", logistic.CS)
def test_probe_in_the_span_of_the_training_rows_is_exact(c):
  """Fitting on the rows' coordinates (PCA) equals the fit on all features, at every C."""
  from sklearn import linear_model, preprocessing
  rng = np.random.default_rng(5)
  y = np.arange(30) % 2
  x = rng.standard_normal((30, 400))
  x[:, :3] += y[:, None]
  x_test = rng.standard_normal((10, 400))
  model, chosen = logistic.fit_sklearn(x, y, cs=(c,))
  assert chosen == c
  scaler = preprocessing.StandardScaler().fit(x)
  direct = linear_model.LogisticRegression(C=c, class_weight="balanced", tol=1e-10,
                                           max_iter=10000).fit(scaler.transform(x), y)
  np.testing.assert_allclose(model.predict_proba(x_test)[:, 1],
                             direct.predict_proba(scaler.transform(x_test))[:, 1], atol=1e-4)
  weight, bias = logistic.weights_of(model)
  # Weights grow with C (to ~0.3 here at C = 100): a relative bound, tight at every C.
  error = np.linalg.norm(weight - direct.coef_[0]) / np.linalg.norm(direct.coef_[0])
  assert error < 1e-5, error
  logits = scaler.transform(x_test) @ weight + bias
  np.testing.assert_allclose(1 / (1 + np.exp(-logits)), model.predict_proba(x_test)[:, 1],
                             atol=1e-6)
