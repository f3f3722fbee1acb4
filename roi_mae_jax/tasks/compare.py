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
evaluations are the library's (probing, finetuning, regions.explain); the
table is composed from the dicts they return. Each run lives in
WORKDIR/runs/<strategy>/seed<s>/: pretrain/ (checkpoints; an interrupted
pretraining resumes) and results.json (each evaluation's dict, kept as soon as
it is done and reused when the command is repeated). The synthetic subjects
depend on `data_seed` only, so every run sees the same subjects.

Writes WORKDIR/compare_results.json, compare_table.md and compare.png:
accuracy and AUC per strategy (mean, std over seeds x folds), paired
differences against `baseline` (default random) with a 95% interval and
p-value (corrected resampled t-test, see downstream.stats), and per strategy
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
from absl import logging

from roi_mae_jax import metrics as metrics_lib
from roi_mae_jax import outputs
from roi_mae_jax import plots
from roi_mae_jax import preemption
from roi_mae_jax import tasks
from roi_mae_jax.config import blocks
from roi_mae_jax.data import sources
from roi_mae_jax.data import synthetic
from roi_mae_jax.downstream import comparison
from roi_mae_jax.downstream import curve
from roi_mae_jax.downstream import end_to_end
from roi_mae_jax.downstream import evaluation
from roi_mae_jax.downstream import pretrained as pretrained_lib
from roi_mae_jax.explain import recovery
from roi_mae_jax.explain import regions
from roi_mae_jax.tasks import pretrain

REQUIRED_KEYS = ("strategies", "seeds", "baseline", "pretrain", "probe")
OUTPUT_NAMES = ("compare_results.json", "compare_table.md", "compare.png")
CURVE_NAMES = ("compare_curve.png",)          # with config.budgets
RECOVERY_NAMES = ("compare_recovery.png",)    # with config.budgets and config.run_recovery
RESUMABLE_CHANGES = ("strategies", "seeds", "baseline", "run_finetune", "run_attribute",
                     "budgets", "run_recovery")
RUN_RESULTS = "results.json"  # per run: evaluation -> its dict

# Strategy name -> settings of the pretraining config it changes. The last two
# are the paper's future work (masking.objectives): `roi_weighted` takes its loss
# weights from config.weighted_loss. The `_visible` pair also reconstructs the visible tokens.
VARIANTS = {
    "roi": {"mask.strategy": "roi"},
    "random": {"mask.strategy": "random"},
    "tube": {"mask.strategy": "tube"},
    "roi_time": {"mask.strategy": "roi_time"},
    "roi_weighted": {"mask.strategy": "roi"},
    "roi_adaptive": {"mask.strategy": "roi", "mask.adaptive": True},
    # The visible tokens' reconstruction joins the loss (masking.objectives.visible_weight).
    "roi_visible": {"mask.strategy": "roi", "loss.visible_weight": 1.0},
    "random_visible": {"mask.strategy": "random", "loss.visible_weight": 1.0},
}


def _set(config: ml_collections.ConfigDict, dotted: str, value) -> None:
  *parents, leaf = dotted.split(".")
  node = config
  for part in parents:
    node = node[part]
  node[leaf] = value


def plan_runs(config: ml_collections.ConfigDict) -> list[tuple[str, int]]:
  """(strategy, seed) pairs in the order they run (names checked by config.validation)."""
  seeds = [int(s) for s in comparison.names(config.seeds)]
  return [(strategy, seed) for seed in seeds for strategy in comparison.names(config.strategies)]


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
  budgets = comparison.curve_budgets(config)
  if budgets:  # one run to the largest budget, a kept checkpoint at every budget
    trained = [b for b in budgets if b > 0]
    run.total_steps = max(trained)
    run.checkpoint_every = functools.reduce(math.gcd, trained)
    run.keep_checkpoints = run.total_steps // run.checkpoint_every
  return run


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
  outputs.write_config(workdir, config, may_differ=pretrain.RESUMABLE_CHANGES)
  with open(path, encoding="utf-8") as f:
    return json.load(f).get("steps") == int(config.total_steps)


def evaluate_run(config: ml_collections.ConfigDict, job: str,
                 pre: pretrained_lib.Pretrained, checkpoint: str,
                 with_baselines: bool) -> dict:
  """One evaluation (`job`: "probe@150", "recovery@0", "finetune", ...) of a pretrained encoder, as the dict the comparison keeps.

  probe: evaluation.probe_encoder's results (without the out-of-fold arrays);
  finetune: end_to_end.FineTuning's cross-validation; attribute: the groups,
  reconstruction rows and summary of regions.explain.
  """
  if job.startswith("probe"):
    # The classical baselines do not depend on the strategy (init is the seed's
    # initial encoder, the same for every strategy) nor on the budget: only the
    # first strategy's first probe runs them.
    block = _downstream(config.probe, checkpoint, checkpoint_step=pre.step,
                        **({} if with_baselines else {"baselines": ""}))
    results, _ = evaluation.probe_encoder(block, pre, sources.downstream_source(
        pre.config, block.data))
    results.pop("oof")
    return results
  if job.startswith("recovery"):
    return recovery.recover(pre, sources.downstream_source(pre.config, config.probe.data),
                            batch_size=int(config.probe.batch_size))
  if job == "finetune":
    block = _downstream(config.finetune, checkpoint)
    return end_to_end.FineTuning(block, pre, sources.downstream_source(
        pre.config, block.data)).cross_validate()
  block = _downstream(config.attribute, checkpoint)
  result = regions.explain(block, pre,
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
  run_config = pretrain_config(config, strategy, seed)
  did_work = False
  if _pretrain_finished(pretrain_dir, run_config):
    logging.info("%s: pretraining reused from %s", label, pretrain_dir)
  else:
    logging.info("%s: pretraining in %s", label, pretrain_dir)
    tasks.run_task(run_config, pretrain_dir)
    did_work = True
  path = os.path.join(base, RUN_RESULTS)
  kept = outputs.read_json(path) if os.path.exists(path) else {}
  missing = [e for e in comparison.evaluations(config) if e not in kept]
  if missing:
    first = comparison.names(config.strategies)[0]
    first_probe = comparison.evaluations(config)[0]
    for job in missing:
      preemption.check(f"before {label}: {job}",
                       f"the finished pretraining and evaluations are kept under {base}: "
                       "re-run the same command to go on")
      logging.info("%s: %s", label, job)
      pre = _encoder_at(pretrain_dir, curve.budget_of(job))
      kept[job] = evaluate_run(config, job, pre, pretrain_dir,
                               strategy == first and job == first_probe)
      outputs.write_json(path, kept)  # each evaluation is kept as soon as it is done
    kept = outputs.read_json(path)  # as a repeated command will see them
    did_work = True
  for job in comparison.evaluations(config):
    if job not in missing:
      logging.info("%s: %s reused from %s", label, job, path)
  return {e: kept[e] for e in comparison.evaluations(config)}, did_work


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


def with_preset(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` whose pretraining and evaluation blocks all get the synthetic
  effect `config.synthetic_preset` (data/synthetic.py PRESETS); '' changes nothing."""
  config = ml_collections.ConfigDict(config.to_dict())
  preset = config.get("synthetic_preset", "")
  if preset:
    synthetic.apply_preset(config.pretrain.data.synthetic, preset)
    for name in ("probe", "finetune", "attribute"):
      config[name].data.synthetic_preset = preset
  return config


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  blocks.require(config.pretrain, ("total_steps", "mask.strategy"), "compare (pretrain)")
  # Finished runs are reused only under the same task settings; more strategies,
  # seeds or evaluations may be added to a comparison.
  outputs.write_config(workdir, config, may_differ=RESUMABLE_CHANGES,
                       hint=" (or add strategies/seeds to this one)")
  config = with_preset(config)
  done = run_all(config, workdir)
  results = comparison.summarise(config, done)
  names = OUTPUT_NAMES + (CURVE_NAMES if "curve" in results else ()) + (
      RECOVERY_NAMES if "recovery" in results else ())
  paths = dict(zip(names, outputs.claim(workdir, names, overwrite=True)))
  outputs.write_json(paths["compare_results.json"], results)
  table = comparison.markdown(results)
  with open(paths["compare_table.md"], "w", encoding="utf-8") as f:
    f.write(table)
  plots.save(plots.compare_figure(results), paths["compare.png"])
  if "curve" in results:
    plots.save(plots.pretraining_curve_figure(results["curve"]), paths["compare_curve.png"])
  if "recovery" in results:
    plots.save(plots.recovery_figure(results["recovery"]), paths["compare_recovery.png"])
  logging.info("comparison:\n%s", table)
