"""Fine-tuning as a library: encoder + subject pool + linear head, trained with optax.

    tuning = FineTuning(config, pre, source)          # configs/finetune.py settings
    results = tuning.cross_validate()
    results["kfold"]["balanced_accuracy"]["mean"], results["splits"]["kfold"][0]
    params, calibration = tuning.fit_all()            # on every labelled subject

The classifier reads a clip of `clip_windows` consecutive windows: the
encoder's region time courses, pooled as the probe pools them, standardised,
then a linear head (classifier.py). On every split the head starts as the
probe's logistic regression fitted on the training subjects' clips and is
trained on random clips of those subjects (binary cross-entropy, classes
balanced); `mode=frozen` trains the head only, `mode=full` the encoder too (at
`encoder_lr_scale` x the head's learning rate). A test subject's score is its
mean logit over its clips, turned into a probability by a logistic calibration
fitted on the training subjects' mean logits, so the threshold comes from the
training folds only.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from sklearn import linear_model

from roi_mae_jax import preemption
from roi_mae_jax.config import validation
from roi_mae_jax.downstream import classifier
from roi_mae_jax.downstream import features
from roi_mae_jax.downstream import logistic
from roi_mae_jax.downstream import pretrained as pretrained_lib
from roi_mae_jax.downstream import splits as splits_lib

MODES = ("frozen", "full")


class Trainer:
  """The jitted train step and scorer of one (pretrained encoder, config)."""

  def __init__(self, pre: pretrained_lib.Pretrained, config: ml_collections.ConfigDict):
    self.pre, self.pool, self.mode = pre, config.pool, config.mode
    head_tx = optax.adamw(config.learning_rate, weight_decay=config.weight_decay)
    encoder_tx = (optax.adamw(config.learning_rate * config.encoder_lr_scale,
                              weight_decay=config.weight_decay)
                  if config.mode == "full" else optax.set_to_zero())
    # The feature standardisation ("norm") stays as measured before training.
    self.tx = optax.multi_transform(
        {"head": head_tx, "encoder": encoder_tx, "norm": optax.set_to_zero()},
        {"head": "head", "encoder": "encoder", "norm": "norm"})

  def init(self, head: classifier.LinearHead) -> dict:
    params = classifier.params_of(self.pre, head)
    params["encoder"] = jax.tree.map(jnp.copy, params["encoder"])  # the step donates it
    return {"params": params, "opt_state": self.tx.init(params)}

  def logits(self, params, clips):
    return classifier.logits(self.pre, self.pool, params, clips)

  @functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
  def step(self, state, clips, labels, weights):
    def loss_fn(params):
      if self.mode == "frozen":  # no backward pass through the encoder
        params = dict(params, encoder=jax.lax.stop_gradient(params["encoder"]))
      losses = optax.sigmoid_binary_cross_entropy(self.logits(params, clips), labels)
      return jnp.sum(weights * losses) / jnp.sum(weights)

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state}, loss

  @functools.partial(jax.jit, static_argnums=0)
  def score(self, params, clips):
    return self.logits(params, clips)


def read_clips(source, clips) -> np.ndarray:
  return np.stack([np.stack([source.window_at(i, s) for i, s in clip]) for clip in clips])


def subject_logits(trainer: Trainer, params, source, clips: dict, subjects,
                    batch_size: int) -> np.ndarray:
  """Mean logit over every clip of each subject (fixed-size batches: one compiled shape)."""
  out = []
  for subject in subjects:
    items, scores = clips[subject], []
    for first in range(0, len(items), batch_size):
      chunk = items[first:first + batch_size]
      batch = read_clips(source, chunk + [chunk[-1]] * (batch_size - len(chunk)))
      scores.append(np.asarray(trainer.score(params, jnp.asarray(batch)))[:len(chunk)])
    out.append(float(np.concatenate(scores).mean()))
  return np.array(out)


def clip_features(pre: pretrained_lib.Pretrained, pool: str, source,
                  clips: dict) -> dict[str, np.ndarray]:
  """subject -> (clips, F) features of the pretrained encoder (computed once, every split
  fits its initial head on its training subjects' rows)."""
  fn = jax.jit(lambda c: classifier.clip_features(pre, pool, pre.params, c))
  return {subject: np.stack([np.asarray(fn(jnp.asarray(read_clips(source, [clip])[0])))
                             for clip in items]) for subject, items in clips.items()}


def train_one(trainer: Trainer, config, source, clips: dict, subjects, labels, seed: int,
              initial: dict[str, np.ndarray]):
  """Trains on random clips of `subjects` from the probe's head on `initial` features;
  returns (params, calibration (a, b))."""
  rows = np.concatenate([initial[s] for s in subjects])
  y = np.concatenate([np.full(len(initial[s]), label) for s, label in zip(subjects, labels)])
  head = classifier.fit_linear_head(rows, y, trainer.pool, seed=int(config.seed))
  state = trainer.init(head)
  rng = np.random.default_rng(seed)
  counts = np.bincount(labels, minlength=2)
  class_weight = len(labels) / (2 * np.maximum(counts, 1))
  losses = []
  for step in range(int(config.steps)):
    preemption.check(f"in fine-tuning at step {step} of {config.steps}",
                     "fine-tuning keeps no partial state: re-run the same command to start "
                     "it again")
    picks = rng.choice(len(subjects), int(config.batch_size))
    batch = read_clips(source, [clips[subjects[p]][rng.integers(len(clips[subjects[p]]))]
                           for p in picks])
    y = labels[picks].astype(np.float32)
    state, loss = trainer.step(state, jnp.asarray(batch), jnp.asarray(y),
                               jnp.asarray(class_weight[labels[picks]], jnp.float32))
    losses.append(loss)
    if (step + 1) % max(1, int(config.steps) // 4) == 0:
      logging.info("finetune step %d/%d: loss %.4f (mean since the last line)", step + 1,
                   config.steps, float(np.mean(jax.device_get(losses))))
      losses = []
  train_logits = subject_logits(trainer, state["params"], source, clips, subjects,
                                 int(config.batch_size))
  calibration = linear_model.LogisticRegression(class_weight="balanced").fit(
      train_logits[:, None], labels)
  return state["params"], (float(calibration.coef_[0, 0]), float(calibration.intercept_[0]))


def probabilities(logit: np.ndarray, calibration: tuple[float, float]) -> np.ndarray:
  a, b = calibration
  return 1 / (1 + np.exp(-(a * logit + b)))


class FineTuning:
  """The fine-tuning of one (config, encoder, data): clips and initial features computed
  once, shared by the cross-validation and the final model."""

  def __init__(self, config: ml_collections.ConfigDict, pre: pretrained_lib.Pretrained,
               source):
    validation.refuse("mode", config.mode)  # anything else would train the head only
    self.config, self.pre, self.source = config, pre, source
    self.table = features.subject_table(source)  # subjects, sites, labels: no encoder run
    self.clips = features.window_clips(source, set(self.table.subjects),
                                       int(config.clip_windows))
    self.trainer = Trainer(pre, config)
    self.initial = clip_features(pre, config.pool, source, self.clips)

  def _train(self, subjects, labels, seed: int):
    return train_one(self.trainer, self.config, self.source, self.clips, subjects, labels,
                     seed, self.initial)

  def cross_validate(self) -> dict:
    """Fine-tuned on the training subjects of every split, scored on its test subjects.

    Returns {scheme: metric summaries, "splits": {scheme: [per-split metrics]},
    "meta": settings and counts}.
    """
    config, table = self.config, self.table
    splits = splits_lib.from_config(config, table.subjects, table.labels, table.sites)
    per_split = {}
    for n, split in enumerate(splits, start=1):
      params, calibration = self._train([table.subjects[r] for r in split.train],
                                        table.labels[split.train], int(config.seed) + n)
      logits = subject_logits(self.trainer, params, self.source, self.clips,
                              [table.subjects[r] for r in split.test], int(config.batch_size))
      metrics = logistic.binary_metrics(table.labels[split.test],
                                            probabilities(logits, calibration))
      per_split.setdefault(split.scheme, []).append(dict(metrics, split=split.name))
      logging.info("finetune split %d/%d (%s %s): balanced acc. %.3f, AUC %.3f", n,
                   len(splits), split.scheme, split.name, metrics["balanced_accuracy"],
                   metrics["roc_auc"])
    results = {scheme: logistic.summarise(v) for scheme, v in per_split.items()}
    results["splits"] = per_split
    results["meta"] = {"checkpoint": os.path.abspath(config.checkpoint), "mode": config.mode,
                       "steps": int(config.steps), "pool": config.pool,
                       "clip_windows": int(config.clip_windows),
                       "subjects": len(table.subjects)}
    return results

  def fit_all(self) -> tuple[dict, tuple[float, float]]:
    """(classifier params, calibration (a, b)) trained on every labelled subject."""
    return self._train(self.table.subjects, self.table.labels, int(self.config.seed))
