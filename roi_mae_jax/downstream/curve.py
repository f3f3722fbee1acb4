"""The pretraining curve: probe scores at several budgets of one run per (strategy, seed).

    python -m roi_mae_jax.main --config=configs/compare_masking.py --workdir=runs/curve \
        --config.budgets=0,150,300,600,1500 --config.run_recovery=True

With `config.budgets` task `compare` pretrains each (strategy, seed) once, to
the largest budget, keeping a checkpoint at every budget, and probes each
("probe@150", ... in the run's results.json, reused when the command is
repeated). Budget 0 is the run's initial weights: the probe's `init` read-outs.
The classical baselines and `init` are probed once (first strategy, first
budget) and paired with every budget on the same splits.

    curve = summarise({150: table, 300: table}, ["roi", "random"], ["encoder@1"], baselines)
    curve["rows"]["roi encoder@1"]["points"]["300"]["balanced_accuracy"]  # mean, ci_low, ...
    print(markdown(curve))
"""

from __future__ import annotations

import numpy as np

from roi_mae_jax.downstream import readouts

SHOWN = ("balanced_accuracy", "roc_auc")
DIFFERENCES = ("vs_init", "vs_baseline", "vs_masking", "vs_classical")
SCHEMES = {"kfold": "k-fold", "loso": "leave-one-site-out"}


def budget_of(evaluation: str) -> int | None:
  """'probe@300' -> 300, 'recovery@0' -> 0; an evaluation without a budget -> None."""
  return int(evaluation.split("@", 1)[1]) if "@" in evaluation else None


def probe_at(runs: dict, budget: int, first_budget: int, with_baselines: bool) -> dict:
  """The probe dict of one run at `budget`, with (`with_baselines`) the baselines' and
  init's split scores of the first budget, where they were probed, merged in."""
  probe = dict(runs[f"probe@{budget}"])
  if with_baselines and budget != first_budget:
    splits = dict(runs[f"probe@{first_budget}"]["splits"])
    splits.update(probe["splits"])
    probe["splits"] = splits
  return probe


def _row(strategy: str, readout: str) -> str:
  return strategy if readout == "encoder" else f"{strategy} {readout}"


def summarise(tables: dict[int, dict], strategies: list[str], extra: list[str],
              baselines: list[str], scheme: str = "kfold") -> dict:
  """The curve from compare's probe table at each trained budget (on `scheme`'s splits).

  rows: "<strategy> <read-out>" -> points {budget: {metric: mean and 95% interval}}
  (budget 0: the read-out's init twin), vs_init, vs_baseline, vs_masking (the same
  objective with random masking) and vs_classical (the better classical baseline)
  {budget: {metric: paired difference}}; reference: the classical baselines' intervals.
  """
  budgets = sorted(tables)
  first = tables[budgets[0]]
  rows = {}
  for readout in ["encoder"] + list(extra):
    twin = "init" if readout == "encoder" else readouts.init_name(readout)
    for strategy in strategies:
      name = _row(strategy, readout)
      points = {str(b): tables[b][name]["interval"] for b in budgets}
      if twin in first and "init" in baselines:
        points = {"0": first[twin]["interval"], **points}
      rows[f"{strategy} {readout}"] = {
          "strategy": strategy, "readout": readout, "points": points,
          **{key: {str(b): tables[b][name][key] for b in budgets if key in tables[b][name]}
             for key in DIFFERENCES}}
  reference = {b: first[b]["interval"] for b in baselines if b != "init" and b in first}
  return {"budgets": ([0] if "init" in baselines else []) + budgets, "rows": rows,
          "reference": reference, "scheme": scheme}


def _interval(x: dict) -> str:
  return f"{x['mean']:.3f} [{x['ci_low']:.3f}, {x['ci_high']:.3f}]"


def _difference(x: dict) -> str:
  return f"{x['mean']:+.3f} [{x['ci_low']:+.3f}, {x['ci_high']:+.3f}]"


def markdown(curve: dict, baseline: str, metric: str = "balanced_accuracy") -> str:
  """Two tables: each read-out's score per budget; its differences per budget."""
  budgets = [str(b) for b in curve["budgets"]]
  head = "| " + " | ".join(budgets) + " |"
  rule = "|---|---|" + "---|" * len(budgets)
  scheme = SCHEMES[curve.get("scheme", "kfold")]
  lines = [f"### pretraining curve: {metric.replace('_', ' ')} ({scheme}, mean [95% CI]) by "
           "pretraining steps", "", "| read-out | strategy " + head, rule]
  for row in curve["rows"].values():
    cells = [_interval(row["points"][b][metric]) if b in row["points"] else "–"
             for b in budgets]
    lines.append(f"| {row['readout']} | {row['strategy']} | " + " | ".join(cells) + " |")
  for name, interval in curve["reference"].items():
    lines.append(f"| {name} (classical) | – | " +
                 " | ".join([_interval(interval[metric])] * len(budgets)) + " |")
  lines += ["", f"### pretraining curve: paired differences in {metric.replace('_', ' ')} "
            f"({scheme}, 95% CI)", "", "| read-out | difference " + head, rule]
  for row in curve["rows"].values():
    for key in DIFFERENCES:
      if row.get(key):
        against = {"vs_init": "init", "vs_baseline": baseline}.get(key) or next(
            d["against"] for d in row[key].values())
        cells = [_difference(row[key][b][metric]) if b in row[key] else "–" for b in budgets]
        lines.append(f"| {row['readout']} | {row['strategy']} - {against} | " +
                     " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def recovery_summary(done: dict, budgets: list[int]) -> dict:
  """Recovery R² (recovery.recover) averaged over seeds:
  {strategy: {budget: {component: {group: [per layer]}}}}."""
  out = {}
  for (strategy, _), runs in sorted(done.items()):
    for budget in budgets:
      summary = runs[f"recovery@{budget}"]["summary"]
      slot = out.setdefault(strategy, {}).setdefault(str(budget), {})
      for component, groups in summary.items():
        for group, per_layer in groups.items():
          slot.setdefault(component, {}).setdefault(group, []).append(per_layer)
  return {strategy: {budget: {component: {group: np.mean(values, axis=0).tolist()
                                          for group, values in groups.items()}
                              for component, groups in by_budget.items()}
                     for budget, by_budget in per_strategy.items()}
          for strategy, per_strategy in out.items()}


def recovery_markdown(recovery: dict) -> str:
  """Recovery R² per strategy, component and region group: a row per layer, budgets
  as columns."""
  lines = []
  for strategy, by_budget in recovery.items():
    budgets = sorted(by_budget, key=int)
    lines += [f"### what the {strategy} encoder keeps: held-out R² of a linear read-out of "
              "each region's synthetic components, by pretraining steps", "",
              "| component | regions | layer | " + " | ".join(budgets) + " |",
              "|---|---|---|" + "---|" * len(budgets)]
    first = by_budget[budgets[0]]
    for component, groups in first.items():
      for group, per_layer in groups.items():
        for layer in range(len(per_layer)):
          cells = [f"{by_budget[b][component][group][layer]:.3f}" for b in budgets]
          lines.append(f"| {component} | {group} | {layer} | " + " | ".join(cells) + " |")
    lines.append("")
  return "\n".join(lines)
