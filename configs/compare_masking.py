r"""The paper's experiment: region (AAL3) masking against random masking.

    python -m roi_mae_jax.main --config=configs/compare_masking.py --workdir=runs/compare
    python -m roi_mae_jax.main --config=configs/compare_masking.py --workdir=runs/compare \
        --config.strategies=roi,random,tube,roi_time --config.seeds=0,1,2
    python -m roi_mae_jax.main --config=configs/compare_masking.py:adhd200 \
        --workdir=runs/compare_adhd200 --config.pretrain.data.shards=runs/adhd200_2mm \
        --config.probe.data.shards=runs/adhd200_2mm --config.attribute.data.shards=runs/adhd200_2mm

The default runs at demo scale on the built-in synthetic data (the demo grid
and tiny model, shorter pretraining) within 20 minutes on a 2-core CPU.
`:adhd200` is the paper's setting for accelerators; `:test` takes seconds.
Nested blocks are the task configs: `--config.pretrain.total_steps=600`,
`--config.probe.pool=region`, `--config.attribute.ig_steps=16`;
`--config.probe.readouts=encoder@1,recon` adds those read-outs' rows per strategy.
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import attribute as attribute_config
from configs import finetune as finetune_config
from configs import pretrain_aal3
from configs import probe as probe_config
from roi_mae_jax.masking import objectives


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.task = "compare"
  config.strategies = "roi,random"     # also: tube, roi_time, roi_weighted, roi_adaptive
  config.seeds = "0,1"                 # pretraining seeds; each pairs with the same splits
  config.baseline = "random"           # differences are row - baseline (a strategy or a
                                       # probe baseline: region_stats, fc, init)
  config.data_seed = 0                 # the synthetic subjects, the same in every run
  # The pretraining curve: probe each run at these steps ("0,150,300,600,1500"; 0 = the
  # initial weights), all from one run per (strategy, seed) to the largest; "": its end.
  config.budgets = ""
  config.run_recovery = False          # with budgets: what each layer keeps of every region's
                                       # network and own fluctuation (synthetic data only)
  config.run_finetune = False
  config.run_attribute = True          # attribution by system + reconstruction by region
  # Loss weights of the `roi_weighted` strategy (masking.objectives), e.g. limbic
  # and subcortical regions counting twice; set your own per system or region.
  config.weighted_loss = objectives.loss_config()
  for system in ("limbic", "basal_ganglia", "thalamus"):
    config.weighted_loss.system_weights[system] = 2.0
  config.pretrain = pretrain_aal3.get_config("adhd200" if arg == "adhd200" else "")
  # The paper's objective, masked tokens only, for every strategy but the `_visible`
  # ones, which reconstruct the visible tokens too (pretraining's default).
  config.pretrain.loss.visible_weight = 0.0
  # The synthetic subjects' effect in every run, pretraining and evaluations
  # (data/synthetic.py PRESETS): `realistic` (a few small left-hemisphere regions,
  # amplitude and decoupling), `decoupling` (the same regions, decoupling only);
  # '' leaves each block's own.
  config.synthetic_preset = "realistic"
  config.probe = probe_config.get_config()
  config.finetune = finetune_config.get_config()
  config.attribute = attribute_config.get_config()
  config.probe.schemes = "kfold"       # the paired comparison is over k-fold splits
  config.finetune.schemes = "kfold"
  if not arg:  # demo scale: ~2.5 min per run on a 2-core CPU
    config.pretrain.total_steps = 150
    config.pretrain.checkpoint_every = 150
    config.probe.repeats = 2
    config.attribute.max_windows = 1
    config.attribute.ig_steps = 16
    config.attribute.reconstruction_windows = 4
  elif arg == "adhd200":  # the paper's setting; one accelerator host per run
    config.seeds = "0,1,2"
    config.probe.repeats = 3
  elif arg == "test":
    config.synthetic_preset = ""       # the test data's strong effect; probes: realistic
    config.pretrain = pretrain_aal3.get_config("test")
    config.pretrain.loss.visible_weight = 0.0
    config.probe = probe_config.get_config("test")
    config.probe.schemes = "kfold"
    config.probe.data.synthetic_subjects = 0
    config.attribute.max_windows = 1
    config.attribute.ig_steps = 4
    config.attribute.ig_chunk = 4
    config.attribute.reconstruction_windows = 2
    config.finetune = finetune_config.get_config("test")
    config.finetune.schemes = "kfold"
    config.finetune.data.synthetic_subjects = 0
  else:
    raise ValueError(f"unknown config variant {arg!r}; expected '', 'adhd200' or 'test'")
  return config
