"""The linear probe (scikit-learn) on subject features, and its metrics.

    probs, C = sklearn_probe(x_train, y_train, x_test)      # standardised, C by inner CV
    model, C = fit_sklearn(x_train, y_train)                # the fitted pipeline
    weight, bias = weights_of(model)                        # on the standardised features
    binary_metrics(y_test, probs)                           # accuracy, AUC, ...

L2-regularised logistic regression on standardised features (train
statistics), classes weighted to balance (so the 0.5 threshold suits balanced
accuracy when the groups differ in size), with C picked from `CS` by inner
stratified CV on log-loss. It is fitted on the coordinates of the training
rows in their span (PCA), which is exact and makes 100,000 features cost what
60 do.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
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
  # exact and turns a 20,000-feature fit into a 60-feature one. That fit is
  # cheap, so it is solved tightly (tol): at C = 100 the default 1e-4 leaves the
  # weights a few percent off the optimum.
  model = sk_pipeline.make_pipeline(
      preprocessing.StandardScaler(),
      decomposition.PCA(svd_solver="full"),
      linear_model.LogisticRegressionCV(Cs=list(cs), cv=cv, scoring="neg_log_loss",
                                        class_weight="balanced", max_iter=5000,
                                        tol=1e-8))
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
