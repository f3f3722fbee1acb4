"""Checking a config against every rule (config/rules.py); command-line errors as one line.

    validation.validate(config)                  # a task's start: one InputError
    validation.validate(config.model, where="model")   # one block, where it is built
    validation.refuse("pool", "max")             # one value, where a parser reads it
    validation.check_loaded(config, depth=pre.depth)   # once the encoder is loaded
    validation.flag_error(error, argv)   # 'no config key mask.ratoi (did you mean ...)'

Value rules (VALUES) name a key by its last dotted parts and apply wherever that
key appears (`total_steps` also checks compare's `pretrain.total_steps`); the
most specific key wins. A rule may be kept to some tasks: the task of a value
is that of the nearest block holding `task` (the config, or compare's nested
pretrain/probe/finetune/attribute blocks), so finetune's `mode` is not
`distributed.mode`; a block checked on its own, outside a task's config, meets
every rule. Block rules (BLOCKS) tie the keys of one block together.

Some rules also compare a value with what is known only once something is
loaded (`depth`: the encoder's blocks; `divisor`, `processes`: the mesh); the
code that loads it calls `check_loaded` or `refuse` with those facts. Keys a
config lacks are not checked; missing required keys are `blocks.require`'s.

The rules themselves, and the tables they read, are config/rules.py.
"""

from __future__ import annotations

import re
from typing import Any, Iterator, Mapping

from roi_mae_jax import errors
from roi_mae_jax.config.rules import BLOCK_TYPES, BLOCKS, LAYER_READOUT, REMOVED, VALUES
from roi_mae_jax.config.rules import BlockRule, Rule

__all__ = ["LAYER_READOUT", "VALUES", "BLOCKS", "REMOVED", "problems", "validate",
           "check_loaded", "refuse", "flag_error"]


# --- Checking --------------------------------------------------------------------

def _nodes(node: Mapping, path: str, task: str | None) -> Iterator[tuple[str, Any, str | None]]:
  """(path, value, task) of `node` and everything under it; blocks before their keys."""
  if isinstance(node.get("task"), str):  # compare's nested blocks are other tasks' configs
    task = node["task"]
  yield path, node, task
  for key, value in node.items():
    child = f"{path}.{key}" if path else key
    if isinstance(value, BLOCK_TYPES):
      yield from _nodes(value, child, task)
    else:
      yield child, value, task


def _rule_for(path: str, task: str | None) -> Rule | None:
  parts = path.split(".")
  for n in range(len(parts), 0, -1):  # the most specific rule wins
    rule = VALUES.get(".".join(parts[-n:]))
    if rule is not None and (not rule.tasks or task is None or task in rule.tasks):
      return rule
  return None


def _block_applies(rule: BlockRule, node: Mapping, path: str, task: str | None,
                   root: bool) -> bool:
  if rule.tasks and task is not None and task not in rule.tasks:
    return False
  if not rule.block:
    return root or "task" in node
  return path == rule.block or path.endswith("." + rule.block)


def problems(config: Mapping, where: str = "", **facts: Any) -> list[str]:
  """What is wrong with `config` (a block at path `where` of a task config), one line each.

  With `facts`, only the rules that use one of them run, given those facts.
  """
  found = []
  for path, value, task in _nodes(config, where, None):
    if isinstance(value, BLOCK_TYPES):
      if not facts:
        found += [p for rule in BLOCKS.values()
                  if _block_applies(rule, value, path, task, path == where)
                  for p in rule.problems(value, path)]
      continue
    leaf = path.split(".")[-1]
    if leaf in REMOVED:
      if not facts:
        found.append(f"config.{path}: {REMOVED[leaf]}")
      continue
    rule = _rule_for(path, task)
    if rule is None or value is None:
      continue
    if facts:
      given = {f: facts[f] for f in rule.facts if f in facts}
      problem = rule.problem(path, value, **given) if given else None
    else:
      problem = rule.problem(path, value)
    if problem:
      found.append(problem)
  return found


def _raise(found: list[str]) -> None:
  if found:
    raise errors.InputError("; ".join(found))


def validate(config: Mapping, where: str = "") -> None:
  """Raises one `InputError` naming every value of `config` that breaks a rule.

  A task calls it once on its whole config before any work; code that builds
  from one block (the model from `config.model`) passes that block and its path.
  """
  _raise(problems(config, where))


def check_loaded(config: Mapping, **facts: Any) -> None:
  """The rules that need a loaded object, given it: `check_loaded(config, depth=4)`."""
  _raise(problems(config, **facts))


def refuse(key: str, value: Any, path: str | None = None, **facts: Any) -> None:
  """Raises the `InputError` of rule `key` (a VALUES key) when `value` breaks it.

  For parsers of config strings, so they read what the rule lets through:
  `refuse("pool", pool)`; `path` names where the value sits when it matters.
  """
  problem = VALUES[key].problem(path or key, value, **facts)
  if problem:
    raise errors.InputError(problem)


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
