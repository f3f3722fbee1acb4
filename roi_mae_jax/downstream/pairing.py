"""Paired differences between two probes on the same subjects and splits.

    a = load_probe("runs/probe_3000")                   # a probe workdir
    b = load_probe("runs/probe_1500", feature="recon_power")
    result = pair(a, b)
    result["differences"]["kfold"]["balanced_accuracy"]  # a - b: mean, ci_low, ci_high, p, n
    print(markdown_table(result))

A probe scores every feature set on the same splits (task `probe`). Two
probes of the same subjects, in the same order, with the same folds and
repeats score the same splits, so their per-split scores pair: a checkpoint
against a longer-trained one, region against random masking, one read-out
against another of the same probe. The differences use the probe's own tests
(downstream.stats): the corrected resampled t on k-fold, whose training sets
overlap, and the plain paired t across held-out sites. Probes of other
subjects or other splits are refused, naming the file and what differs.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import os
from typing import Sequence

import numpy as np

from roi_mae_jax import errors
from roi_mae_jax import outputs
from roi_mae_jax.downstream import stats

RESULTS_FILE = "probe_results.json"
PREDICTIONS_FILE = "probe_predictions.csv"
METRICS = ("balanced_accuracy", "roc_auc")


def subjects_digest(subjects: Sequence[str], labels: Sequence[int],
                    sites: Sequence[str]) -> str:
  """A short hash of the subjects in order with their labels and sites.

  Splits are drawn from the labels in this order, so equal digests (with equal
  folds and repeats) mean equal splits.
  """
  text = "\n".join(f"{s}\t{int(l)}\t{site}" for s, l, site in zip(subjects, labels, sites))
  return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class ProbeRun:
  """One feature set of one probe: its per-split scores and what fixes its splits."""
  path: str                          # the probe_results.json it was read from
  feature: str
  scores: dict[str, dict[str, dict[str, float]]]  # scheme -> split -> metric -> score
  meta: dict
  digest: str


def _digest_from_predictions(path: str, feature: str) -> str:
  """The subjects' digest from a probe's probe_predictions.csv (older probes' meta lacks
  it): the rows of `feature`'s first scheme, which are in the probe's subject order."""
  try:
    with open(path, encoding="utf-8", newline="") as f:
      rows = list(csv.DictReader(f))
  except OSError as e:
    raise errors.InputError(f"{path} cannot be read ({e}); it is needed to check that two "
                            "probes hold the same subjects") from None
  rows = [r for r in rows if r.get("features") == feature]
  if not rows:
    raise errors.InputError(f"{path} has no predictions of feature set {feature!r}")
  first = [r for r in rows if r["scheme"] == rows[0]["scheme"]]
  return subjects_digest([r["subject"] for r in first], [int(r["label"]) for r in first],
                         [r["site"] for r in first])


def load_probe(spec: str, feature: str = "") -> ProbeRun:
  """A probe's feature set: `spec` is a probe workdir or its probe_results.json,
  optionally followed by ':FEATURE' (default "encoder"); `feature` overrides it."""
  # the last ':' names the feature set, so a folder may hold one too
  path, _, named = spec.rpartition(":") if not os.path.exists(spec) else (spec, "", "")
  feature = feature or named or "encoder"
  if os.path.isdir(path):
    path = os.path.join(path, RESULTS_FILE)
  if not os.path.exists(path):
    raise errors.InputError(f"{path} does not exist: name a probe workdir (it holds "
                            f"{RESULTS_FILE}) or that file")
  results = outputs.read_json(path)
  if not isinstance(results, dict) or "splits" not in results or "meta" not in results:
    raise errors.InputError(f"{path} is not a probe's results (no 'splits' or 'meta'): "
                            "name a workdir of task probe")
  if feature not in results["splits"]:
    raise errors.InputError(f"{path} has no feature set {feature!r}; it has: "
                            f"{', '.join(sorted(results['splits']))}")
  scores = {scheme: {s["split"]: {m: float(s[m]) for m in METRICS} for s in per_split}
            for scheme, per_split in results["splits"][feature].items()}
  meta = results["meta"]
  digest = meta.get("subjects_digest") or _digest_from_predictions(
      os.path.join(os.path.dirname(path), PREDICTIONS_FILE), feature)
  return ProbeRun(path, feature, scores, meta, digest)


def _check_same_splits(a: ProbeRun, b: ProbeRun) -> list[str]:
  """The schemes both scored on the same splits; InputError when the subjects or the
  splits differ."""
  if a.digest != b.digest:
    raise errors.InputError(
        f"{a.path} and {b.path} probed different subjects (or the same in another order): "
        f"{a.meta.get('subjects')} and {b.meta.get('subjects')} subjects; pair probes of "
        "the same prepared data (data.shards) only")
  for key in ("folds", "repeats"):
    if a.meta.get(key) != b.meta.get(key):
      raise errors.InputError(f"{a.path} and {b.path} used different {key} "
                              f"({a.meta.get(key)} and {b.meta.get(key)}): their k-fold "
                              "splits do not pair")
  schemes = [s for s in a.scores if s in b.scores]
  if not schemes:
    raise errors.InputError(f"{a.path} ({', '.join(a.scores)}) and {b.path} "
                            f"({', '.join(b.scores)}) share no evaluation scheme")
  for scheme in schemes:
    if set(a.scores[scheme]) != set(b.scores[scheme]):
      raise errors.InputError(f"{a.path} and {b.path} scored different {scheme} splits")
  return schemes


def _test_fraction(run: ProbeRun, scheme: str) -> float:
  """n_test / n of one split, as the probe's own differences use it."""
  if scheme != "kfold":
    return 0.0  # held-out sites share no test subjects: the plain paired t
  stored = run.meta.get("test_fraction", {}).get(scheme)
  return float(stored) if stored else 1.0 / int(run.meta["folds"])


def pair(a: ProbeRun, b: ProbeRun) -> dict:
  """a - b on every shared scheme: {"a", "b": who; "differences": {scheme: {metric:
  stats.paired_difference}}; "means": {"a"|"b": {scheme: {metric: mean}}}}."""
  schemes = _check_same_splits(a, b)
  out = {"a": _who(a), "b": _who(b), "differences": {}, "means": {"a": {}, "b": {}}}
  for scheme in schemes:
    out["differences"][scheme] = {
        m: stats.paired_difference({k: v[m] for k, v in a.scores[scheme].items()},
                                   {k: v[m] for k, v in b.scores[scheme].items()},
                                   test_fraction=_test_fraction(a, scheme))
        for m in METRICS}
    for side, run in (("a", a), ("b", b)):
      out["means"][side][scheme] = {
          m: float(np.mean([v[m] for v in run.scores[scheme].values()])) for m in METRICS}
  return out


def _who(run: ProbeRun) -> dict:
  untrained = run.feature == "init" or run.feature.startswith(("init_", "init@"))
  return {"results": os.path.abspath(run.path), "feature": run.feature,
          "checkpoint": run.meta.get("checkpoint"),
          "step": 0 if untrained else run.meta.get("step"),  # init twins: initial weights
          "mask_strategy": run.meta.get("mask_strategy"), "subjects": run.meta.get("subjects")}


def _interval(d: dict) -> str:
  if not np.isfinite(d["mean"]) or not np.isfinite(d["ci_low"]):
    return f"{d['mean']:+.3f}" if np.isfinite(d["mean"]) else "–"
  return f"{d['mean']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"


def markdown_table(result: dict) -> str:
  """One row per scheme: both means and a - b with its 95% interval and p."""
  names = {side: f"{result[side]['feature']} (step {result[side]['step']}, "
                 f"{result[side]['mask_strategy']})" for side in ("a", "b")}
  lines = [f"a = {names['a']}: {result['a']['results']}",
           f"b = {names['b']}: {result['b']['results']}", "",
           "| scheme | splits | a: balanced acc. | b: balanced acc. | a - b (95% CI) | p "
           "| a - b, ROC AUC (95% CI) |", "|---|---|---|---|---|---|---|"]
  for scheme, by_metric in result["differences"].items():
    acc, auc = by_metric["balanced_accuracy"], by_metric["roc_auc"]
    lines.append(f"| {scheme} | {acc['n']} | {result['means']['a'][scheme]['balanced_accuracy']:.3f}"
                 f" | {result['means']['b'][scheme]['balanced_accuracy']:.3f} | "
                 f"{_interval(acc)} | {acc['p']:.3f} | {_interval(auc)} |")
  return "\n".join(lines) + "\n"
