"""Training/validation splits: random, multi-label stratified K-fold (iterative stratification),
and either of them keeping near-duplicate groups on one side."""
from __future__ import annotations

import numpy as np
import pandas as pd
from fastai.data.transforms import IndexSplitter, RandomSplitter

from ..errors import HPAError
from .layouts import labels_matrix


def stratified_valid_idx(labels: pd.Series, n_classes: int, n_folds: int, fold: int, seed: int,
                         groups=None) -> np.ndarray:
    """Validation rows of fold ``fold`` of a multi-label stratified K-fold (iterative stratification).

    With ``groups`` (one name per row) whole groups are dealt to the folds, stratified on the
    union of each group's labels, so near-duplicates never sit on both sides.
    """
    y = labels_matrix(labels, n_classes)
    if groups is not None:
        codes, names = pd.factorize(np.asarray(groups, dtype=object))
        group_y = np.zeros((len(names), n_classes), np.uint8)
        np.maximum.at(group_y, codes, y)
        valid_groups = _stratified_fold(group_y, n_folds, fold, seed)
        return np.flatnonzero(np.isin(codes, valid_groups))
    return _stratified_fold(y, n_folds, fold, seed)


def _stratified_fold(y: np.ndarray, n_folds: int, fold: int, seed: int) -> np.ndarray:
    from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

    if n_folds > len(y):  # sklearn's ValueError otherwise
        raise HPAError(f"--n-folds {n_folds} is more than the {len(y)} images (or near-duplicate groups) to split")
    kfold = MultilabelStratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for k, (_, valid) in enumerate(kfold.split(np.zeros(len(y)), y)):
        if k == fold:
            return valid
    raise HPAError(f"--fold {fold} is out of range for --n-folds {n_folds}")


def grouped_valid_idx(groups, valid_pct: float, seed: int) -> np.ndarray:
    """A random split by whole groups: shuffled groups go to validation until ``valid_pct`` of the
    rows (at least one group) are there."""
    codes, names = pd.factorize(np.asarray(groups, dtype=object))
    order = np.random.default_rng(seed).permutation(len(names))
    filled = np.cumsum(np.bincount(codes, minlength=len(names))[order])
    n_valid = max(int(valid_pct * len(codes)), int(filled[0]))
    if n_valid >= len(codes):
        raise HPAError("duplicates.csv puts every image in one near-duplicate group: no split can keep it whole")
    return np.flatnonzero(np.isin(codes, order[filled <= n_valid]))


def make_splitter(df: pd.DataFrame, n_classes: int, valid_pct: float, seed: int,
                  n_folds: int = 0, fold: int = 0):
    """Random or stratified K-fold split; a ``group`` column (near-duplicates, from the data
    folder's duplicates.csv) keeps each group on one side."""
    groups = df["group"].to_numpy() if "group" in df.columns else None
    if n_folds and n_folds > 1:
        return IndexSplitter(stratified_valid_idx(df["labels"], n_classes, n_folds, fold, seed, groups))
    if groups is not None:
        return IndexSplitter(grouped_valid_idx(groups, valid_pct, seed))
    return RandomSplitter(valid_pct=valid_pct, seed=seed)


