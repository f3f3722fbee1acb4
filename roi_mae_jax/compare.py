r"""Task `compare`: masking strategies head to head, as in the paper.

    python -m roi_mae_jax.main --config=configs/compare_masking.py --workdir=runs/compare
    python -m roi_mae_jax.main --config=configs/compare_masking.py --workdir=runs/compare \
        --config.strategies=roi,random,tube,roi_time --config.seeds=0,1,2
    # the paper's future work: region-weighted loss, adaptive region masking
    python -m roi_mae_jax.main --config=configs/compare_masking.py --workdir=runs/compare \
        --config.strategies=roi,random,roi_weighted,roi_adaptive

For each strategy and seed: pretrain (`config.pretrain`, its seed and masking
replaced), probe the frozen encoder (`config.probe`) on subject splits that are
the same for every run, optionally fine-tune (`config.finetune`) and attribute
(`config.attribute`: attribution by system and reconstruction by region). The
evaluations are the library's (probing, finetuning, region_attribution.explain); the
table is composed from the dicts they return. Each run lives in
WORKDIR/runs/<strategy>/seed<s>/: pretrain/ (checkpoints; an interrupted
pretraining resumes) and results.json (each evaluation's dict, kept as soon as
it is done and reused when the command is repeated). The synthetic subjects
depend on `data_seed` only, so every run sees the same subjects.

Writes WORKDIR/compare_results.json, compare_table.md and compare.png:
accuracy and AUC per strategy (mean, std over seeds x folds), paired
differences against `baseline` (default random) with a 95% interval and
p-value (corrected resampled t-test, see comparison_stats), and per strategy
reconstruction by region and attribution by system. With `probe.readouts`
(e.g. `recon,encoder@1`, see readouts.py) each strategy also gets a row per
read-out ("roi recon"), paired with the same read-out of the baseline
strategy and of the initial weights ("init_recon").
"""

from __future__ import annotations

import functools
import json
import math
import os
import time

import ml_collections
import numpy as np
from absl import logging

from roi_mae_jax import comparison_stats
from roi_mae_jax import config_lib
from roi_mae_jax import features
from roi_mae_jax import finetuning
from roi_mae_jax import metrics as metrics_lib
from roi_mae_jax import outputs
from roi_mae_jax import plots
from roi_mae_jax import preemption
from roi_mae_jax import pretrained as pretrained_lib
from roi_mae_jax import pretraining_curve
from roi_mae_jax import probing
from roi_mae_jax import readouts
from roi_mae_jax import recovery
from roi_mae_jax import region_attribution
from roi_mae_jax import tasks
from roi_mae_jax import train
from roi_mae_jax.data import sources

REQUIRED_KEYS = ("strategies", "seeds", "baseline", "pretrain", "probe")
OUTPUT_NAMES = ("compare_results.json", "compare_table.md", "compare.png")
CURVE_NAMES = ("compare_curve.png",)          # with config.budgets
RECOVERY_NAMES = ("compare_recovery.png",)    # with config.budgets and config.run_recovery
RESUMABLE_CHANGES = ("strategies", "seeds", "baseline", "run_finetune", "run_attribute",
                     "budgets", "run_recovery")
RUN_RESULTS = "results.json"  # per run: evaluation -> its dict
METRICS = {"balanced_accuracy": "balanced acc.", "roc_auc": "AUC", "accuracy": "accuracy"}

# Strategy name -> settings of the pretraining config it changes. The last two
# are the paper's future work (region_objectives): `roi_weighted` takes its loss
# weights from config.weighted_loss. The `_visible` pair also reconstructs the visible tokens.
VARIANTS = {
    "roi": {"mask.strategy": "roi"},
    "random": {"mask.strategy": "random"},
    "tube": {"mask.strategy": "tube"},
    "roi_time": {"mask.strategy": "roi_time"},
    "roi_weighted": {"mask.strategy": "roi"},
    "roi_adaptive": {"mask.strategy": "roi", "mask.adaptive": True},
    # The visible tokens' reconstruction joins the loss (region_objectives.visible_weight).
    "roi_visible": {"mask.strategy": "roi", "loss.visible_weight": 1.0},
    "random_visible": {"mask.strategy": "random", "loss.visible_weight": 1.0},
}


def _names(text: str) -> list[str]:
  return [n.strip() for n in str(text).split(",") if n.strip()]


def _set(config: ml_collections.ConfigDict, dotted: str, value) -> None:
  *parents, leaf = dotted.split(".")
  node = config
  for part in parents:
    node = node[part]
  node[leaf] = value


def plan_runs(config: ml_collections.ConfigDict) -> list[tuple[str, int]]:
  """(strategy, seed) pairs in the order they run (names checked by config_validation)."""
  seeds = [int(s) for s in _names(config.seeds)]
  return [(strategy, seed) for seed in seeds for strategy in _names(config.strategies)]


def pretrain_config(config: ml_collections.ConfigDict, strategy: str,
                    seed: int) -> ml_collections.ConfigDict:
  run = ml_collections.ConfigDict(config.pretrain.to_dict())
  run.seed = seed
  run.data.synthetic.data_seed = int(config.data_seed)  # the same subjects in every run
  run.data.streams = 1  # compare runs in one process; recorded as the run records it
  for key, value in VARIANTS[strategy].items():
    _set(run, key, value)
  if strategy == "roi_weighted":
    run.loss = ml_collections.ConfigDict(config.weighted_loss.to_dict())
  budgets = curve_budgets(config)
  if budgets:  # one run to the largest budget, a kept checkpoint at every budget
    trained = [b for b in budgets if b > 0]
    run.total_steps = max(trained)
    run.checkpoint_every = functools.reduce(math.gcd, trained)
    run.keep_checkpoints = run.total_steps // run.checkpoint_every
  return run


def curve_budgets(config: ml_collections.ConfigDict) -> list[int]:
  """config.budgets ('0,150,300') -> sorted steps; '' -> [] (no curve: the run's end).

  0 is the initial weights (the `init` read-outs); at least one budget must train."""
  return sorted(int(b) for b in _names(config.get("budgets", "")))


def _downstream(block: ml_collections.ConfigDict, checkpoint: str,
                **changes) -> ml_collections.ConfigDict:
  run = ml_collections.ConfigDict(block.to_dict())
  run.checkpoint = checkpoint
  run.update(changes)
  return run


def _pretrain_finished(workdir: str, config: ml_collections.ConfigDict) -> bool:
  """Whether `workdir` holds this very run, finished; another run there is refused."""
  path = os.path.join(workdir, "pretrain_summary.json")
  if not os.path.exists(path):
    return False
  outputs.write_config(workdir, config, may_differ=train.RESUMABLE_CHANGES)
  with open(path, encoding="utf-8") as f:
    return json.load(f).get("steps") == int(config.total_steps)


def evaluations(config: ml_collections.ConfigDict) -> list[str]:
  """The evaluations of every run, in order (with budgets: "probe@150", ...)."""
  budgets = [b for b in curve_budgets(config) if b > 0]
  probes = [f"probe@{b}" for b in budgets] or ["probe"]
  recovery = ([f"recovery@{b}" for b in [0] + budgets]
              if budgets and config.get("run_recovery") else [])
  return (probes + recovery + (["finetune"] if config.get("run_finetune") else []) +
          (["attribute"] if config.get("run_attribute") else []))


def evaluate_run(config: ml_collections.ConfigDict, evaluation: str,
                 pre: pretrained_lib.Pretrained, checkpoint: str,
                 with_baselines: bool) -> dict:
  """One evaluation of a pretrained encoder, as the dict the comparison keeps.

  probe: probing.probe_encoder's results (without the out-of-fold arrays);
  finetune: finetuning.FineTuning's cross-validation; attribute: the groups,
  reconstruction rows and summary of region_attribution.explain.
  """
  if evaluation.startswith("probe"):
    # The classical baselines do not depend on the strategy (init is the seed's
    # initial encoder, the same for every strategy) nor on the budget: only the
    # first strategy's first probe runs them.
    block = _downstream(config.probe, checkpoint, checkpoint_step=pre.step,
                        **({} if with_baselines else {"baselines": ""}))
    results, _ = probing.probe_encoder(block, pre, sources.downstream_source(
        pre.config, block.data))
    results.pop("oof")
    return results
  if evaluation.startswith("recovery"):
    return recovery.recover(pre, sources.downstream_source(pre.config, config.probe.data),
                            batch_size=int(config.probe.batch_size))
  if evaluation == "finetune":
    block = _downstream(config.finetune, checkpoint)
    return finetuning.FineTuning(block, pre, sources.downstream_source(
        pre.config, block.data)).cross_validate()
  block = _downstream(config.attribute, checkpoint)
  result = region_attribution.explain(block, pre,
                                      sources.downstream_source(pre.config, block.data))
  return {key: result[key] for key in ("groups", "reconstruction", "summary")}


@functools.lru_cache(maxsize=2)
def _encoder_at(pretrain_dir: str, step: int | None) -> pretrained_lib.Pretrained:
  """The run's encoder at `step` (None: its newest checkpoint; 0: its initial weights)."""
  if step == 0:
    return pretrained_lib.random_init(pretrained_lib.load_pretrained(pretrain_dir))
  return pretrained_lib.load_pretrained(pretrain_dir, step)


def _run_one(config: ml_collections.ConfigDict, strategy: str, seed: int, root: str,
             label: str) -> tuple[dict, bool]:
  """(evaluation -> its dict, whether anything was computed) of one (strategy, seed).

  Pretraining is a run of its own (WORKDIR/runs/<strategy>/seed<s>/pretrain,
  resumable); the evaluations' dicts are kept in results.json beside it, so a
  repeated command reuses them.
  """
  base = os.path.join(root, "runs", strategy, f"seed{seed}")
  pretrain_dir = os.path.join(base, "pretrain")
  pretrain = pretrain_config(config, strategy, seed)
  did_work = False
  if _pretrain_finished(pretrain_dir, pretrain):
    logging.info("%s: pretraining reused from %s", label, pretrain_dir)
  else:
    logging.info("%s: pretraining in %s", label, pretrain_dir)
    tasks.run_task(pretrain, pretrain_dir)
    did_work = True
  path = os.path.join(base, RUN_RESULTS)
  kept = outputs.read_json(path) if os.path.exists(path) else {}
  missing = [e for e in evaluations(config) if e not in kept]
  if missing:
    first = _names(config.strategies)[0]
    first_probe = evaluations(config)[0]
    for evaluation in missing:
      preemption.check(f"before {label}: {evaluation}",
                       f"the finished pretraining and evaluations are kept under {base}: "
                       "re-run the same command to go on")
      logging.info("%s: %s", label, evaluation)
      pre = _encoder_at(pretrain_dir, pretraining_curve.budget_of(evaluation))
      kept[evaluation] = evaluate_run(config, evaluation, pre, pretrain_dir,
                                      strategy == first and evaluation == first_probe)
      outputs.write_json(path, kept)  # each evaluation is kept as soon as it is done
    kept = outputs.read_json(path)  # as a repeated command will see them
    did_work = True
  for evaluation in evaluations(config):
    if evaluation not in missing:
      logging.info("%s: %s reused from %s", label, evaluation, path)
  return {e: kept[e] for e in evaluations(config)}, did_work


def run_all(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or reuses) every run; returns {(strategy, seed): {evaluation: its dict}}.

  SIGTERM / Ctrl-C: a pretraining saves the step it reached; otherwise the run
  stops before its next evaluation (finished ones are kept) with `errors.Stopped`.
  """
  runs = plan_runs(config)
  done = {}
  start, worked = time.time(), 0  # the eta counts runs that did work, not reused ones
  with preemption.StopOnSignal():  # pretraining installs its own while it runs
    for n, (strategy, seed) in enumerate(runs, start=1):
      label = f"run {n}/{len(runs)} ({strategy}, seed {seed})"
      done[(strategy, seed)], did_work = _run_one(config, strategy, seed, workdir, label)
      worked += did_work
      elapsed = time.time() - start
      eta = elapsed / worked * (len(runs) - n) if worked else 0.0
      logging.info("compare: %d/%d runs done, %s elapsed, eta %s", n, len(runs),
                   metrics_lib.duration(elapsed), metrics_lib.duration(eta))
  return done


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


def _table(config: ml_collections.ConfigDict, done: dict, evaluation: str) -> dict:
  """row -> scores and paired differences of one evaluation over every run."""
  strategies = _names(config.strategies)
  baselines = features.baseline_names(config.probe.get("baselines", ""))
  folds = int(config.probe.folds)
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
      for metric, by_split in _split_scores(by_evaluation[evaluation], "kfold",
                                            feature_set).items():
        scores[row][metric].update({(seed, split): v for split, v in by_split.items()})
  table = {}
  for strategy in strategies:
    for row, readout in per_strategy[strategy].items():
      entry = {m: comparison_stats.describe(scores[row][m]) for m in METRICS}
      entry["interval"] = {m: comparison_stats.mean_interval(scores[row][m], 1 / folds)
                           for m in METRICS}
      # The same read-out of the baseline strategy, and of the initial weights.
      pairs = {"vs_baseline": _same_readout(config.baseline, readout, strategies),
               "vs_init": _same_readout("init", readout, strategies)}
      for key, reference in pairs.items():
        if reference in scores and reference != row and (key == "vs_baseline" or
                                                          config.baseline != "init"):
          entry[key] = {m: comparison_stats.paired_difference(
              scores[row][m], scores[reference][m], test_fraction=1 / folds)
                        for m in METRICS}
      table[row] = entry
  for row in rows[len(table):]:
    table[row] = {m: comparison_stats.describe(scores[row][m]) for m in METRICS}
    table[row]["interval"] = {m: comparison_stats.mean_interval(scores[row][m], 1 / folds)
                              for m in METRICS}
  return table


def summarise(config: ml_collections.ConfigDict, done: dict) -> dict:
  """The comparison from every run's dicts ({(strategy, seed): {evaluation: dict}}):
  per-strategy scores, paired differences, region summaries, and with
  `config.budgets` the pretraining curve (pretraining_curve.summarise)."""
  strategies = _names(config.strategies)
  results = {"strategies": strategies,
             "baselines": features.baseline_names(config.probe.get("baselines", "")),
             "seeds": [int(s) for s in _names(config.seeds)],
             "baseline": config.baseline, "folds": int(config.probe.folds),
             "repeats": int(config.probe.get("repeats", 1)), "evaluations": {},
             "readouts": readouts.readout_names(config.probe.get("readouts", ""))}
  budgets = [b for b in curve_budgets(config) if b > 0]
  at = lambda budget: {key: {**runs, "probe": pretraining_curve.probe_at(
      runs, budget, budgets[0], key[0] == strategies[0])} for key, runs in done.items()}
  final = at(budgets[-1]) if budgets else done
  for evaluation in [e for e in ("probe", "finetune") if e in evaluations(config)
                     or (e == "probe" and budgets)]:
    results["evaluations"][evaluation] = _table(config, final, evaluation)
  if budgets:
    results["curve"] = pretraining_curve.summarise(
        {b: _table(config, at(b), "probe") for b in budgets}, strategies,
        results["readouts"], results["baselines"])
    if config.get("run_recovery"):
      results["recovery"] = pretraining_curve.recovery_summary(done, [0] + budgets)
  if config.get("run_attribute"):
    for strategy in strategies:
      runs = [d["attribute"] for (s, _), d in sorted(done.items()) if s == strategy]
      results.setdefault("reconstruction_by_region", {})[strategy] = _region_summary(
          [r["reconstruction"] for r in runs])
      results.setdefault("attribution_by_system", {})[strategy] = _attribution_summary(
          [r["groups"] for r in runs])
  return results


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
  baselines = results.get("baselines", [])
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
  if results.get("curve"):
    lines += [pretraining_curve.markdown(results["curve"], baseline)]
  if results.get("recovery"):
    lines += [pretraining_curve.recovery_markdown(results["recovery"])]
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


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  config_lib.require(config.pretrain, ("total_steps", "mask.strategy"), "compare (pretrain)")
  # Finished runs are reused only under the same task settings; more strategies,
  # seeds or evaluations may be added to a comparison.
  outputs.write_config(workdir, config, may_differ=RESUMABLE_CHANGES,
                       hint=" (or add strategies/seeds to this one)")
  done = run_all(config, workdir)
  results = summarise(config, done)
  names = OUTPUT_NAMES + (CURVE_NAMES if "curve" in results else ()) + (
      RECOVERY_NAMES if "recovery" in results else ())
  paths = dict(zip(names, outputs.claim(workdir, names, overwrite=True)))
  outputs.write_json(paths["compare_results.json"], results)
  table = markdown(results)
  with open(paths["compare_table.md"], "w", encoding="utf-8") as f:
    f.write(table)
  plots.save(plots.compare_figure(results), paths["compare.png"])
  if "curve" in results:
    plots.save(plots.pretraining_curve_figure(results["curve"]), paths["compare_curve.png"])
  if "recovery" in results:
    plots.save(plots.recovery_figure(results["recovery"]), paths["compare_recovery.png"])
  logging.info("comparison:\n%s", table)
