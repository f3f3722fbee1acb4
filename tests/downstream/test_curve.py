"""The pretraining curve (compare with budgets) and the recovery of synthetic components."""

import json

import ml_collections
import numpy as np
import pytest

from conftest import load_config
from roi_mae_jax import errors
from roi_mae_jax import tasks
from roi_mae_jax.data import sources
from roi_mae_jax.downstream import comparison
from roi_mae_jax.downstream import curve
from roi_mae_jax.downstream import evaluation
from roi_mae_jax.downstream import pretrained as pretrained_lib
from roi_mae_jax.downstream import stats
from roi_mae_jax.explain import recovery
from roi_mae_jax.tasks import compare


def test_budgets_are_parsed():  # their rule: tests/config/test_validation.py
  config = load_config("compare_masking", "test")
  assert comparison.curve_budgets(config) == []
  config.budgets = "300,0,150"
  assert comparison.curve_budgets(config) == [0, 150, 300]
  run = compare.pretrain_config(config, "roi", 0)
  assert (run.total_steps, run.checkpoint_every, run.keep_checkpoints) == (300, 150, 2)
  assert comparison.evaluations(config)[:2] == ["probe@150", "probe@300"]
  assert curve.budget_of("probe@150") == 150
  assert curve.budget_of("recovery@0") == 0
  assert curve.budget_of("probe") is None


def test_mean_interval_is_the_corrected_interval_of_the_mean():
  values = {(0, k): v for k, v in enumerate([0.6, 0.7, 0.8, 0.65, 0.75])}
  interval = stats.mean_interval(values, test_fraction=0.2)
  assert interval["mean"] == pytest.approx(0.7) and interval["n"] == 5
  assert interval["ci_low"] < 0.7 < interval["ci_high"]
  plain = stats.mean_interval(values, test_fraction=0)
  ratio = (interval["ci_high"] - interval["ci_low"]) / (plain["ci_high"] - plain["ci_low"])
  assert ratio == pytest.approx(np.sqrt(1 + 5 * 0.25))


def _splits(scores: dict[str, list[float]]) -> dict:
  """{scheme: [scores]} -> a probe's split records of one feature set."""
  return {scheme: [{"split": f"{scheme}{i}", "balanced_accuracy": v, "roc_auc": v,
                    "accuracy": v} for i, v in enumerate(values)]
          for scheme, values in scores.items()}


def test_curve_on_held_out_sites_pairs_each_readout_with_the_better_classical_baseline():
  config = load_config("compare_masking", "test")
  config.seeds, config.budgets, config.run_attribute = "0,1", "0,2", False
  config.probe.schemes = "kfold,loso"
  kfold = [0.5, 0.6, 0.7]
  sites = {"fc": [0.7, 0.6, 0.8], "region_stats": [0.5, 0.5, 0.6], "init": [0.6, 0.6, 0.6]}
  config.strategies = "roi,random,roi_visible,random_visible"
  done = {}
  for seed in (0, 1):
    for strategy, shift in (("roi", 0.1), ("random", 0.0), ("roi_visible", 0.15),
                            ("random_visible", 0.05)):
      splits = {"encoder": _splits({"kfold": kfold,
                                    "loso": [v + shift for v in sites["fc"]]})}
      if strategy == "roi":
        splits.update({name: _splits({"kfold": kfold, "loso": v}) for name, v in sites.items()})
      done[(strategy, seed)] = {"probe@2": {"splits": splits}}
  results = comparison.summarise(config, done)
  held_out = results["curve_loso"]
  assert held_out["scheme"] == "loso" and results["curve"]["scheme"] == "kfold"
  roi = held_out["rows"]["roi encoder"]
  assert roi["points"]["2"]["balanced_accuracy"]["mean"] == pytest.approx(0.8)
  assert roi["points"]["0"]["balanced_accuracy"]["mean"] == pytest.approx(0.6)  # init
  against_fc = roi["vs_classical"]["2"]
  assert against_fc["against"] == "fc" and against_fc["balanced_accuracy"]["n"] == 6
  assert against_fc["balanced_accuracy"]["mean"] == pytest.approx(0.1)
  assert against_fc["balanced_accuracy"]["correction"] == "paired t"  # sites: plain t
  assert roi["vs_baseline"]["2"]["balanced_accuracy"]["mean"] == pytest.approx(0.1)
  # Each objective's roi run is paired with its own random-masking twin.
  visible = held_out["rows"]["roi_visible encoder"]
  assert visible["vs_masking"]["2"]["against"] == "random_visible"
  assert visible["vs_masking"]["2"]["balanced_accuracy"]["mean"] == pytest.approx(0.1)
  assert visible["vs_baseline"]["2"]["balanced_accuracy"]["mean"] == pytest.approx(0.15)
  assert not roi["vs_masking"]  # its twin is the baseline: vs_baseline says it
  assert comparison.masking_twin("roi_time", ["roi_time", "random"]) is None
  table = comparison.markdown(results)
  assert "leave-one-site-out, mean [95% CI]" in table and "| roi - fc |" in table
  assert "| roi_visible - random_visible |" in table
  config.probe.schemes = "kfold"
  assert "curve_loso" not in comparison.summarise(config, done)


def _curve_config():
  config = load_config("compare_masking", "test")
  config.seeds, config.run_attribute = "0", False
  config.budgets, config.run_recovery = "0,2,4", True
  return config


@pytest.mark.slow
def test_curve_probes_every_budget_and_reuses_finished_ones(tmp_path, monkeypatch):
  tasks.run_task(_curve_config(), str(tmp_path))
  results = json.loads((tmp_path / "compare_results.json").read_text())
  curve = results["curve"]
  assert curve["budgets"] == [0, 2, 4]
  row = curve["rows"]["roi encoder"]
  assert sorted(row["points"], key=int) == ["0", "2", "4"]
  # Budget 0 is the init read-out; the last budget is the main table's encoder.
  probe = results["evaluations"]["probe"]
  assert row["points"]["0"] == probe["init"]["interval"]
  assert row["points"]["4"] == probe["roi"]["interval"]
  assert set(row["vs_init"]) == {"2", "4"} and set(row["vs_baseline"]) == {"2", "4"}
  assert set(curve["reference"]) == {"region_stats", "fc"}
  kept = json.loads((tmp_path / "runs" / "roi" / "seed0" / "results.json").read_text())
  assert kept["probe@2"]["meta"]["step"] == 2 and kept["probe@4"]["meta"]["step"] == 4
  assert "init" in kept["probe@2"]["splits"] and "init" not in kept["probe@4"]["splits"]
  assert results["recovery"]["roi"].keys() == {"0", "2", "4"}
  for name in ("compare_curve.png", "compare_recovery.png"):
    assert (tmp_path / name).stat().st_size > 10_000
  table = (tmp_path / "compare_table.md").read_text()
  assert "pretraining curve" in table and "roi - random" in table

  # Repeated (and with a budget fewer): every probe and pretraining is reused.
  def refuse(*args, **kwargs):
    raise AssertionError("a finished budget was computed again")
  monkeypatch.setattr(evaluation, "probe_encoder", refuse)
  monkeypatch.setattr(recovery, "recover", refuse)
  run_task = tasks.run_task
  monkeypatch.setattr(tasks, "run_task", lambda config, workdir, *args, **kwargs: (
      refuse() if config.task == "pretrain" else run_task(config, workdir, *args, **kwargs)))
  tasks.run_task(_curve_config(), str(tmp_path))
  again = json.loads((tmp_path / "compare_results.json").read_text())
  assert again["curve"] == curve
  config = _curve_config()
  config.budgets = "0,4"
  tasks.run_task(config, str(tmp_path))
  fewer = json.loads((tmp_path / "compare_results.json").read_text())
  assert fewer["curve"]["budgets"] == [0, 4]
  assert fewer["curve"]["rows"]["roi encoder"]["points"]["4"] == row["points"]["4"]


def _synthetic(pre, subjects=8):
  data = ml_collections.ConfigDict({"shards": "", "synthetic_subjects": subjects,
                                    "synthetic_preset": "realistic"})
  return sources.downstream_source(pre.config, data)


@pytest.mark.slow
def test_recovery_reads_what_the_generator_put_in(pretrained_dir, monkeypatch):
  pre = pretrained_lib.load_pretrained(str(pretrained_dir))
  source = _synthetic(pre)
  result = recovery.recover(pre, source, folds=4)
  r2 = {c: np.asarray(result["r2"][c]) for c in recovery.COMPONENTS}
  assert r2["network"].shape == (pre.depth + 1, len(pre.pooled_regions))
  assert 1 <= sum(result["effect"]) <= 4  # the realistic preset's regions that own patches
  # The embedded tokens are a linear image of the signal: both parts are recovered.
  assert np.mean(result["summary"]["network"]["other"]) > 0.3
  assert np.mean(result["summary"]["own"]["other"]) > 0.2
  # Against series the data do not contain, nothing is.
  rng = np.random.default_rng(0)
  original = source.data.components
  monkeypatch.setattr(source.data, "components", lambda s: {
      **original(s), **{c: rng.standard_normal(original(s)[c].shape)
                        for c in recovery.COMPONENTS}})
  unrelated = recovery.recover(pre, source, folds=4)
  for c in recovery.COMPONENTS:
    assert np.mean(unrelated["r2"][c]) < 0.05


def test_recovery_refuses_data_without_ground_truth(pretrained_dir, prepared_dir):
  pre = pretrained_lib.load_pretrained(str(pretrained_dir))
  data = ml_collections.ConfigDict({"shards": str(prepared_dir)})
  with pytest.raises(errors.InputError, match="synthetic"):
    recovery.recover(pre, sources.downstream_source(pre.config, data))
