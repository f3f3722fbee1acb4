"""Config values checked before a task starts, and command-line errors as one line.

    config_validation.validate(config)      # raises InputError naming every bad value
    config_validation.flag_error(error, argv)   # 'no config key mask.ratoi (did you mean ...)'

A rule names a key by its last dotted parts and applies wherever that key
appears (`total_steps` also checks compare's `pretrain.total_steps`), so one
table serves every task. Keys a config lacks are not checked; missing
required keys are `config_lib.require`'s job.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable

import ml_collections

from roi_mae_jax import errors
from roi_mae_jax.data import denoise


def _whole(minimum: int) -> tuple[Callable[[Any], bool], str]:
  return (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= minimum,
          f"a whole number >= {minimum}")


def _positive_number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


_POSITIVE = (_positive_number, "a finite number > 0")
_NON_NEGATIVE = (lambda v: _positive_number(v) or (v == 0 and not isinstance(v, bool)),
                 "a finite number >= 0 (0: none)")
_RATIO = (lambda v: isinstance(v, (int, float)) and 0 < v < 1, "between 0 and 1 (exclusive)")

# key (last dotted parts) -> (check, what it must be)
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "total_steps": _whole(1),
    "batch_size": _whole(1),
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
    "denoise.apply": (lambda v: v in denoise.APPLY,
                      "one of " + ", ".join(map(repr, denoise.APPLY))),
    "denoise.strategy": (lambda v: v in denoise.STRATEGIES,
                         "one of nilearn's load_confounds_strategy presets that read fMRIPrep's "
                         "desc-preproc_bold files: " + ", ".join(map(repr, denoise.STRATEGIES))),
    "denoise.detrend": (lambda v: isinstance(v, bool), "True or False"),
    "denoise.high_pass": _NON_NEGATIVE,
    "denoise.low_pass": _NON_NEGATIVE,
    "space": (lambda v: isinstance(v, str) and " " not in v and "space-" not in v,
              "a template name as in fMRIPrep's space- entity, e.g. 'MNI152NLin2009cAsym' "
              "(or '' when each run has one space)"),
}

# Keys earlier versions had: an old config that sets one gets why, not a silent no-op.
REMOVED: dict[str, str] = {
    "jax_probe": "the JAX logistic probe was removed: the scikit-learn probe, fitted in the "
                 "span of the training rows, is exact at every C and faster; remove the setting",
}


def _leaves(node, prefix: str = ""):
  for key, value in node.items():
    path = f"{prefix}{key}"
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      yield from _leaves(value, path + ".")
    else:
      yield path, value


def _rule_for(path: str):
  parts = path.split(".")
  for n in range(len(parts), 0, -1):  # the most specific rule wins
    rule = RULES.get(".".join(parts[-n:]))
    if rule is not None:
      return rule
  return None


def _block_problems(block: ml_collections.ConfigDict, prefix: str) -> list[str]:
  """Checks that tie keys together, for one block that trains (has total_steps)."""
  problems = []
  band = block.get("denoise")
  if isinstance(band, ml_collections.ConfigDict):
    high, low = band.get("high_pass"), band.get("low_pass")
    if _positive_number(high) and _positive_number(low) and high >= low:
      problems.append(f"config.{prefix}denoise.high_pass = {high} must be below "
                      f"config.{prefix}denoise.low_pass = {low} (Hz; 0 leaves a side open)")
  data = block.get("data")
  frames = block.get("frames")
  if isinstance(data, ml_collections.ConfigDict) and not data.get("shards") and \
      "synthetic" in data and isinstance(frames, int):
    run = data.synthetic.get("run_frames")
    if isinstance(run, int) and frames > run:
      problems.append(f"config.{prefix}frames = {frames} is longer than every synthetic run "
                      f"(config.{prefix}data.synthetic.run_frames = {run}); lower frames or "
                      "raise run_frames")
  return problems


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises one `InputError` naming every value of `config` that breaks a rule."""
  problems = []
  for path, value in _leaves(config):
    if path.split(".")[-1] in REMOVED:
      problems.append(f"config.{path}: {REMOVED[path.split('.')[-1]]}")
      continue
    rule = _rule_for(path)
    if rule is not None and value is not None and not rule[0](value):
      problems.append(f"config.{path} = {value!r} must be {rule[1]}")
  problems += _block_problems(config, "")
  for name, block in config.items():
    if isinstance(block, ml_collections.ConfigDict) and "total_steps" in block:
      problems += _block_problems(block, name + ".")
  if problems:
    raise errors.InputError("; ".join(problems))


def flag_error(error: Exception, argv: list[str]) -> str:
  """One line for an error raised while parsing the command line.

  ml_collections reports a misspelt `--config.mask.ratoi` as a KeyError /
  AttributeError holding only 'ratoi' and a did-you-mean hint; this names the
  flag and keeps the hint.
  """
  text = str(error.args[0]) if error.args else str(error)
  match = None
  if isinstance(error, (KeyError, AttributeError)):
    text = text.strip("'\"").replace("\\'", "'")
    match = re.match(r"'?([^'\n]+)'?\s*(?:\\n|\n)?(Did you mean.*)?$", text, re.S)
  if match:
    key, hint = match.group(1), (match.group(2) or "").strip()
    flag = next((a.split("=")[0] for a in argv if a.startswith("--config.") and
                 re.search(rf"\.{re.escape(key)}(=|$)", a.split("=")[0] + "=")), None)
    where = f"{flag}: " if flag else ""
    if key in REMOVED:
      return f"{where}no config key '{key}': {REMOVED[key]}"
    hint = f" ({hint[0].lower()}{hint[1:]})" if hint else ""
    return f"{where}no config key '{key}'{hint}"
  if "Traceback" in text or isinstance(error, OSError):  # the last line says what
    text = [line for line in text.splitlines() if line.strip()][-1]
  return " ".join(text.split())
