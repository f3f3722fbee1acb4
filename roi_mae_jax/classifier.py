"""The ADHD classifier attribution explains: frozen encoder -> pooled features -> linear head.

    head = fit_linear_head(feats.features, feats.labels, pool="region")
    logit = window_logit(pre, head)           # windows (B, X, Y, Z, T) -> (B,) ADHD logits
    head.save("head.npz"); LinearHead.load("head.npz")

The head is the linear probe refitted on every labelled subject (standardised
features, C by inner CV), written as weights on raw features so the whole
path from voxels to logit is one differentiable JAX function.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from roi_mae_jax import linear_probe
from roi_mae_jax import pretrained as pretrained_lib


@dataclasses.dataclass(frozen=True, eq=False)
class LinearHead:
  mean: np.ndarray     # (F,) feature means of the fitting subjects
  scale: np.ndarray    # (F,) their standard deviations
  weight: np.ndarray   # (F,) on standardised features
  bias: float
  pool: str
  c: float             # the chosen inverse regularisation

  def logit(self, features: jax.Array) -> jax.Array:
    z = (features - jnp.asarray(self.mean)) / jnp.asarray(self.scale)
    return z @ jnp.asarray(self.weight) + self.bias

  def save(self, path: str) -> None:
    np.savez(path, mean=self.mean, scale=self.scale, weight=self.weight,
             bias=np.float64(self.bias), pool=np.array(self.pool), c=np.float64(self.c))

  @classmethod
  def load(cls, path: str) -> "LinearHead":
    with np.load(path) as f:
      return cls(f["mean"], f["scale"], f["weight"], float(f["bias"]), str(f["pool"]),
                 float(f["c"]))


def fit_linear_head(features: np.ndarray, labels: np.ndarray, pool: str,
                    inner_folds: int = 3, seed: int = 0) -> LinearHead:
  """Logistic regression on all labelled subjects, as the probe fits each fold."""
  model, c = linear_probe.fit_sklearn(features, labels, inner_folds=inner_folds, seed=seed)
  scaler, logistic = model[0], model[-1]
  scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
  return LinearHead(scaler.mean_.astype(np.float32), scale.astype(np.float32),
                    logistic.coef_[0].astype(np.float32), float(logistic.intercept_[0]), pool, c)


def params_of(pre: pretrained_lib.Pretrained, head: LinearHead) -> dict:
  """The classifier as the parameter tree `logits` reads (and finetune trains)."""
  return {"encoder": pre.params,
          "head": {"weight": jnp.asarray(head.weight), "bias": jnp.asarray(head.bias, jnp.float32)},
          "norm": {"mean": jnp.asarray(head.mean), "scale": jnp.asarray(head.scale)}}


def logits(pre: pretrained_lib.Pretrained, pool: str, params: dict, windows) -> jax.Array:
  """windows (B, X, Y, Z, T) -> (B,) ADHD logits of encoder + pooling + head."""
  features = pre.pool(pre.encode(params["encoder"], windows), pool)
  z = (features - params["norm"]["mean"]) / params["norm"]["scale"]
  return z @ params["head"]["weight"] + params["head"]["bias"]


def window_logit(pre: pretrained_lib.Pretrained, head: LinearHead) -> Callable:
  """windows (B, X, Y, Z, T) -> (B,) ADHD logits, differentiable end to end."""
  params = params_of(pre, head)
  return lambda windows: logits(pre, head.pool, params, windows)
