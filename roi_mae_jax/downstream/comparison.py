"""The masking comparison's tables, from the dicts each run's evaluations return.

    from roi_mae_jax.downstream import comparison
    results = comparison.summarise(config, done)   # {(strategy, seed): {evaluation: dict}}
    print(comparison.markdown(results))

`evaluations(config)` names what each run computes ("probe@150", "recovery@0",
"finetune", "attribute"); `summarise` pairs the runs' scores over (seed, fold)
against the baseline strategy and the initial weights (stats), and with
`config.budgets` adds the pretraining curve (curve). The task that runs the
pretrainings and evaluations is tasks/compare.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from roi_mae_jax.downstream import curve
from roi_mae_jax.downstream import features
from roi_mae_jax.downstream import readouts
from roi_mae_jax.downstream import stats

METRICS = {"balanced_accuracy": "balanced acc.", "roc_auc": "AUC", "accuracy": "accuracy"}


def names(text: str) -> list[str]:
  return [n.strip() for n in str(text).split(",") if n.strip()]


def curve_budgets(config: ml_collections.ConfigDict) -> list[int]:
  """config.budgets ('0,150,300') -> sorted steps; '' -> [] (no curve: the run's end).

  0 is the initial weights (the `init` read-outs); at least one budget must pretrain."""
  return sorted(int(b) for b in names(config.get("budgets", "")))


def evaluations(config: ml_collections.ConfigDict) -> list[str]:
  """The evaluations of every run, in order (with budgets: "probe@150", ...)."""
  budgets = [b for b in curve_budgets(config) if b > 0]
  probes = [f"probe@{b}" for b in budgets] or ["probe"]
  recovery = ([f"recovery@{b}" for b in [0] + budgets]
              if budgets and config.get("run_recovery") else [])
  return (probes + recovery + (["finetune"] if config.get("run_finetune") else []) +
          (["attribute"] if config.get("run_attribute") else []))


def _split_scores(results: dict, scheme: str,
                  feature_set: str = "") -> dict[str, dict[str, float]]:
  """metric -> {split name: value} of one scheme (of one feature set of a probe)."""
  splits = results.get("splits", {})
  if feature_set:
    splits = splits.get(feature_set, {})
  splits = splits.get(scheme, [])
  return {m: {s["split"]: float(s[m]) for s in splits if m in s} for m in METRICS}


def _region_summary(runs: list[list[dict]]) -> dict:
  """Reconstruction by region, averaged over seeds: overall, per system, best/worst."""
  per_region, per_system = {}, {}
  for rows in runs:
    for row in rows:
      per_region.setdefault(row["name"], []).append(float(row["mse"]))
      per_system.setdefault(row["system"], []).append(float(row["mse"]))
  if not per_region:
    return {}
  means = sorted((float(np.mean(v)), name) for name, v in per_region.items())
  return {"mean_mse": float(np.mean([m for m, _ in means])),
          "best": [name for _, name in means[:3]], "worst": [name for _, name in means[-3:]],
          "system_mse": {s: float(np.mean(v)) for s, v in sorted(per_system.items())}}


def _attribution_summary(runs: list[list[dict]]) -> dict:
  """Attribution contrast per system, averaged over seeds, strongest first."""
  per_system = {}
  for rows in runs:
    for row in rows:
      if row["level"] == "system":
        per_system.setdefault(row["name"], []).append(float(row["contrast"]))
  ranked = sorted(((float(np.mean(v)), s) for s, v in per_system.items()), reverse=True)
  return {"system_contrast": {s: c for c, s in ranked}, "top_systems": [s for _, s in ranked[:3]]}


def _table(config: ml_collections.ConfigDict, done: dict, evaluation: str,
           scheme: str = "kfold") -> dict:
  """row -> scores and paired differences of one evaluation over every run, on the
  splits of `scheme` (kfold: corrected t-test; loso: plain paired t over seeds x sites)."""
  strategies = names(config.strategies)
  baselines = features.baseline_names(config.probe.get("baselines", ""))
  test_fraction = 1 / int(config.probe.folds) if scheme == "kfold" else 0.0
  extra = readouts.readout_names(config.probe.get("readouts", ""))
  # Rows: each strategy's encoder (and, probe only, its other read-outs "roi recon"),
  # then (probe only) the baselines of its first strategy and the read-outs' init twins.
  per_strategy = {s: {s: "encoder"} for s in strategies}
  twins = []
  if evaluation == "probe":
    for s in strategies:
      per_strategy[s].update({f"{s} {r}": r for r in extra})
    twins = [readouts.init_name(r) for r in extra] if "init" in baselines else []
  rows = [row for s in strategies for row in per_strategy[s]] + (
      baselines + twins if evaluation == "probe" else [])
  scores = {r: {m: {} for m in METRICS} for r in rows}
  for (strategy, seed), by_evaluation in done.items():
    sets = dict(per_strategy[strategy]) if evaluation == "probe" else {strategy: ""}
    if evaluation == "probe" and strategy == strategies[0]:
      sets.update({b: b for b in baselines + twins})
    for row, feature_set in sets.items():
      for metric, by_split in _split_scores(by_evaluation[evaluation], scheme,
                                            feature_set).items():
        scores[row][metric].update({(seed, split): v for split, v in by_split.items()})
  # The better classical baseline (by mean balanced accuracy on these splits).
  classical = [b for b in baselines if b in features.CLASSICAL and scores[b]["balanced_accuracy"]]
  best = max(classical, default=None,
             key=lambda b: np.mean(list(scores[b]["balanced_accuracy"].values())))
  table = {}
  for strategy in strategies:
    for row, readout in per_strategy[strategy].items():
      entry = {m: stats.describe(scores[row][m]) for m in METRICS}
      entry["interval"] = {m: stats.mean_interval(scores[row][m], test_fraction)
                           for m in METRICS}
      # The same read-out of the baseline strategy, of the initial weights, of
      # the same objective with random masking (roi_visible: random_visible), and
      # the better classical baseline.
      twin = masking_twin(strategy, strategies)
      pairs = {"vs_baseline": _same_readout(config.baseline, readout, strategies),
               "vs_init": _same_readout("init", readout, strategies),
               "vs_masking": (_same_readout(twin, readout, strategies)
                              if twin and twin != config.baseline else None),
               "vs_classical": best}
      for key, reference in pairs.items():
        if reference in scores and reference != row and (key != "vs_init" or
                                                          config.baseline != "init"):
          entry[key] = {m: stats.paired_difference(
              scores[row][m], scores[reference][m], test_fraction=test_fraction)
                        for m in METRICS}
          entry[key]["against"] = reference.split(" ")[0]  # its strategy or baseline
      table[row] = entry
  for row in rows[len(table):]:
    table[row] = {m: stats.describe(scores[row][m]) for m in METRICS}
    table[row]["interval"] = {m: stats.mean_interval(scores[row][m], test_fraction)
                              for m in METRICS}
  return table


def summarise(config: ml_collections.ConfigDict, done: dict) -> dict:
  """The comparison from every run's dicts ({(strategy, seed): {evaluation: dict}}):
  per-strategy scores, paired differences, region summaries, and with
  `config.budgets` the pretraining curve (curve.summarise)."""
  strategies = names(config.strategies)
  results = {"strategies": strategies,
             "baselines": features.baseline_names(config.probe.get("baselines", "")),
             "seeds": [int(s) for s in names(config.seeds)],
             "baseline": config.baseline, "folds": int(config.probe.folds),
             "repeats": int(config.probe.get("repeats", 1)), "evaluations": {},
             "readouts": readouts.readout_names(config.probe.get("readouts", ""))}
  budgets = [b for b in curve_budgets(config) if b > 0]
  at = lambda budget: {key: {**runs, "probe": curve.probe_at(
      runs, budget, budgets[0], key[0] == strategies[0])} for key, runs in done.items()}
  final = at(budgets[-1]) if budgets else done
  for evaluation in [e for e in ("probe", "finetune") if e in evaluations(config)
                     or (e == "probe" and budgets)]:
    results["evaluations"][evaluation] = _table(config, final, evaluation)
  if budgets:
    results["curve"] = curve.summarise(
        {b: _table(config, at(b), "probe") for b in budgets}, strategies,
        results["readouts"], results["baselines"])
    if "loso" in names(config.probe.get("schemes", "")):  # held-out sites, same runs
      results["curve_loso"] = curve.summarise(
          {b: _table(config, at(b), "probe", "loso") for b in budgets}, strategies,
          results["readouts"], results["baselines"], scheme="loso")
    if config.get("run_recovery"):
      results["recovery"] = curve.recovery_summary(done, [0] + budgets)
  if config.get("run_attribute"):
    for strategy in strategies:
      runs = [d["attribute"] for (s, _), d in sorted(done.items()) if s == strategy]
      results.setdefault("reconstruction_by_region", {})[strategy] = _region_summary(
          [r["reconstruction"] for r in runs])
      results.setdefault("attribution_by_system", {})[strategy] = _attribution_summary(
          [r["groups"] for r in runs])
  return results


def masking_twin(strategy: str, strategies: list[str]) -> str | None:
  """The strategy that differs from `strategy` by random masking alone, when it runs:
  roi -> random, roi_visible -> random_visible."""
  if not strategy.startswith("roi"):
    return None
  twin = "random" + strategy[len("roi"):]
  return twin if twin in strategies else None


def _same_readout(reference: str, readout: str, strategies: list[str]) -> str:
  """The row of `reference` (a strategy or a probe baseline) read out as `readout`."""
  if readout in ("encoder", ""):
    return reference
  if reference in strategies:
    return f"{reference} {readout}"
  return readouts.init_name(readout) if reference == "init" else reference


def _cell(summary: dict) -> str:
  return f"{summary['mean']:.3f} ± {summary['std']:.3f}"


def _difference(d: dict) -> str:
  return f"{d['mean']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}], p = {d['p']:.3g}"


def markdown(results: dict) -> str:
  """compare_table.md."""
  baseline, lines = results["baseline"], []
  shown = ("balanced_accuracy", "roc_auc")
  for evaluation, table in results["evaluations"].items():
    n = next(iter(table.values()))["roc_auc"]["n"]
    repeats = f" x {results['repeats']} repeats" if results.get("repeats", 1) > 1 else ""
    with_init = any("vs_init" in row for row in table.values())
    lines += [f"### {evaluation}: ADHD vs control, {len(results['seeds'])} seeds x "
              f"{results['folds']}-fold{repeats} ({n} paired scores per row)", "",
              "| features | balanced acc. | AUC | balanced acc. - " + baseline +
              " (95% CI, p) | AUC - " + baseline + " (95% CI, p) |" +
              (" balanced acc. - init (95% CI, p) | AUC - init (95% CI, p) |" if with_init
               else ""), "|---|---|---|---|---|" + ("---|---|" if with_init else "")]
    for name, row in table.items():
      label = (f"{name} encoder" if name in results["strategies"] else
               name if " " in name else f"{name} (baseline)")
      cells = [_cell(row[m]) for m in shown]
      for key in ("vs_baseline",) + (("vs_init",) if with_init else ()):
        reference = baseline if key == "vs_baseline" else "init"
        if key in row:
          cells += [_difference(row[key][m]) for m in shown]
        else:
          cells += ["(reference)" if name == reference or name.startswith(
              f"{reference} ") else "–"] * 2
      lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
  for key in ("curve", "curve_loso"):
    if results.get(key):
      lines += [curve.markdown(results[key], baseline)]
  if results.get("recovery"):
    lines += [curve.recovery_markdown(results["recovery"])]
  lines.append("Mean ± std over seeds x folds; baselines (classical features of the data, the "
               "randomly initialised encoder) are probed on the same subjects and splits. "
               "Differences are paired over (seed, fold); interval and p from the "
               "Nadeau-Bengio corrected resampled t-test (folds share training subjects).")
  if results.get("reconstruction_by_region"):
    lines += ["", "### reconstruction by region and attribution by system", "",
              "| strategy | mean region MSE | best regions | worst regions | top systems "
              "(attribution contrast) |", "|---|---|---|---|---|"]
    for strategy in results["strategies"]:
      rec = results["reconstruction_by_region"].get(strategy, {})
      att = results["attribution_by_system"].get(strategy, {})
      lines.append(f"| {strategy} | {rec.get('mean_mse', float('nan')):.3f} | "
                   f"{', '.join(rec.get('best', []))} | {', '.join(rec.get('worst', []))} | "
                   f"{', '.join(att.get('top_systems', []))} |")
  return "\n".join(lines) + "\n"
