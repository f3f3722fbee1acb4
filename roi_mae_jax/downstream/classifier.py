"""The ADHD classifier that fine-tuning trains and attribution explains.

    head = fit_linear_head(feats.features, feats.labels, pool="region_std")
    logit = clip_logit(pre, head)     # clips (B, K, X, Y, Z, T) -> (B,) ADHD logits
    head.save("head.npz"); LinearHead.load("head.npz")

A clip is K consecutive windows of a scan. The encoder turns it into time
courses of region embeddings, `features.pool_courses` into subject features
(amplitude, correlation, means: the probe's features), a standardisation and
a linear head into a logit, all one differentiable JAX function. The head is
the linear probe refitted on every labelled subject (standardised features,
C by inner CV), written as weights on raw features.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from roi_mae_jax import errors
from roi_mae_jax import outputs
from roi_mae_jax.downstream import features as features_lib
from roi_mae_jax.downstream import logistic
from roi_mae_jax.downstream import pretrained as pretrained_lib
from roi_mae_jax.training import checkpoint as checkpoint_lib


@dataclasses.dataclass(frozen=True, eq=False)
class LinearHead:
  mean: np.ndarray     # (F,) feature means of the fitting subjects
  scale: np.ndarray    # (F,) their standard deviations
  weight: np.ndarray   # (F,) on standardised features
  bias: float
  pool: str
  c: float             # the chosen inverse regularisation
  layers: tuple[int, ...] | None = None  # encoder blocks pooled (None: the output)

  def logit(self, features: jax.Array) -> jax.Array:
    z = (features - jnp.asarray(self.mean)) / jnp.asarray(self.scale)
    return z @ jnp.asarray(self.weight) + self.bias

  def save(self, path: str) -> None:
    np.savez(path, mean=self.mean, scale=self.scale, weight=self.weight,
             bias=np.float64(self.bias), pool=np.array(self.pool), c=np.float64(self.c),
             layers=np.array(self.layers if self.layers is not None else [], np.int64))

  @classmethod
  def load(cls, path: str) -> "LinearHead":
    with np.load(path) as f:
      layers = tuple(int(k) for k in f["layers"]) if "layers" in f.files else ()
      return cls(f["mean"], f["scale"], f["weight"], float(f["bias"]), str(f["pool"]),
                 float(f["c"]), layers or None)


def fit_linear_head(features: np.ndarray, labels: np.ndarray, pool: str,
                    inner_folds: int = 3, seed: int = 0,
                    layers: tuple[int, ...] | None = None) -> LinearHead:
  """Logistic regression on all labelled subjects, as the probe fits each fold."""
  model, c = logistic.fit_sklearn(features, labels, inner_folds=inner_folds, seed=seed)
  scaler = model[0]
  weight, bias = logistic.weights_of(model)
  scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
  return LinearHead(scaler.mean_.astype(np.float32), scale.astype(np.float32),
                    weight.astype(np.float32), bias, pool, c, layers)


def params_of(pre: pretrained_lib.Pretrained, head: LinearHead) -> dict:
  """The classifier as the parameter tree `logits` reads (and finetune trains)."""
  return {"encoder": pre.params,
          "head": {"weight": jnp.asarray(head.weight), "bias": jnp.asarray(head.bias, jnp.float32)},
          "norm": {"mean": jnp.asarray(head.mean), "scale": jnp.asarray(head.scale)}}


def clip_features(pre: pretrained_lib.Pretrained, pool: str, encoder_params,
                  clip: jax.Array, layers: tuple[int, ...] | None = None) -> jax.Array:
  """One clip (K, X, Y, Z, T) -> its subject features (F,), as features.EncoderFeatures
  (with `layers`: each block's courses pooled alone, rows joined)."""
  tokens, regions = pre.courses(encoder_params, clip, layers)
  tokens = tokens.reshape((-1,) + tokens.shape[2:])
  regions = regions.reshape((-1,) + regions.shape[2:])
  if layers is None:
    return features_lib.pool_courses(tokens, regions, pool)
  return jnp.concatenate([features_lib.pool_courses(tokens[:, k], regions[:, k], pool)
                          for k in range(len(layers))])


def logits(pre: pretrained_lib.Pretrained, pool: str, params: dict, clips,
           layers: tuple[int, ...] | None = None) -> jax.Array:
  """clips (B, K, X, Y, Z, T) -> (B,) ADHD logits of encoder + pooling + head."""
  feats = jax.vmap(lambda c: clip_features(pre, pool, params["encoder"], c, layers))(clips)
  z = (feats - params["norm"]["mean"]) / params["norm"]["scale"]
  return z @ params["head"]["weight"] + params["head"]["bias"]


def clip_logit(pre: pretrained_lib.Pretrained, head: LinearHead) -> Callable:
  """clips (B, K, X, Y, Z, T) -> (B,) ADHD logits, differentiable end to end."""
  params = params_of(pre, head)
  return lambda clips: logits(pre, head.pool, params, clips, head.layers)


def save_classifier(directory: str, params: dict, meta: dict) -> None:
  """params (encoder, head, norm) with Orbax in `directory`, `meta` beside it as JSON."""
  ckpt = checkpoint_lib.Checkpointer(directory, keep=1, async_save=False)
  ckpt.save(int(meta["step"]), {"params": params})
  ckpt.close()
  outputs.write_json(directory.rstrip("/") + ".json", meta)


def load_classifier(workdir: str, pre: pretrained_lib.Pretrained) -> tuple[dict, dict]:
  """(params, meta) of the classifier a finetune run saved in `workdir`."""
  meta_path = os.path.join(workdir, "classifier.json")
  if not os.path.exists(meta_path):
    raise errors.InputError(f"{meta_path} is missing: config.classifier must name a finetune "
                            "workdir")
  with open(meta_path, encoding="utf-8") as f:
    meta = json.load(f)
  features_lib.check_pools(meta["pool"])
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
  return state["params"], meta
