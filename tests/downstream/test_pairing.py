"""Pairing two probes' per-split scores (downstream/pairing.py, task pair_probes)."""

import json

import numpy as np
import pytest

from conftest import load_config
from roi_mae_jax import errors
from roi_mae_jax import tasks
from roi_mae_jax.downstream import pairing
from roi_mae_jax.downstream import stats

SUBJECTS = [f"sub{i}" for i in range(10)]
LABELS = [i % 2 for i in range(10)]
SITES = ["A"] * 5 + ["B"] * 5


def _write_probe(folder, scores, folds=5, repeats=1, subjects=SUBJECTS, with_digest=True,
                 step=300):
  """A probe workdir: probe_results.json with `scores` {feature: {scheme: [ba, ...]}} and
  probe_predictions.csv; without `with_digest`, the meta of probes that predate it."""
  folder.mkdir(parents=True, exist_ok=True)
  names = {"kfold": [f"seed{r}/fold{k}" for r in range(repeats) for k in range(folds)],
           "loso": ["site=A", "site=B"]}
  splits = {feature: {scheme: [{"split": n, "balanced_accuracy": v, "roc_auc": v + 0.01}
                               for n, v in zip(names[scheme], values)]
                      for scheme, values in by_scheme.items()}
            for feature, by_scheme in scores.items()}
  meta = {"subjects": len(subjects), "folds": folds, "repeats": repeats, "step": step,
          "checkpoint": str(folder), "mask_strategy": "roi"}
  if with_digest:
    meta["subjects_digest"] = pairing.subjects_digest(subjects, LABELS, SITES)
  (folder / "probe_results.json").write_text(json.dumps({"splits": splits, "meta": meta}))
  rows = ["features,scheme,subject,site,label,probability"]
  rows += [f"{feature},kfold,{s},{site},{l},0.5" for feature in scores
           for s, site, l in zip(subjects, SITES, LABELS)]
  (folder / "probe_predictions.csv").write_text("\n".join(rows) + "\n")
  return folder


def _scores(kfold, loso=(0.6, 0.7)):
  return {"kfold": list(kfold), "loso": list(loso)}


def test_pair_is_the_corrected_paired_difference_over_the_same_splits(tmp_path):
  a_values, b_values = [0.8, 0.9, 0.7, 0.85, 0.75], [0.7, 0.8, 0.72, 0.7, 0.6]
  a = _write_probe(tmp_path / "a", {"encoder": _scores(a_values, (0.8, 0.9))})
  b = _write_probe(tmp_path / "b", {"encoder": _scores(b_values, (0.7, 0.6))},
                   with_digest=False)  # an older probe: the digest comes from its csv
  result = pairing.pair(pairing.load_probe(str(a)), pairing.load_probe(str(b)))
  expected = stats.paired_difference(
      {k: v for k, v in enumerate(a_values)}, {k: v for k, v in enumerate(b_values)},
      test_fraction=1 / 5)
  got = result["differences"]["kfold"]["balanced_accuracy"]
  assert got["mean"] == pytest.approx(np.mean(a_values) - np.mean(b_values))
  assert (got["ci_low"], got["ci_high"]) == pytest.approx((expected["ci_low"],
                                                           expected["ci_high"]))
  assert got["correction"].startswith("Nadeau-Bengio")
  assert all(type(got[k]) is float for k in ("mean", "ci_low", "ci_high", "p"))
  loso = result["differences"]["loso"]["balanced_accuracy"]
  assert loso["correction"] == "paired t" and loso["mean"] == pytest.approx(0.2)
  assert result["means"]["b"]["kfold"]["balanced_accuracy"] == pytest.approx(np.mean(b_values))
  table = pairing.markdown_table(result)
  assert "| kfold | 5 |" in table and "| loso | 2 |" in table


def test_two_feature_sets_of_one_probe_pair_and_init_twins_are_step_0(tmp_path):
  probe = _write_probe(tmp_path / "run:2", {"recon_power": _scores([0.6] * 5),
                                        "init_recon_power": _scores([0.5] * 5)})
  result = pairing.pair(pairing.load_probe(f"{probe}:recon_power"),
                        pairing.load_probe(f"{probe}:init_recon_power"))
  assert result["differences"]["kfold"]["balanced_accuracy"]["mean"] == pytest.approx(0.1)
  assert result["a"]["step"] == 300 and result["b"]["step"] == 0


@pytest.mark.parametrize("change, message", [
    (dict(subjects=SUBJECTS[::-1]), "different subjects"),  # same subjects, another order
    (dict(folds=4), "different folds"),
])
def test_probes_whose_splits_differ_are_refused(tmp_path, change, message):
  a = _write_probe(tmp_path / "a", {"encoder": _scores([0.8] * 5)})
  folds = change.get("folds", 5)
  b = _write_probe(tmp_path / "b", {"encoder": _scores([0.7] * folds)}, **change)
  with pytest.raises(errors.InputError, match=message) as raised:
    pairing.pair(pairing.load_probe(str(a)), pairing.load_probe(str(b)))
  assert str(a) in str(raised.value) and str(b) in str(raised.value)


def test_bad_probe_specs_name_the_file_and_the_reason(tmp_path):
  probe = _write_probe(tmp_path / "p", {"encoder": _scores([0.8] * 5)})
  with pytest.raises(errors.InputError, match="no feature set 'recon'.*encoder"):
    pairing.load_probe(f"{probe}:recon")
  with pytest.raises(errors.InputError, match="does not exist"):
    pairing.load_probe(str(tmp_path / "missing"))
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "probe_results.json").write_text('{"features": {}}')
  with pytest.raises(errors.InputError, match="not a probe's results"):
    pairing.load_probe(str(tmp_path / "other"))


def test_pair_probes_task_writes_its_files_and_refuses_the_same_set_twice(tmp_path):
  a = _write_probe(tmp_path / "a", {"encoder": _scores([0.8, 0.9, 0.7, 0.85, 0.75])})
  b = _write_probe(tmp_path / "b", {"encoder": _scores([0.7, 0.8, 0.72, 0.7, 0.6])})
  config = load_config("pair_probes")
  config.update(a=str(a), b=str(b))
  tasks.run_task(config, str(tmp_path / "pair"))
  written = json.loads((tmp_path / "pair" / "pair_results.json").read_text())
  assert written["a"]["feature"] == "encoder" and set(written["differences"]) == {"kfold",
                                                                                 "loso"}
  assert "a - b (95% CI)" in (tmp_path / "pair" / "pair_table.md").read_text()
  with pytest.raises(errors.InputError, match="already exist"):
    tasks.run_task(config, str(tmp_path / "pair"))
  config.update(b=str(a), overwrite=True)
  with pytest.raises(errors.InputError, match="same feature set"):
    tasks.run_task(config, str(tmp_path / "pair"))
