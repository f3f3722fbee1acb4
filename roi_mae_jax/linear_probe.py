"""Linear probes (scikit-learn and JAX) on subject features, and their metrics.

    probs, C = sklearn_probe(x_train, y_train, x_test)      # standardised, C by inner CV
    probs, C = jax_probe(x_train, y_train, x_test)          # the same model in JAX/optax
    binary_metrics(y_test, probs)                           # accuracy, AUC, ...

Both fit L2-regularised logistic regression on standardised features (train
statistics), classes weighted to balance (so the 0.5 threshold suits balanced
accuracy when the groups differ in size), with C picked from `CS` by inner stratified CV on log-loss. The
JAX probe trains every (C, inner fold) pair and the refits at once in one
vmapped, jitted loop, which suits feature sets too large for scikit-learn
(region pooling of a base model: 166 x 768 features).
"""

from __future__ import annotations

import warnings
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn import decomposition
from sklearn import exceptions as sk_exceptions
from sklearn import linear_model
from sklearn import metrics as sk_metrics
from sklearn import model_selection
from sklearn import pipeline as sk_pipeline
from sklearn import preprocessing

METRICS = ("accuracy", "balanced_accuracy", "roc_auc", "sensitivity", "specificity")
CS = tuple(float(c) for c in np.logspace(-4, 2, 7))


def binary_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> dict:
  """The five metrics; ROC AUC is NaN when the test side has one class only."""
  labels = np.asarray(labels).astype(int)
  predicted = (np.asarray(probs) >= threshold).astype(int)
  tp = int(np.sum((predicted == 1) & (labels == 1)))
  tn = int(np.sum((predicted == 0) & (labels == 0)))
  pos, neg = int(labels.sum()), int((1 - labels).sum())
  sensitivity = tp / pos if pos else float("nan")
  specificity = tn / neg if neg else float("nan")
  both = pos and neg
  return {"accuracy": float(np.mean(predicted == labels)),
          "balanced_accuracy": float(np.nanmean([sensitivity, specificity])),
          "roc_auc": float(sk_metrics.roc_auc_score(labels, probs)) if both else float("nan"),
          "sensitivity": sensitivity, "specificity": specificity}


def summarise(per_split: Sequence[dict]) -> dict:
  """metric -> {mean, std, n} over splits (NaNs left out)."""
  out = {}
  for name in METRICS:
    values = np.array([m[name] for m in per_split], float)
    values = values[np.isfinite(values)]
    out[name] = {"mean": float(values.mean()) if len(values) else float("nan"),
                 "std": float(values.std()) if len(values) else float("nan"),
                 "n": int(len(values))}
  return out


def _inner_folds(y: np.ndarray, inner_folds: int) -> int:
  return max(2, min(inner_folds, int(np.bincount(y, minlength=2).min())))


def fit_sklearn(x_train, y_train, inner_folds: int = 3, cs: Sequence[float] = CS,
                seed: int = 0):
  """(fitted StandardScaler + PCA + LogisticRegressionCV pipeline, chosen C).

  `weights_of(model)` gives its weights on the standardised features.
  """
  cv = model_selection.StratifiedKFold(_inner_folds(y_train, inner_folds), shuffle=True,
                                       random_state=seed)
  # With more features than subjects the L2-optimal weights lie in the span of
  # the training rows, so fitting on their coordinates in that span (an
  # orthogonal projection: norms and predictions unchanged, no labels used) is
  # exact and turns a 20,000-feature fit into a 60-feature one.
  model = sk_pipeline.make_pipeline(
      preprocessing.StandardScaler(),
      decomposition.PCA(svd_solver="full"),
      linear_model.LogisticRegressionCV(Cs=list(cs), cv=cv, scoring="neg_log_loss",
                                        class_weight="balanced", max_iter=5000))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", sk_exceptions.ConvergenceWarning)
    warnings.simplefilter("ignore", FutureWarning)
    model.fit(x_train, y_train)
  return model, float(np.ravel(model[-1].C_)[0])


def weights_of(model) -> tuple[np.ndarray, float]:
  """(weights on the standardised features, intercept) of a `fit_sklearn` pipeline."""
  pca, logistic = model[1], model[-1]
  weight = pca.components_.T @ logistic.coef_[0]
  return weight, float(logistic.intercept_[0] - pca.mean_ @ weight)


def sklearn_probe(x_train, y_train, x_test, inner_folds: int = 3, cs: Sequence[float] = CS,
                  seed: int = 0) -> tuple[np.ndarray, float]:
  """(test probabilities of class 1, chosen C)."""
  model, c = fit_sklearn(x_train, y_train, inner_folds, cs, seed)
  return model.predict_proba(x_test)[:, 1], c


@jax.jit
def _fit_many(x, y, weights, l2):
  """Logistic regressions, one per row of `weights` (sample weights) and `l2`.

  Full-batch Adam from zero for a fixed number of steps: the problem is convex
  and standardised, and a fixed loop keeps it one compiled program.
  """
  dim = x.shape[1]

  def objective(params, w, lam):
    logits = x @ params["w"] + params["b"]
    losses = optax.sigmoid_binary_cross_entropy(logits, y)
    return jnp.sum(w * losses) / jnp.sum(w) + 0.5 * lam * jnp.sum(params["w"] ** 2)

  tx = optax.adam(0.05)

  def fit_one(w, lam):
    params = {"w": jnp.zeros(dim), "b": jnp.zeros(())}
    state = tx.init(params)

    def step(carry, _):
      params, state = carry
      grads = jax.grad(objective)(params, w, lam)
      updates, state = tx.update(grads, state)
      return (optax.apply_updates(params, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, state), None, length=600)
    return params

  return jax.vmap(fit_one)(weights, l2)


def jax_probe(x_train, y_train, x_test, inner_folds: int = 3, cs: Sequence[float] = CS,
              seed: int = 0) -> tuple[np.ndarray, float]:
  """(test probabilities of class 1, chosen C), like `sklearn_probe`, in one jitted call."""
  mean, std = x_train.mean(0), x_train.std(0)
  std = np.where(std > 0, std, 1.0)
  x = jnp.asarray((x_train - mean) / std, jnp.float32)
  y = jnp.asarray(y_train, jnp.float32)
  n = len(y_train)
  cv = model_selection.StratifiedKFold(_inner_folds(y_train, inner_folds), shuffle=True,
                                       random_state=seed)
  folds = list(cv.split(np.zeros(n), y_train))
  masks = [np.isin(np.arange(n), train).astype(np.float32) for train, _ in folds]
  masks.append(np.ones(n, np.float32))  # the refit on all training subjects
  # Classes weighted n / (2 n_class) within each fit, as class_weight="balanced".
  masks = [m * np.where(y_train == 1, m.sum() / (2 * max(m[y_train == 1].sum(), 1)),
                        m.sum() / (2 * max(m[y_train == 0].sum(), 1))) for m in masks]
  weights = np.repeat(np.stack(masks), len(cs), axis=0).astype(np.float32)
  # sklearn minimises C * sum(weighted loss) + |w|^2 / 2; per unit weight 1 / (C * n_fit).
  n_fit = weights.sum(1)
  l2 = 1.0 / (np.tile(np.asarray(cs), len(masks)) * n_fit)
  params = _fit_many(x, y, jnp.asarray(weights), jnp.asarray(l2, jnp.float32))
  logits = np.asarray(x @ params["w"].T + params["b"])            # (n, models)
  losses = np.asarray(optax.sigmoid_binary_cross_entropy(logits, np.asarray(y)[:, None]))
  val_loss = np.zeros(len(cs))
  for f, (_, val) in enumerate(folds):
    val_loss += losses[val, f * len(cs):(f + 1) * len(cs)].mean(0)
  best = int(np.argmin(val_loss))
  refit = len(folds) * len(cs) + best
  test = jnp.asarray((x_test - mean) / std, jnp.float32)
  probs = jax.nn.sigmoid(test @ params["w"][refit] + params["b"][refit])
  return np.asarray(probs), float(cs[best])
