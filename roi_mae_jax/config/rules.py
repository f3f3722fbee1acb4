"""Every rule a config value must keep, registered by the key it checks.

    @_value("mask.strategy", tasks=("pretrain",))
    def _mask_strategy(path, value): ...      # what is wrong with the value, or None

VALUES maps a key (its last dotted parts) to the rule of its values; BLOCKS
maps a name to a rule tying the keys of one block together; REMOVED names
keys that no longer exist and what replaced them. `validation` applies them.

Rules read the names they allow from the modules that own them (mae.SIZES,
features.POOLS, ...), imported when a rule first runs: this module imports
nothing of the package, so every layer can check a value, and the
CLI parses its flags before jax is imported.
"""


from __future__ import annotations

import dataclasses
import importlib
import math
import re
from typing import Any, Callable, Mapping

import ml_collections


# (path, value, **facts) -> what is wrong with the value, or None.
Problem = Callable[..., "str | None"]
# (block, path of the block) -> what is wrong with the block's keys together.
BlockProblems = Callable[[Mapping, str], "list[str]"]
BLOCK_TYPES = (ml_collections.ConfigDict, dict)  # a ConfigDict is not a collections Mapping

DOWNSTREAM = ("probe", "finetune", "attribute")
# 'encoder@1+2' in config.readouts: the pool over those encoder blocks' outputs.
LAYER_READOUT = re.compile(r"^encoder@(\d+(?:\+\d+)*)$")


@dataclasses.dataclass(frozen=True)
class Rule:
  """A value's rule; `facts`: what it can also be checked against once loaded."""
  problem: Problem
  tasks: tuple[str, ...] = ()   # () : every task
  facts: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class BlockRule:
  """Keys of one block checked together; `block` is its last dotted parts ('': a task's)."""
  problems: BlockProblems
  block: str = ""
  tasks: tuple[str, ...] = ()


VALUES: dict[str, Rule] = {}
BLOCKS: dict[str, BlockRule] = {}

# Keys earlier versions had: an old config that sets one gets why, not a silent no-op.
REMOVED: dict[str, str] = {
    "jax_probe": "the JAX logistic probe was removed: the scikit-learn probe, fitted in the "
                 "span of the training rows, is exact at every C and faster; remove the setting",
}


def _table(module: str, name: str) -> Any:
  """`roi_mae_jax.<module>.<name>`, imported on first use."""
  return getattr(importlib.import_module(f"roi_mae_jax.{module}"), name)


def _holds(test: Callable[[Any], bool], value: Any) -> bool:
  try:
    return bool(test(value))
  except (TypeError, ValueError):  # e.g. int('x'): not a value of the kind wanted
    return False


def _value(key: str, tasks: tuple[str, ...] = (), facts: tuple[str, ...] = ()):
  """Registers the decorated `problem(path, value, **facts)` as the rule of `key`."""
  def register(problem: Problem) -> Problem:
    VALUES[key] = Rule(problem, tasks, facts)
    return problem
  return register


def _block(name: str, block: str = "", tasks: tuple[str, ...] = ()):
  """Registers the decorated `problems(block, path)` as the block rule `name`."""
  def register(problems: BlockProblems) -> BlockProblems:
    BLOCKS[name] = BlockRule(problems, block, tasks)
    return problems
  return register


def _must(test: Callable[[Any], bool], what: str) -> Problem:
  """The common form: 'config.<path> = <value> must be <what>'."""
  def problem(path: str, value: Any) -> str | None:
    return None if _holds(test, value) else f"config.{path} = {value!r} must be {what}"
  return problem


def _whole(minimum: int) -> Problem:
  return _must(lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= minimum,
               f"a whole number >= {minimum}")


def _positive_number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _as_float(value: Any) -> Any:
  """float(value) where it is a number (messages print what the check read)."""
  return float(value) if _holds(float, value) else value


def _items(text: Any, sep: str = ",") -> list[str]:
  return [n.strip() for n in str(text).split(sep) if n.strip()]


_POSITIVE = _must(_positive_number, "a finite number > 0")
_NON_NEGATIVE = _must(lambda v: _positive_number(v) or (v == 0 and not isinstance(v, bool)),
                      "a finite number >= 0 (0: none)")
_RATIO = _must(lambda v: isinstance(v, (int, float)) and 0 < v < 1,
               "between 0 and 1 (exclusive)")

# --- Counts, steps, rates (every task) -------------------------------------------

for _key, _problem in {
    "total_steps": _whole(1),
    "frames": _whole(1),
    "log_every": _whole(1),
    "checkpoint_every": _whole(1),
    "keep_checkpoints": _whole(1),
    "steps": _whole(1),
    "patches.size": _whole(1),
    "data.windows_per_subject": _whole(1),
    "synthetic.num_subjects": _whole(1),
    "synthetic.run_frames": _whole(1),
    "optim.warmup_steps": _whole(0),
    "workers": _whole(0),
    "registration.min_inside": _RATIO,
    "registration.min_dice": _RATIO,
    "registration.brain_threshold": _RATIO,
    "registration.warn_margin": _NON_NEGATIVE,
    "data.read_threads": _whole(0),
    "data.prefetch": _whole(0),
    "data.prefetch_workers": _whole(0),
    "data.streams": _whole(0),
    "fault_kill_after_step": _whole(0),
    "fault_kill_after_scans": _whole(0),
    "stride": _whole(0),
    "max_windows": _whole(0),
    "clip_windows": _whole(1),
    "folds": _whole(2),
    "repeats": _whole(1),
    "inner_folds": _whole(2),
    "ig_steps": _whole(1),
    "ig_chunk": _whole(1),
    "recon_rounds": _whole(1),
    "learning_rate": _POSITIVE,
    "grid.voxel_size_mm": _POSITIVE,
    "tr": _POSITIVE,
    "mask.ratio": _RATIO,
    "denoise.high_pass": _NON_NEGATIVE,
    "denoise.low_pass": _NON_NEGATIVE,
    "denoise.detrend": _must(lambda v: isinstance(v, bool), "True or False"),
}.items():
  VALUES[_key] = Rule(_problem)


@_value("batch_size", facts=("divisor", "processes"))
def _batch_size(path: str, value: Any, divisor: int | None = None,
                processes: int | None = None) -> str | None:
  """With the mesh (`divisor` = data x fsdp) and the process count: it must split evenly."""
  problem = _whole(1)(path, value)
  if problem or divisor is None:
    return problem
  if value % divisor or value % processes:
    return (f"batch_size {value} must be a multiple of data x fsdp = {divisor} "
            f"and of the {processes} processes")
  return None


# --- Grid, patches, data ---------------------------------------------------------

VALUES["grid.orientation"] = Rule(_must(lambda v: str(v).upper() in ("RAS", "LAS"),
                                       "'RAS' or 'LAS' (either case)"))


# Voxel axes of written scans: one of L/R, A/P, S/I per axis, e.g. LAS or RPI.
_AXIS_OF_LETTER = {"L": 0, "R": 0, "A": 1, "P": 1, "S": 2, "I": 2}
VALUES["orientation"] = Rule(_must(
    lambda v: sorted(_AXIS_OF_LETTER.get(c, -1) for c in str(v).upper()) == [0, 1, 2],
    "three axis letters, one of L/R, A/P and S/I each, e.g. 'LAS'"), tasks=("synthesize",))
# pair_probes: the two probes to pair ('' is unset, which blocks.require reports).
VALUES.update(dict.fromkeys(("a", "b"), Rule(_must(
    lambda v: v == "" or (v.strip() != "" and not v.rstrip().endswith(":")),
    "a probe workdir, optionally with ':FEATURE', e.g. 'runs/probe:recon_power'"),
    tasks=("pair_probes",))))


@_value("grid.shape")
def _grid_shape(path: str, value: Any) -> str | None:
  try:
    shape = tuple(int(s) for s in value)
  except (TypeError, ValueError):
    shape = value
  if not isinstance(shape, tuple) or len(shape) != 3 or min(shape) < 1:
    return f"grid.shape must be three positive integers, got {shape}"
  return None


@_value("patches.assignment")
def _assignment(path: str, value: Any) -> str | None:
  assignments = _table("brain.patches", "ASSIGNMENTS")
  if value not in assignments:
    return f"patches.assignment must be one of {assignments}, got {value!r}"
  return None


@_value("patches.brain_threshold")
def _patch_brain_threshold(path: str, value: Any) -> str | None:
  if not _holds(lambda v: 0.0 <= v < 1.0, value):
    return f"patches.brain_threshold must be in [0, 1), got {value}"
  return None


@_value("synthetic.num_sites")
def _num_sites(path: str, value: Any) -> str | None:
  sites = _table("data.synthetic", "SITES")
  if not _holds(lambda v: 1 <= v <= len(sites), value):
    return f"data.synthetic.num_sites must be 1..{len(sites)}"
  return None


@_value("synthetic_preset")
def _synthetic_preset(path: str, value: Any) -> str | None:
  """'' keeps pretraining's effect."""
  presets = _table("data.synthetic", "PRESETS")
  if value and value not in presets:
    return f"unknown synthetic preset {value!r}; known: {', '.join(presets)}"
  return None


@_value("distributed.mode")
def _distributed_mode(path: str, value: Any) -> str | None:
  modes = _table("devices.distributed", "MODES")
  if value not in modes:
    return f"distributed.mode={value!r}; expected one of {', '.join(modes)}"
  return None


@_block("mesh", block="mesh")
def _mesh(block: Mapping, path: str) -> list[str]:
  axes = _table("devices.sharding", "AXES")
  try:
    sizes = [int(block[a]) for a in axes]
  except (KeyError, TypeError, ValueError):
    return []  # a missing axis is `require`'s; mesh_shape reads a complete block
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    return [f"config.mesh {dict(zip(axes, sizes))}: sizes must be >= 1, with at most one -1"]
  return []


@_block("synthetic_frames")
def _synthetic_frames(block: Mapping, path: str) -> list[str]:
  """A window must fit the synthetic runs it is cut from."""
  prefix = f"{path}." if path else ""
  data, frames = block.get("data"), block.get("frames")
  if isinstance(data, BLOCK_TYPES) and not data.get("shards") and "synthetic" in data and \
      isinstance(frames, int):
    run = data["synthetic"].get("run_frames")
    if isinstance(run, int) and frames > run:
      return [f"config.{prefix}frames = {frames} is longer than every synthetic run "
              f"(config.{prefix}data.synthetic.run_frames = {run}); lower frames or "
              "raise run_frames"]
  return []


@_block("frames_per_token", tasks=("pretrain", "show_masks"))
def _frames_per_token(block: Mapping, path: str) -> list[str]:
  """A window is cut into tokens of patches.frames frames."""
  frames, patches = block.get("frames"), block.get("patches")
  if isinstance(frames, int) and isinstance(patches, BLOCK_TYPES):
    per = patches.get("frames", 1)
    if isinstance(per, int) and per >= 1 and frames % per:
      return [f"frames={frames} is not a multiple of patches.frames={per}"]
  return []


# --- Prepare ---------------------------------------------------------------------

@_value("denoise.apply")
def _denoise_apply(path: str, value: Any) -> str | None:
  apply = _table("data.denoise", "APPLY")
  return _must(lambda v: v in apply, "one of " + ", ".join(map(repr, apply)))(path, value)


@_value("denoise.strategy")
def _denoise_strategy(path: str, value: Any) -> str | None:
  presets = _table("data.denoise", "STRATEGIES")
  return _must(lambda v: v in presets,
               "one of nilearn's load_confounds_strategy presets that read fMRIPrep's "
               "desc-preproc_bold files: " + ", ".join(map(repr, presets)))(path, value)


VALUES["space"] = Rule(_must(
    lambda v: isinstance(v, str) and " " not in v and "space-" not in v,
    "a template name as in fMRIPrep's space- entity, e.g. 'MNI152NLin2009cAsym' (or '' when "
    "each run has one space)"))


@_block("denoise_band", block="denoise")
def _denoise_band(block: Mapping, path: str) -> list[str]:
  high, low = block.get("high_pass"), block.get("low_pass")
  if _positive_number(high) and _positive_number(low) and high >= low:
    return [f"config.{path}.high_pass = {high} must be below config.{path}.low_pass = {low} "
            "(Hz; 0 leaves a side open)"]
  return []


@_value("normalise", tasks=("prepare",))
def _normalise(path: str, value: Any) -> str | None:
  modes = _table("data.resample", "NORMALISATIONS")
  if value not in modes:
    return f"config.normalise must be one of {modes}, got {value!r}"
  return None


@_value("source", tasks=("prepare",))
def _source(path: str, value: Any) -> str | None:
  sources = _table("data.layouts", "SOURCES")
  if value not in sources:
    return f"config.source must be one of {', '.join(sources)}, got {value!r}"
  return None


@_block("manifest", tasks=("prepare",))
def _manifest(block: Mapping, path: str) -> list[str]:
  if block.get("source") == "manifest" and not block.get("manifest"):
    return ["source 'manifest' needs --config.manifest=CSV"]
  return []


@_value("label_values", tasks=("prepare",))
def _label_values(path: str, value: Any) -> str | None:
  """'0=0,1=1,2=1': each label of the table -> 0 (control) or 1 (ADHD)."""
  for item in _items(value):
    _, sep, label = item.partition("=")
    if not sep or label.strip() not in ("0", "1"):
      return f"config.label_values: {item!r} is not VALUE=0 or VALUE=1"
  return None


# --- Model -----------------------------------------------------------------------

def _one_of(key: str, module: str, table: str) -> Problem:
  """'model.size must be one of tiny, small, base, got 'huge''."""
  def problem(path: str, value: Any) -> str | None:
    names = _table(module, table)
    return None if value in names else f"{key} must be one of {', '.join(names)}, got {value!r}"
  return problem


def _true_or_false(key: str) -> Problem:
  def problem(path: str, value: Any) -> str | None:
    return None if isinstance(value, bool) else f"{key} must be True or False, got {value!r}"
  return problem


VALUES.update({
    "model.size": Rule(_one_of("model.size", "model.mae", "SIZES")),
    "model.dtype": Rule(_one_of("model.dtype", "model.mae", "DTYPES")),
    "model.remat": Rule(_one_of("model.remat", "model.mae", "REMAT_POLICIES")),
    "model.centre_target": Rule(_true_or_false("model.centre_target")),
    "model.scan": Rule(_true_or_false("model.scan")),
})


@_value("model.attention")
def _attention(path: str, value: Any) -> str | None:
  """'' (configs written before 'auto') is 'auto'."""
  return _one_of("model.attention", "model.attention", "IMPLEMENTATIONS")(path, value or "auto")


@_value("model.attention_block")
def _attention_block(path: str, value: Any) -> str | None:
  if not _holds(lambda v: int(v) >= 1, value):
    return f"model.attention_block must be a positive token count, got {value}"
  return None


@_value("model.mlp_chunk")
def _mlp_chunk(path: str, value: Any) -> str | None:
  if not _holds(lambda v: int(v) >= 0, value):
    return f"model.mlp_chunk must be 0 (off) or a token count, got {value}"
  return None


@_value("model.pos_embedding")
def _pos_embedding(path: str, value: Any) -> str | None:
  if value not in ("sincos", "learned"):
    return f"model.pos_embedding must be 'sincos' or 'learned', got {value!r}"
  return None


# --- Masks and losses ------------------------------------------------------------

@_value("mask.strategy", tasks=("pretrain",))
def _mask_strategy(path: str, value: Any) -> str | None:
  strategies = _table("masking.samplers", "STRATEGIES")
  if value not in strategies:
    return f"mask.strategy must be one of {strategies}, got {value!r}"
  return None


@_value("show.strategies", tasks=("show_masks",))
def _show_strategies(path: str, value: Any) -> str | None:
  """Each is drawn as mask.strategy."""
  for strategy in _items(value):
    problem = _mask_strategy(path, strategy)
    if problem:
      return problem
  return None


@_block("adaptive_regions", block="mask", tasks=("pretrain",))
def _adaptive_regions(block: Mapping, path: str) -> list[str]:
  """mask.adaptive (masking.objectives.AdaptiveRegions): its strategy and decay."""
  if not block.get("adaptive", False):
    return []
  found = []
  strategy = block.get("strategy")
  if strategy not in ("roi", "roi_time"):
    found.append(f"mask.adaptive draws regions: it needs mask.strategy roi or roi_time, not "
                 f"{strategy!r}")
  decay = block.get("adaptive_decay", 0.9)
  if not _holds(lambda v: 0.0 <= float(v) < 1.0, decay):
    found.append(f"mask.adaptive_decay must be in [0, 1), got {_as_float(decay)}")
  return found


@_value("region_weights")
def _region_weights(path: str, value: Any) -> str | None:
  """'Hippocampus_*=2, Amygdala_R=0.5' in mask or loss (compare's weighted_loss: its loss)."""
  what = "mask" if path.split(".")[-2:-1] == ["mask"] else "loss"
  for item in _items(value):
    _, sep, weight = item.partition("=")
    if not sep or not _holds(float, weight):
      return f"{what}.region_weights: expected NAME=WEIGHT, got {item!r}"
  return None


@_value("visible_weight")
def _visible_weight(path: str, value: Any) -> str | None:
  if not _holds(lambda v: float(v) >= 0.0, value):
    return f"loss.visible_weight must be >= 0, got {_as_float(value)}"
  return None


# --- Probe, fine-tune, attribute -------------------------------------------------

@_value("pool", tasks=DOWNSTREAM)
def _pool(path: str, value: Any) -> str | None:
  """'region_std+region_corr': pools joined by '+'."""
  pools = _table("downstream.features", "POOLS")
  parts = _items(value, "+")
  if "cls" in parts:
    return f"pool 'cls' needs a class token; this encoder has none: use one of {', '.join(pools)}"
  if not parts or any(p not in pools for p in parts):
    return f"pool must be one of {', '.join(pools)} (or several joined by '+'), got {value!r}"
  return None


@_value("baselines", tasks=("probe",))
def _baselines(path: str, value: Any) -> str | None:
  """'region_stats,fc' ('': none)."""
  baselines = _table("downstream.features", "BASELINES")
  chosen = _items(value)
  if any(n not in baselines for n in chosen) or len(set(chosen)) != len(chosen):
    return f"config.baselines must list {', '.join(baselines)} without repeats, got {value!r}"
  return None


@_value("layers", tasks=("probe", "attribute"), facts=("depth",))
def _layers(path: str, value: Any, depth: int | None = None) -> str | None:
  """'1,2' or '1+2' or 'all' ('': the encoder's output); with `depth`, blocks 0..depth."""
  text = str(value).strip()
  if not text or text == "all":
    return None
  try:
    layers = tuple(int(k) for k in re.split(r"[,+]", text) if k.strip())
  except ValueError:
    layers = ()
  if not layers or len(set(layers)) != len(layers) or min(layers) < 0 or (
      depth is not None and max(layers) > depth):
    top = "depth" if depth is None else str(depth)
    return (f"config.layers must list encoder blocks 0..{top} (0: the embedded tokens) "
            f"without repeats, or 'all', got {text!r}")
  return None


@_value("readouts", tasks=("probe",), facts=("depth",))
def _readouts(path: str, value: Any, depth: int | None = None) -> str | None:
  """'recon,encoder@1+2'; with `depth`, the blocks of each encoder@K too."""
  recon = _table("downstream.readouts", "RECON")
  names = _items(value)
  if any(n not in recon and not LAYER_READOUT.match(n) for n in names) or \
      len(set(names)) != len(names):
    return (f"config.readouts must list {', '.join(recon)} or encoder@K[+K...] (encoder "
            f"blocks) without repeats, got {value!r}")
  for name in names:
    match = LAYER_READOUT.match(name)
    problem = match and _layers(path, match.group(1), depth)
    if problem:
      return problem
  return None


@_value("schemes", tasks=("probe", "finetune"))
def _schemes(path: str, value: Any) -> str | None:
  schemes = _table("downstream.splits", "SCHEMES")
  chosen = _items(value)
  if not chosen or any(s not in schemes for s in chosen):
    return f"config.schemes must list {' and/or '.join(schemes)}, got {value!r}"
  return None


@_value("mode", tasks=("finetune",))
def _finetune_mode(path: str, value: Any) -> str | None:
  modes = _table("downstream.end_to_end", "MODES")
  if value not in modes:
    return f"config.mode must be one of {modes}, got {value!r}"
  return None


@_value("baseline", tasks=("attribute",))
def _ig_baseline(path: str, value: Any) -> str | None:
  baselines = _table("explain.regions", "BASELINES")
  if value not in baselines:
    return f"config.baseline must be one of {baselines}, got {value!r}"
  return None


# --- Compare ---------------------------------------------------------------------

def _listed(text: Any) -> list[str] | None:
  """A comma-separated list without repeats, or None."""
  names = _items(text)
  return names if names and len(set(names)) == len(names) else None


@_value("strategies", tasks=("compare",))
def _strategies(path: str, value: Any) -> str | None:
  names = _listed(value)
  if names is None:
    return f"config.strategies must be a comma-separated list without repeats, got {value!r}"
  variants = _table("tasks.compare", "VARIANTS")
  unknown = [s for s in names if s not in variants]
  if unknown:
    return f"unknown strategies {', '.join(unknown)}; known: {', '.join(variants)}"
  return None


@_value("seeds", tasks=("compare",))
def _seeds(path: str, value: Any) -> str | None:
  if not _holds(lambda v: [int(s) for s in _listed(v)], value):
    return f"config.seeds must list integers, got {value!r}"
  return None


@_value("budgets", tasks=("compare",))
def _budgets(path: str, value: Any) -> str | None:
  """'0,150,300' ('': no curve); 0 is the initial weights."""
  text = str(value).strip()
  if not text:
    return None
  try:
    budgets = sorted(int(b) for b in _listed(text))
  except (TypeError, ValueError):
    budgets = [-1]
  if min(budgets) < 0 or max(budgets) == 0:
    return (f"config.budgets must list pretraining steps >= 0 (0: the initial weights), at "
            f"least one > 0, got {text!r}")
  return None


@_block("compare_baseline", tasks=("compare",))
def _compare_baseline(block: Mapping, path: str) -> list[str]:
  """The differences are taken against a strategy or a probe baseline."""
  probe = block.get("probe") or {}
  if _strategies("strategies", block.get("strategies")) or \
      _baselines("baselines", probe.get("baselines", "")):
    return []  # their own rules say what is wrong
  rows = _items(block.get("strategies")) + _items(probe.get("baselines", ""))
  baseline = block.get("baseline")
  if baseline not in rows:
    return [f"config.baseline={baseline!r} is not among the strategies or probe baselines "
            f"{', '.join(rows)}"]
  return []
