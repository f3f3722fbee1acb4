"""Subject-disjoint evaluation splits: repeated stratified k-fold, leave one site out.

    splits = kfold_splits(labels, folds=5, seeds=(0, 1, 2))
    splits += leave_one_site_out(sites, labels)
    check_disjoint(splits, subjects)          # raises if a subject is on both sides

Rows are subjects (windows were already averaged per subject), so a split of
rows is a split of subjects.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from sklearn import model_selection

from roi_mae_jax import errors
from roi_mae_jax.config import validation


@dataclasses.dataclass(frozen=True)
class Split:
  scheme: str          # "kfold" | "loso"
  name: str            # "seed0/fold2", "site=NYU"
  train: np.ndarray    # row indices
  test: np.ndarray


def kfold_splits(labels: np.ndarray, folds: int, seeds: Sequence[int]) -> list[Split]:
  """Stratified k-fold over subjects, once per seed."""
  counts = np.bincount(labels, minlength=2)
  if counts.min() < folds:
    raise errors.InputError(f"{counts[1]} ADHD and {counts[0]} control subjects cannot fill "
                            f"{folds} stratified folds; lower folds")
  splits = []
  for seed in seeds:
    kfold = model_selection.StratifiedKFold(folds, shuffle=True, random_state=int(seed))
    for k, (train, test) in enumerate(kfold.split(np.zeros(len(labels)), labels)):
      splits.append(Split("kfold", f"seed{seed}/fold{k}", train, test))
  return splits


def leave_one_site_out(sites: Sequence[str], labels: np.ndarray) -> list[Split]:
  """Each site in turn is the test set; sites whose rest lacks a class are skipped."""
  sites = np.asarray(sites)
  splits = []
  for site in sorted(set(sites.tolist())):
    test = np.flatnonzero(sites == site)
    train = np.flatnonzero(sites != site)
    if len(np.unique(labels[train])) == 2:
      splits.append(Split("loso", f"site={site}", train, test))
  if not splits:
    raise errors.InputError("leave-one-site-out needs at least two sites")
  return splits


def check_disjoint(splits: Sequence[Split], subjects: Sequence[str]) -> None:
  """Raises if any subject id appears in both the train and test side of a split."""
  subjects = np.asarray(subjects)
  for split in splits:
    both = set(subjects[split.train]) & set(subjects[split.test])
    if both:
      raise errors.InputError(f"split {split.scheme} {split.name} has subjects on both sides: "
                              f"{sorted(both)[:5]}")


SCHEMES = ("kfold", "loso")


def from_config(config, subjects: Sequence[str], labels: np.ndarray,
                sites: Sequence[str]) -> list[Split]:
  """The splits of `config.schemes` ('kfold,loso'), `config.folds`, `config.repeats`."""
  validation.refuse("schemes", config.schemes)
  schemes = [s.strip() for s in str(config.schemes).split(",") if s.strip()]
  out = []
  if "kfold" in schemes:
    out += kfold_splits(labels, int(config.folds), range(int(config.get("repeats", 1))))
  if "loso" in schemes:
    out += leave_one_site_out(sites, labels)
  check_disjoint(out, subjects)
  return out
