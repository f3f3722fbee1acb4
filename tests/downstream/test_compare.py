"""task compare: strategies x seeds -> pretrain, probe, attribute; paired statistics."""

import json

import numpy as np
import pytest
from scipy import stats as scipy_stats

from conftest import load_config
from roi_mae_jax import errors
from roi_mae_jax import tasks
from roi_mae_jax.downstream import comparison
from roi_mae_jax.downstream import stats
from roi_mae_jax.tasks import compare


def test_paired_difference_is_the_corrected_t_test():
  rng = np.random.default_rng(0)
  keys = [(seed, f"fold{k}") for seed in range(3) for k in range(5)]
  a = {k: 0.7 + 0.05 * rng.standard_normal() for k in keys}
  b = {k: a[k] - 0.03 + 0.02 * rng.standard_normal() for k in keys}
  b[(9, "only in b")] = 0.1  # unpaired: ignored
  plain = stats.paired_difference(a, b, test_fraction=0)
  reference = scipy_stats.ttest_rel([a[k] for k in keys], [b[k] for k in keys])
  assert plain["n"] == 15 and plain["p"] == pytest.approx(reference.pvalue)
  corrected = stats.paired_difference(a, b, test_fraction=0.2)
  assert corrected["mean"] == pytest.approx(plain["mean"]) and corrected["p"] > plain["p"]
  # (1/J + 1/4) / (1/J) = 4.75 times the variance: the interval is sqrt(4.75) wider.
  width = lambda d: d["ci_high"] - d["ci_low"]
  assert width(corrected) / width(plain) == pytest.approx(np.sqrt(1 + 15 / 4))
  same = stats.paired_difference({1: 0.5, 2: 0.6}, {1: 0.5, 2: 0.6}, 0.2)
  assert same["mean"] == 0 and same["p"] == 1.0
  summary = stats.describe({1: 0.5, 2: 0.7, 3: float("nan")})
  assert summary == {"mean": pytest.approx(0.6), "std": pytest.approx(np.sqrt(0.02)), "n": 2}


@pytest.mark.slow
def test_one_synthetic_preset_reaches_pretraining_and_every_evaluation():
  config = load_config("compare_masking")
  assert config.synthetic_preset == "realistic"
  config.synthetic_preset = "decoupling"
  run = compare.with_preset(config)
  assert run.pretrain.data.synthetic.effect_amplitude == 1.0
  assert compare.pretrain_config(run, "random", 1).data.synthetic.effect_amplitude == 1.0
  assert {run[b].data.synthetic_preset for b in ("probe", "finetune", "attribute")} == {
      "decoupling"}
  assert config.pretrain.data.synthetic.effect_amplitude != 1.0  # the given config is kept
  test = load_config("compare_masking", "test")
  assert compare.with_preset(test).to_dict() == test.to_dict()  # '': each block's own


def test_compare_runs_every_strategy_and_reuses_finished_runs(tmp_path):
  config = load_config("compare_masking", "test")
  config.seeds = "0"
  tasks.run_task(config, str(tmp_path))
  results = json.loads((tmp_path / "compare_results.json").read_text())
  probe = results["evaluations"]["probe"]
  assert results["strategies"] == ["roi", "random"]
  assert sorted(probe) == ["fc", "init", "random", "region_stats", "roi"]
  for row in probe:
    assert probe[row]["roc_auc"]["n"] == 3  # one seed x 3 folds
    assert 0 <= probe[row]["balanced_accuracy"]["mean"] <= 1
  diff = probe["roi"]["vs_baseline"]["roc_auc"]
  assert diff["n"] == 3 and diff["ci_low"] <= diff["mean"] <= diff["ci_high"]
  assert "vs_baseline" not in probe["random"] and probe["random"]["vs_init"]["roc_auc"]["n"] == 3
  # The baselines were probed once, in the first strategy's runs.
  kept = {s: json.loads((tmp_path / "runs" / s / "seed0" / "results.json").read_text())
          for s in ("roi", "random")}
  assert list(kept["random"]["probe"]["features"]) == ["encoder"]
  assert sorted(kept["roi"]["probe"]["features"]) == ["encoder", "fc", "init", "region_stats"]
  assert sorted(kept["roi"]) == ["attribute", "probe"]
  # Both strategies were probed on the same subjects and the same splits.
  splits = {s: ([x["split"] for x in kept[s]["probe"]["splits"]["encoder"]["kfold"]],
                kept[s]["probe"]["meta"]["subjects"]) for s in kept}
  assert splits["roi"] == splits["random"]
  masks = [json.loads((tmp_path / "runs" / s / "seed0" / "pretrain" / "pretrain_summary.json")
                      .read_text())["mask_strategy"] for s in ("roi", "random")]
  assert masks == ["roi", "random"]
  assert set(results["reconstruction_by_region"]["roi"]["system_mse"]) >= {"limbic", "cerebellum"}
  assert results["attribution_by_system"]["random"]["top_systems"]
  table = (tmp_path / "compare_table.md").read_text()
  assert "| roi encoder |" in table and "| fc (baseline) |" in table and "p = " in table
  assert "(reference)" in table and "balanced acc. - init" in table
  assert (tmp_path / "compare.png").stat().st_size > 0

  # Repeated: every finished run is reused, the summary written again.
  stamps = {p: p.stat().st_mtime for p in (tmp_path / "runs").rglob("*.json")}
  tasks.run_task(config, str(tmp_path))
  assert all(p.stat().st_mtime == t for p, t in stamps.items())
  assert json.loads((tmp_path / "compare_results.json").read_text()) == results
  # A run folder holding another run (here: another learning rate) is not reused.
  run_config = tmp_path / "runs" / "roi" / "seed0" / "pretrain" / "config.json"
  original = run_config.read_text()
  edited = json.loads(original)
  edited["optim"]["learning_rate"] = 0.5
  run_config.write_text(json.dumps(edited))
  with pytest.raises(errors.InputError, match="different settings"):
    tasks.run_task(config, str(tmp_path))
  run_config.write_text(original)
  # Other pretraining settings in the same workdir would mix two experiments.
  config.pretrain.total_steps = 7
  with pytest.raises(errors.InputError, match="different settings"):
    tasks.run_task(config, str(tmp_path))


def _results(scores, baselines=()):
  """An evaluation's dict as the library returns it: probe (feature set -> scheme ->
  splits) when `baselines` is not None, else fine-tuning (scheme -> splits)."""
  splits = [{"split": f"seed0/fold{k}", "accuracy": a, "balanced_accuracy": a, "roc_auc": u}
            for k, (a, u) in enumerate(scores)]
  if baselines is None:
    return {"splits": {"kfold": splits}}
  return {"splits": {name: {"kfold": splits} for name in ("encoder",) + tuple(baselines)}}


def test_summary_pairs_scores_by_seed_and_fold_for_probe_and_finetune():
  config = load_config("compare_masking", "test")
  config.seeds, config.run_finetune, config.run_attribute = "0,1", True, False
  config.probe.baselines = "init"
  done = {}
  for strategy, shift in (("roi", 0.1), ("random", 0.0)):
    for seed in (0, 1):
      scores = [(0.6 + shift + 0.01 * k + 0.02 * seed, 0.7 + shift) for k in range(3)]
      done[(strategy, seed)] = {
          "probe": _results(scores, ("init",) if strategy == "roi" else ()),
          "finetune": _results(scores, None)}
  results = comparison.summarise(config, done)
  for evaluation in ("probe", "finetune"):
    table = results["evaluations"][evaluation]
    assert table["roi"]["accuracy"]["n"] == 6
    diff = table["roi"]["vs_baseline"]["accuracy"]
    assert diff["n"] == 6 and diff["mean"] == pytest.approx(0.1) and diff["p"] < 1e-6
  # init: the encoder rows of the first strategy's file (the same numbers as roi here)
  init = results["evaluations"]["probe"]["init"]
  assert init["accuracy"]["n"] == 6 and "init" not in results["evaluations"]["finetune"]
  assert results["evaluations"]["probe"]["random"]["vs_init"]["accuracy"]["mean"] == (
      pytest.approx(-0.1))
  text = comparison.markdown(results)
  assert "### finetune" in text and "+0.100 [+0.100, +0.100]" in text


def test_summary_rows_per_readout_pair_with_the_same_readout():
  config = load_config("compare_masking", "test")
  config.seeds, config.run_attribute = "0", False
  config.probe.baselines, config.probe.readouts = "init", "recon"
  level = {"encoder": 0.6, "recon": 0.8, "init": 0.5, "init_recon": 0.55}
  done = {}
  for strategy, shift in (("roi", 0.1), ("random", 0.0)):
    names = ("encoder", "recon") + (("init", "init_recon") if strategy == "roi" else ())
    done[(strategy, 0)] = {"probe": {"splits": {n: {"kfold": [
        {"split": f"seed0/fold{k}", "accuracy": v, "balanced_accuracy": v, "roc_auc": v}
        for k, v in enumerate([level[n] + (0 if n.startswith("init") else shift)] * 3)]}
        for n in names}}}
  table = comparison.summarise(config, done)["evaluations"]["probe"]
  assert list(table) == ["roi", "roi recon", "random", "random recon", "init", "init_recon"]
  assert table["roi recon"]["vs_baseline"]["accuracy"]["mean"] == pytest.approx(0.1)
  assert table["roi recon"]["vs_init"]["accuracy"]["mean"] == pytest.approx(0.9 - 0.55)
  assert table["roi"]["vs_init"]["accuracy"]["mean"] == pytest.approx(0.7 - 0.5)
  assert "vs_baseline" not in table["random recon"] and "vs_init" not in table["init_recon"]
  text = comparison.markdown(comparison.summarise(config, done))
  assert "| roi recon |" in text and "| init_recon (baseline) |" in text
  assert "| random recon | 0.800" in text and text.count("(reference)") >= 3
