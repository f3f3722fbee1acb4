"""Collectives of a compiled program, per step: kind, count and bytes, loops unrolled.

    table = hlo_stats.collectives(compiled.as_text())
    table["all-reduce"]   # {'count': 48, 'bytes': 1.2e9, 'wire_bytes': 2.1e9}

A collective inside a loop body (the scan over layers, the attention's loops)
runs once per iteration: it counts as many times as the loop's trip count (XLA's
`known_trip_count`, or the bound of the loop condition's `i < N`), nested loops
multiplied. `bytes` is the size of each collective's result on one device;
`wire_bytes` what one device sends for it in a ring over its replica group of n
(all-reduce 2 (n-1)/n x size, all-gather (n-1)/n x result, reduce-scatter
(n-1) x result, all-to-all (n-1)/n x size, a permute its size), the figure a
bandwidth turns into time.
"""

from __future__ import annotations

import collections
import re

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
         "collective-broadcast", "ragged-all-to-all")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 0.5, "u4": 0.5}
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([\w\-]+)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_CALLS = re.compile(r"\b(condition|body|to_apply|calls|branch_computations|called_computations)"
                    r"=(%?[\w.\-]+|\{[^}]*\})")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_GROUPS_IOTA = re.compile(r"replica_groups=\[(\d+),(\d+)\]")
_GROUPS_LIST = re.compile(r"replica_groups=\{\{([\d,]*)\}")


def _shape_bytes(shape_text: str) -> float:
  """Bytes of an HLO shape (an array or a tuple of arrays)."""
  total = 0.0
  for dtype, dims in _ARRAY.findall(shape_text):
    if dtype not in _DTYPE_BYTES:
      continue
    size = 1
    for d in filter(None, dims.split(",")):
      size *= int(d)
    total += size * _DTYPE_BYTES[dtype]
  return total


def _computations(hlo: str) -> tuple[dict[str, list[str]], str]:
  """{computation name: its instruction lines}, and the entry's name."""
  comps, entry, current = {}, "", None
  for line in hlo.splitlines():
    header = _HEADER.match(line)
    if header:
      current = header.group(1)
      comps[current] = []
      if line.startswith("ENTRY"):
        entry = current
    elif line.strip() == "}":
      current = None
    elif current is not None:
      comps[current].append(line)
  return comps, entry


def _trip_count(line: str, comps: dict[str, list[str]], condition: str) -> tuple[int, bool]:
  """(trip count of a while, whether it is known): XLA's annotation, else the
  constant a `<` in the condition compares with."""
  known = _TRIP.search(line)
  if known:
    return int(known.group(1)), True
  constants = {}
  for inst in comps.get(condition, []):
    m = _INSTRUCTION.match(inst)
    if m and m.group(3) == "constant":
      value = re.match(r"\s*(-?\d+)\)", m.group(4))
      if value:
        constants[m.group(1)] = int(value.group(1))
  for inst in comps.get(condition, []):
    if "compare(" in inst and "direction=LT" in inst:
      for name, value in constants.items():
        if re.search(rf"%{re.escape(name)}\b", inst):
          return max(value, 1), True
  return 1, False


def _call_sites(comps: dict[str, list[str]]) -> tuple[dict[str, list], bool]:
  """{callee: [(caller, times per caller run)]}; whether every loop's trip count was known."""
  callers: dict[str, list] = collections.defaultdict(list)
  all_known = True
  for name, lines in comps.items():
    for line in lines:
      m = _INSTRUCTION.match(line)
      op = m.group(3) if m else ""
      for field, targets in _CALLS.findall(line):
        for target in (t.strip(" {}%") for t in targets.split(",")):
          if target not in comps:
            continue
          times = 1
          if op == "while" and field in ("body", "condition"):
            condition = re.search(r"condition=%?([\w.\-]+)", line).group(1)
            times, known = _trip_count(line, comps, condition)
            all_known &= known
          callers[target].append((name, times))
  return callers, all_known


def _multipliers(comps: dict[str, list[str]], entry: str) -> tuple[dict[str, int], bool]:
  """How many times each computation runs per execution of the entry (summed
  over its call sites); whether every loop's trip count was known."""
  callers, all_known = _call_sites(comps)
  runs: dict[str, int] = {entry: 1}

  def count(name: str, stack: tuple = ()) -> int:
    if name not in runs:
      runs[name] = 0 if name in stack else sum(
          count(caller, stack + (name,)) * times for caller, times in callers[name])
    return runs[name]
  for name in comps:
    count(name)
  return runs, all_known


def _group_size(line: str, devices: int) -> int:
  iota = _GROUPS_IOTA.search(line)
  if iota:
    return int(iota.group(2))
  listed = _GROUPS_LIST.search(line)
  if listed and listed.group(1):
    return len(listed.group(1).split(","))
  return devices


def _wire_bytes(kind: str, size: float, n: int) -> float:
  if n <= 1:
    return 0.0
  return {"all-reduce": 2 * (n - 1) / n * size, "all-gather": (n - 1) / n * size,
          "reduce-scatter": (n - 1) * size, "all-to-all": (n - 1) / n * size,
          "ragged-all-to-all": (n - 1) / n * size}.get(kind, size)


def collectives(hlo: str, devices: int = 1) -> dict:
  """{kind: {'count', 'bytes', 'wire_bytes'}} per execution on one device, plus
  'trip_counts_known' (False where a loop's count had to be taken as 1)."""
  comps, entry = _computations(hlo)
  runs, known = _multipliers(comps, entry)
  table: dict = {}
  for name, lines in comps.items():
    times = runs.get(name, 0)
    if not times:
      continue
    for line in lines:
      m = _INSTRUCTION.match(line)
      if not m:
        continue
      op = m.group(3)
      kind = op[:-len("-start")] if op.endswith("-start") else op
      if kind not in KINDS:
        continue
      size = _shape_bytes(m.group(2))
      if op.endswith("-start") and m.group(2).startswith("("):
        size /= 2  # an async start's result holds the operand and the result
      row = table.setdefault(kind, {"count": 0, "bytes": 0.0, "wire_bytes": 0.0})
      row["count"] += times
      row["bytes"] += times * size
      row["wire_bytes"] += times * _wire_bytes(kind, size, _group_size(line, devices))
  return {"by_kind": table, "trip_counts_known": known}


def custom_calls(hlo: str) -> list[str]:
  """The custom-call targets of a compiled program (the Pallas kernel is
  'tpu_custom_call', cuDNN's attention '__cudnn$fmha...')."""
  return sorted(set(re.findall(r'custom_call_target="([^"]+)"', hlo)))
