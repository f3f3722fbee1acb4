"""Reading the CSV/TSV tables of a dataset (phenotypes, participants, manifests).

    table = read_table("NYU/NYU_phenotypic.csv", expected=("ScanDir ID", "DX"))
    table.delimiter, table.columns           # ';' tables are detected from the header
    for line, row in table.rows: ...         # line: the row's line number in the file
    table.duplicates(key)                    # {id: [lines]} for ids on several rows

Any problem reading a table raises `TableError` naming the file (and the
line where known); the caller decides whether that skips scans or stops.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from typing import Callable, Sequence

from roi_mae_jax import errors

DELIMITERS = (",", ";", "\t")


class TableError(errors.InputError):
  """A table that cannot be read as intended; the message names the file."""


@dataclasses.dataclass(frozen=True)
class Table:
  """The rows of one table with their line numbers."""

  path: str
  delimiter: str
  columns: tuple[str, ...]
  rows: tuple[tuple[int, dict], ...]

  def require(self, *columns: str) -> None:
    """Raises `TableError` naming the first of `columns` the table lacks."""
    for column in columns:
      if column not in self.columns:
        raise TableError(f"{self.path} has no {column!r} column (its columns: "
                         f"{', '.join(self.columns) or 'none'})")

  def duplicates(self, key: Callable[[dict], str]) -> dict[str, list[int]]:
    """{key: [lines]} for every key that appears on more than one row."""
    lines: dict[str, list[int]] = {}
    for line, row in self.rows:
      lines.setdefault(key(row), []).append(line)
    return {k: v for k, v in lines.items() if len(v) > 1}


def _pick_delimiter(header: str, expected: Sequence[str], default: str) -> str:
  """The delimiter under which the header shows the most expected (else any) columns."""
  def score(d):
    names = [n.strip().strip('"') for n in header.split(d)]
    return (sum(n in names for n in expected), len(names))
  best = max(DELIMITERS, key=score)
  return best if score(best) > score(default) else default


def read_table(path: str, expected: Sequence[str] = (), default: str = ",") -> Table:
  """Reads `path`, detecting a ',', ';' or tab delimiter from its header line."""
  try:
    with open(path, newline="", encoding="utf-8-sig") as f:
      text = f.read()
  except UnicodeDecodeError as e:
    raise TableError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
  except OSError as e:
    raise TableError(f"{path} is unreadable ({e.strerror or e})") from None
  header = text.split("\n", 1)[0]
  delimiter = _pick_delimiter(header, expected, default)
  reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
  rows = []
  try:
    for row in reader:
      if None in row:  # more fields than the header names
        raise TableError(f"{path} line {reader.line_num} has more fields than its header")
      rows.append((reader.line_num, {(k or "").strip(): (v or "").strip()
                                     for k, v in row.items()}))
  except csv.Error as e:
    raise TableError(f"{path} line {reader.line_num} is not valid CSV ({e})") from None
  columns = tuple((c or "").strip() for c in (reader.fieldnames or ()))
  return Table(path, delimiter, columns, tuple(rows))
