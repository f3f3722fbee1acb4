"""The package's shape: layers import only downwards, no import cycles, no
suffix-only name pairs, a docstring in every subpackage, and docs/layout.md as
generated from the tree.

    python -m tests.test_layout        # rewrites docs/layout.md after a change
"""

from __future__ import annotations

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "roi_mae_jax")
LAYOUT_DOC = os.path.join(REPO, "docs", "layout.md")

# Bottom to top. A module may import its own layer and the layers below it;
# its layer is that of the longest prefix naming it. config.rules and
# config.validation sit at the bottom: the rules look their tables up when they
# run, so every layer can check a value. plots is what the tasks draw; main and bench sit on top.
LAYERS = (
    ("shared", ("errors", "console", "outputs", "metrics", "preemption", "process_guard",
                "workdir_lock", "archives", "config.rules", "config.validation")),
    ("devices", ("devices",)),
    ("brain", ("brain",)),
    ("config", ("config",)),
    ("data", ("data",)),
    ("masking", ("masking",)),
    ("model", ("model",)),
    ("training", ("training",)),
    ("downstream", ("downstream",)),
    ("explain", ("explain",)),
    ("tasks", ("tasks", "plots")),
    ("entry points", ("main", "bench", "")),
)


def _modules() -> dict[str, str]:
  """Dotted module name (without the package) -> path; a package is its __init__."""
  found = {}
  for root, dirs, files in os.walk(PACKAGE):
    dirs[:] = sorted(d for d in dirs if not d.startswith(("_", ".")))
    for name in sorted(files):
      if name.endswith(".py"):
        path = os.path.join(root, name)
        dotted = os.path.relpath(path, PACKAGE)[:-3].replace(os.sep, ".")
        dotted = dotted.removesuffix("__init__").rstrip(".")
        found[dotted] = path
  return found


def _layer(module: str) -> int:
  best, level = -1, None
  for index, (_, prefixes) in enumerate(LAYERS):
    for prefix in prefixes:
      if (module == prefix or module.startswith(prefix + ".") or prefix == "") and \
          len(prefix) > best:
        best, level = len(prefix), index
  return level


def _imports(path: str, modules: dict[str, str]) -> set[str]:
  """The package's modules `path` imports, anywhere in the file."""
  found = set()
  for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
    names = []
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("roi_mae_jax"):
      base = node.module[len("roi_mae_jax."):] if node.module != "roi_mae_jax" else ""
      for alias in node.names:
        full = f"{base}.{alias.name}".lstrip(".")
        names.append(full if full in modules else base)
    elif isinstance(node, ast.Import):
      names += [a.name[len("roi_mae_jax."):] for a in node.names
                if a.name.startswith("roi_mae_jax.")]
    found.update(n for n in names if n in modules)
  return found


def _graph() -> dict[str, set[str]]:
  modules = _modules()
  return {m: _imports(p, modules) - {m} for m, p in modules.items()}


def test_every_module_has_a_layer_and_imports_only_downwards():
  upward = []
  for module, imported in _graph().items():
    assert _layer(module) is not None, f"{module} belongs to no layer of LAYERS"
    for other in sorted(imported):
      if _layer(other) > _layer(module):
        upward.append(f"{module} ({LAYERS[_layer(module)][0]}) imports {other} "
                      f"({LAYERS[_layer(other)][0]})")
  assert not upward, "imports that go up a layer:\n" + "\n".join(upward)


def test_no_import_cycles():
  graph, state, cycles = _graph(), {}, []

  def visit(module, trail):
    state[module] = "open"
    for other in sorted(graph[module]):
      if other == "" or module == "":
        continue  # the package's __init__ is imported before any module anyway
      if state.get(other) == "open":
        cycles.append(" -> ".join(trail[trail.index(other):] + [other]))
      elif other not in state:
        visit(other, trail + [other])
    state[module] = "done"

  for module in sorted(graph):
    if module not in state:
      visit(module, [module])
  assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_two_modules_differ_only_by_a_suffix():
  names = {m.split(".")[-1]: m for m in _modules() if m}
  pairs = [(names[a], names[b]) for a in names for b in names
           if a != b and b.startswith(a + "_")]
  assert not pairs, f"names a newcomer confuses: {pairs}"


def test_every_subpackage_says_what_it_holds():
  for module, path in _modules().items():
    if path.endswith("__init__.py"):
      doc = ast.get_docstring(ast.parse(open(path, encoding="utf-8").read()))
      assert doc and len(doc) > 40, f"{path} needs a docstring saying what it holds"


def _summary(path: str) -> str:
  doc = ast.get_docstring(ast.parse(open(path, encoding="utf-8").read())) or ""
  return " ".join(doc.split("\n\n")[0].split())


def layout_markdown() -> str:
  """docs/layout.md: every subpackage and module by layer, with its docstring's summary."""
  modules = _modules()
  lines = ["# Layout", "",
           "Generated by `python -m tests.test_layout` from the package's docstrings;",
           "`tests/test_layout.py` fails when it is out of date. Layers go bottom to top:",
           "a module imports only its own layer and those above it in this page.", ""]
  for index, (title, _) in enumerate(LAYERS):
    members = sorted(m for m in modules if _layer(m) == index)
    lines += [f"## {index}. {title}", "", "| module | what it holds |", "|---|---|"]
    for module in members:
      shown = "roi_mae_jax" + (f".{module}" if module else "")
      lines.append(f"| `{shown}` | {_summary(modules[module]).replace('|', '/')} |")
    lines.append("")
  return "\n".join(lines)


def test_layout_doc_is_current():
  with open(LAYOUT_DOC, encoding="utf-8") as f:
    assert f.read() == layout_markdown(), (
        "docs/layout.md is out of date: run `python -m tests.test_layout`")


if __name__ == "__main__":
  with open(LAYOUT_DOC, "w", encoding="utf-8") as out:
    out.write(layout_markdown())
  print(f"wrote {LAYOUT_DOC}")

