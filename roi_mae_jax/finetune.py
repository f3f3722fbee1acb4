r"""Task `finetune`: encoder + linear head trained with optax, on the probe's splits.

    python -m roi_mae_jax.main --config=configs/finetune.py --workdir=runs/finetune \
        --config.checkpoint=runs/demo --config.mode=full

For every split (subject-disjoint k-fold and leave-one-site-out, as in the
probe) a linear head on pooled features, standardised by window-level
statistics and started at the class prior, is trained on random windows of
the training subjects (binary cross-entropy);
`mode=frozen` trains the head only, `mode=full` the encoder too (at
`encoder_lr_scale` x the head's learning rate). Test subjects are scored by
the mean logit over all their windows. A last model is trained on every
labelled subject and checkpointed with Orbax in WORKDIR/classifier/. Writes
finetune_results.json (scheme -> metric -> mean, std), finetune_table.md.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from roi_mae_jax import checkpoint as checkpoint_lib
from roi_mae_jax import classifier
from roi_mae_jax import embeddings
from roi_mae_jax import errors
from roi_mae_jax import linear_probe
from roi_mae_jax import outputs
from roi_mae_jax import pretrained as pretrained_lib
from roi_mae_jax import probe

REQUIRED_KEYS = ("checkpoint", "mode", "steps", "learning_rate", "pool", "folds")
OUTPUT_NAMES = ("finetune_results.json", "finetune_table.md", "classifier", "classifier.json")
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

  def logits(self, params, windows):
    return classifier.logits(self.pre, self.pool, params, windows)

  @functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
  def step(self, state, windows, labels):
    def loss_fn(params):
      if self.mode == "frozen":  # no backward pass through the encoder
        params = dict(params, encoder=jax.lax.stop_gradient(params["encoder"]))
      return optax.sigmoid_binary_cross_entropy(self.logits(params, windows), labels).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state}, loss

  @functools.partial(jax.jit, static_argnums=0)
  def score(self, params, windows):
    return self.logits(params, windows)


def _window_head(trainer: Trainer, source, draws, labels: np.ndarray, batch_size: int):
  """A zero-weight head standardising with window-level feature statistics.

  Subject means vary far less than single windows, so a head fitted on them
  gives huge logits on windows; training starts from logit = log-odds instead.
  """
  feats = []
  for first in range(0, len(draws), batch_size):
    chunk = np.stack([source.window_at(i, s) for i, s in draws[first:first + batch_size]])
    feats.append(trainer.pre.features(chunk, trainer.pool))
  feats = np.concatenate(feats)
  scale = feats.std(0)
  prior = float(np.clip(labels.mean(), 0.05, 0.95))
  return classifier.LinearHead(feats.mean(0), np.where(scale > 0, scale, 1.0).astype(np.float32),
                               np.zeros(feats.shape[1], np.float32),
                               float(np.log(prior / (1 - prior))), trainer.pool, 0.0)


def train_one(trainer: Trainer, config, source, feats, train_rows, seed: int):
  """Trains on random windows of the subjects of `train_rows`; returns the params."""
  subjects = [feats.subjects[r] for r in train_rows]
  labels = dict(zip(subjects, feats.labels[train_rows].tolist()))
  windows = embeddings.windows_by_subject(source, set(subjects))
  rng = np.random.default_rng(seed)

  def draw(count):
    picks = rng.choice(len(subjects), count)
    return [windows[subjects[p]][rng.integers(len(windows[subjects[p]]))] for p in picks], \
        np.array([labels[subjects[p]] for p in picks], np.float32)

  stats_draws, stats_labels = draw(max(4 * int(config.batch_size), 32))
  state = trainer.init(_window_head(trainer, source, stats_draws, stats_labels,
                                    int(config.batch_size)))
  losses = []
  for step in range(int(config.steps)):
    picks, y = draw(int(config.batch_size))
    batch = np.stack([source.window_at(i, s) for i, s in picks])
    state, loss = trainer.step(state, jnp.asarray(batch), jnp.asarray(y))
    losses.append(loss)
    if (step + 1) % max(1, int(config.steps) // 4) == 0:
      logging.info("finetune step %d/%d: loss %.4f (mean since the last line)", step + 1,
                   config.steps, float(np.mean(jax.device_get(losses))))
      losses = []
  return state["params"]


def subject_probabilities(trainer: Trainer, params, source, subjects: list[str],
                          batch_size: int) -> np.ndarray:
  """Mean logit over every window of each subject -> probability of ADHD."""
  windows = embeddings.windows_by_subject(source, set(subjects))
  probs = []
  for subject in subjects:
    scores = []
    items = windows[subject]
    for first in range(0, len(items), batch_size):
      chunk = np.stack([source.window_at(i, s) for i, s in items[first:first + batch_size]])
      scores.append(np.asarray(trainer.score(params, jnp.asarray(chunk))))
    probs.append(1 / (1 + np.exp(-np.concatenate(scores).mean())))
  return np.array(probs)


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  if config.mode not in MODES:
    raise errors.InputError(f"config.mode must be one of {MODES}, got {config.mode!r}")
  paths = dict(zip(OUTPUT_NAMES, outputs.claim(workdir, OUTPUT_NAMES, config.overwrite)))
  pre = pretrained_lib.load_pretrained(config.checkpoint, config.checkpoint_step or None)
  source = probe.data_source(pre, config.data)
  feats = embeddings.subject_table(source)  # subjects, sites, labels: no encoder run
  splits = probe.make_splits(config, feats)
  trainer = Trainer(pre, config)
  per_split = {}
  for n, split in enumerate(splits, start=1):
    params = train_one(trainer, config, source, feats, split.train, int(config.seed) + n)
    test_subjects = [feats.subjects[r] for r in split.test]
    probs = subject_probabilities(trainer, params, source, test_subjects,
                                  int(config.batch_size))
    metrics = linear_probe.binary_metrics(feats.labels[split.test], probs)
    per_split.setdefault(split.scheme, []).append(dict(metrics, split=split.name))
    logging.info("finetune split %d/%d (%s %s): AUC %.3f", n, len(splits), split.scheme,
                 split.name, metrics["roc_auc"])
  results = {scheme: linear_probe.summarise(v) for scheme, v in per_split.items()}
  results["splits"] = per_split
  results["meta"] = {"checkpoint": os.path.abspath(config.checkpoint), "mode": config.mode,
                     "steps": int(config.steps), "pool": config.pool,
                     "subjects": len(feats.subjects)}
  outputs.write_json(paths["finetune_results.json"], results)
  with open(paths["finetune_table.md"], "w", encoding="utf-8") as f:
    f.write(f"Fine-tuning ({config.mode}, {config.steps} steps), ADHD vs control: "
            f"{len(feats.subjects)} subjects\n\n" +
            probe.markdown_table(results, method=config.mode))
  final = train_one(trainer, config, source, feats, np.arange(len(feats.subjects)),
                    int(config.seed))
  ckpt = checkpoint_lib.Checkpointer(paths["classifier"], keep=1, async_save=False)
  ckpt.save(int(config.steps), {"params": final})
  ckpt.close()
  outputs.write_json(paths["classifier.json"], {
      "pretrained": os.path.abspath(config.checkpoint), "pretrained_step": pre.step,
      "pool": config.pool, "features": int(final["head"]["weight"].shape[0]),
      "mode": config.mode, "step": int(config.steps)})
  logging.info("finetune results:\n%s\nclassifier saved in %s",
               probe.markdown_table(results, method=config.mode), paths["classifier"])


def load_classifier(workdir: str, pre: pretrained_lib.Pretrained):
  """(params, pool) of the classifier a finetune run saved in `workdir`."""
  meta_path = os.path.join(workdir, "classifier.json")
  if not os.path.exists(meta_path):
    raise errors.InputError(f"{meta_path} is missing: config.classifier must name a finetune "
                            "workdir")
  with open(meta_path, encoding="utf-8") as f:
    meta = json.load(f)
  if meta["pretrained_step"] != pre.step:
    logging.warning("the classifier was fine-tuned from step %d, the encoder loaded is step %d",
                    meta["pretrained_step"], pre.step)
  vector = jax.ShapeDtypeStruct((meta["features"],), jnp.float32)
  abstract = {"params": {
      "encoder": jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), pre.params),
      "head": {"weight": vector, "bias": jax.ShapeDtypeStruct((), jnp.float32)},
      "norm": {"mean": vector, "scale": vector}}}
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "classifier"), async_save=False)
  try:
    state, _ = ckpt.restore(abstract)
  finally:
    ckpt.close()
  return state["params"], meta["pool"]
