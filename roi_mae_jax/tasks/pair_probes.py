r"""Task `pair_probes`: one probe's feature set against another's, split by split.

    python -m roi_mae_jax.main --config=configs/pair_probes.py --workdir=runs/pair_steps \
        --config.a=runs/probe_3000 --config.b=runs/probe_1500
    python -m roi_mae_jax.main --config=configs/pair_probes.py --workdir=runs/pair_recon \
        --config.a=runs/probe:recon_power --config.b=runs/probe:init_recon_power

`a` and `b` are probe workdirs (task `probe`), each optionally with
':FEATURE' (a feature set of that probe: encoder, a read-out, a baseline;
default encoder). They must hold the same subjects in the same order and the
same folds and repeats, so their splits are the same (pairing.py). Writes to
WORKDIR: pair_results.json (both means and a - b with its 95% interval and p,
per scheme, for balanced accuracy and ROC AUC) and pair_table.md.
"""

from __future__ import annotations

import ml_collections
from absl import logging

from roi_mae_jax import errors
from roi_mae_jax import outputs
from roi_mae_jax.downstream import pairing

REQUIRED_KEYS = ("a", "b")
OUTPUT_NAMES = ("pair_results.json", "pair_table.md")


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  a, b = pairing.load_probe(str(config.a)), pairing.load_probe(str(config.b))
  if (a.path, a.feature) == (b.path, b.feature):
    raise errors.InputError(f"a and b are the same feature set ({a.feature} of {a.path}): "
                            "name another probe or another ':FEATURE'")
  paths = outputs.claim(workdir, OUTPUT_NAMES, config.overwrite)
  result = pairing.pair(a, b)
  outputs.write_json(paths[0], result)
  table = pairing.markdown_table(result)
  with open(paths[1], "w", encoding="utf-8") as f:
    f.write("Paired probes, a - b on the same splits (k-fold: corrected resampled t; "
            "leave-one-site-out: paired t)\n\n" + table)
  logging.info("paired probes:\n%s", table)
