r"""Task `finetune`: encoder + subject pool + linear head trained with optax, on the probe's splits.

    python -m roi_mae_jax.main --config=configs/finetune.py --workdir=runs/finetune \
        --config.checkpoint=runs/demo --config.mode=full

The classifier reads a clip of `clip_windows` consecutive windows: the
encoder's region time courses, pooled as the probe pools them (`pool`:
amplitude, correlation, means), standardised, then a linear head. For every
split (subject-disjoint k-fold and leave-one-site-out, as in the probe) the
head starts as the probe's logistic regression fitted on the training
subjects' clips (C by inner CV) and is trained on random clips of those
subjects (binary cross-entropy, classes balanced); `mode=frozen` trains the
head only, `mode=full` the encoder too (at `encoder_lr_scale` x the head's
learning rate). A test subject's score is its mean logit over all its clips,
turned into a probability by a logistic calibration fitted on the training
subjects' mean logits (classes balanced), so the 0.5 threshold comes from
the training folds only. A last model is trained on every labelled subject
and checkpointed with Orbax in WORKDIR/classifier/. Writes
finetune_results.json (scheme -> metric -> mean, std), finetune_table.md.
"""

from __future__ import annotations

import os

import ml_collections
from absl import logging

from roi_mae_jax import outputs
from roi_mae_jax import preemption
from roi_mae_jax.data import sources
from roi_mae_jax.downstream import classifier
from roi_mae_jax.downstream import end_to_end
from roi_mae_jax.downstream import evaluation
from roi_mae_jax.downstream import pretrained as pretrained_lib

REQUIRED_KEYS = ("checkpoint", "mode", "steps", "learning_rate", "pool", "folds",
                 "clip_windows")
OUTPUT_NAMES = ("finetune_results.json", "finetune_table.md", "classifier", "classifier.json")


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  paths = dict(zip(OUTPUT_NAMES, outputs.claim(workdir, OUTPUT_NAMES, config.overwrite)))
  pre = pretrained_lib.load_pretrained(config.checkpoint, config.checkpoint_step or None)
  source = sources.downstream_source(pre.config, config.data)
  tuning = end_to_end.FineTuning(config, pre, source)
  with preemption.StopOnSignal():  # SIGTERM / Ctrl-C: stop between steps, one line, 143 / 130
    results = tuning.cross_validate()
  outputs.write_json(paths["finetune_results.json"], results)
  summary = {k: v for k, v in results.items() if k not in ("splits", "meta")}
  text = evaluation.markdown_table({"features": {f"{config.mode} ({config.pool})": summary}})
  with open(paths["finetune_table.md"], "w", encoding="utf-8") as f:
    f.write(f"Fine-tuning ({config.mode}, {config.steps} steps, clips of "
            f"{config.clip_windows} windows), ADHD vs control: {len(tuning.table.subjects)} "
            "subjects\n\n" + text)
  with preemption.StopOnSignal():
    final, calibration = tuning.fit_all()
  classifier.save_classifier(paths["classifier"], final, {
      "pretrained": os.path.abspath(config.checkpoint), "pretrained_step": pre.step,
      "pool": config.pool, "features": int(final["head"]["weight"].shape[0]),
      "clip_windows": int(config.clip_windows), "calibration": list(calibration),
      "mode": config.mode, "step": int(config.steps)})
  logging.info("finetune results:\n%s\nclassifier saved in %s", text, paths["classifier"])
