"""Benchmarks: `python -m roi_mae_jax.bench [PART] [options]`.

    python -m roi_mae_jax.bench                    # all: every headline figure, one run
    python -m roi_mae_jax.bench all --json=out.json
    python -m roi_mae_jax.bench masks              # mask samplers at paper scale
    python -m roi_mae_jax.bench masks --json=out.json
    python -m roi_mae_jax.bench train              # step time, tokens/s, MFU and its ceiling
    python -m roi_mae_jax.bench data               # prepare and pipeline throughput
    python -m roi_mae_jax.bench memory             # paper-scale step memory per window
    python -m roi_mae_jax.bench aot --target=tpu:v5e:16x16 --mesh=32,1,8   # compile for a pod

Each part prints a table of figures; none of it is a pass/fail test.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

# Part name -> module with `add_arguments(parser)` and `run(args) -> dict`.
PARTS = {"all": "roi_mae_jax.bench.overview", "masks": "roi_mae_jax.bench.masks",
         "train": "roi_mae_jax.bench.step_time", "data": "roi_mae_jax.bench.data",
         "memory": "roi_mae_jax.bench.memory", "aot": "roi_mae_jax.bench.aot"}


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
    argv = ["all", *argv]  # no part named: all of them
  # Only the named part's module is imported (the others pull in the data
  # pipeline and more, which would count in `bench train`'s host memory); all
  # of them for --help or an unknown part, so that the listing is complete.
  names = [argv[0]] if argv[0] in PARTS else list(PARTS)
  parser = argparse.ArgumentParser(prog="python -m roi_mae_jax.bench",
                                   description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="part", required=True)
  modules = {}
  for name in names:
    modules[name] = importlib.import_module(PARTS[name])
    part = sub.add_parser(name, help=modules[name].__doc__.splitlines()[0])
    part.add_argument("--json", default="", help="also write the figures here")
    modules[name].add_arguments(part)
  args = parser.parse_args(argv)
  figures = modules[args.part].run(args)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({args.part: figures}, f, indent=2)
    print(f"wrote {args.json}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
