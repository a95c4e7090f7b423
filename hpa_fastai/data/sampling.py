"""Oversampling of rare classes: each training image's sampling weight from its rarest label.

The weights go to fastai's ``WeightedDL`` (``Datasets.weighted_dataloaders``), which draws an
epoch's worth of indices with replacement. It fits the rest of the pipeline as it is: it draws
from numpy's global random stream, which ``set_seed`` seeds and the checkpoint saves and
``--resume`` restores; under several processes fastai's ``DistributedDL`` asks it for the indices
on every rank, keeps rank 0's and gives each rank its own slice of them.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .layouts import labels_matrix


def class_frequencies(labels: pd.Series, n_classes: int) -> np.ndarray:
    """Share of the images that carry each class."""
    y = labels_matrix(labels, n_classes)
    return y.mean(0) if len(y) else np.zeros(n_classes)


def oversampling_weights(labels: pd.Series, n_classes: int, cap: float) -> np.ndarray:
    """One weight per image: how much more often it is drawn than an image whose labels are all
    of the most common class, i.e. that class's frequency over the frequency of the image's rarest
    label, at most ``cap``. The cap keeps the common images in every epoch: uncapped, an image of a
    class with 10 examples would be drawn as often as 1,000 images of Nucleoplasm. An image without
    labels gets weight 1."""
    y = labels_matrix(labels, n_classes).astype(bool)
    freq = y.mean(0) if len(y) else np.zeros(n_classes)
    if not freq.any():
        return np.ones(len(y))
    ratio = np.where(y, freq.max() / np.where(freq > 0, freq, 1.0)[None, :], 1.0)
    return np.minimum(ratio.max(1, initial=1.0), cap)


def expected_draws(weights: np.ndarray, labels: pd.Series, n_classes: int) -> pd.DataFrame:
    """Per class: its images, and how many of an epoch's draws carry it without and with the weights."""
    y = labels_matrix(labels, n_classes).astype(float)
    p = weights / weights.sum()
    return pd.DataFrame({"class": range(n_classes), "images": y.sum(0).astype(int),
                         "share": y.mean(0), "share oversampled": p @ y})
