"""Metrics of multi-label classification: F1 as Kaggle scored it, thresholds per class, and the order
of the worst mistakes. (The losses are in ``losses``.)"""
from __future__ import annotations

import numpy as np
import pandas as pd
from fastai.metrics import skm_to_fastai
from sklearn.metrics import f1_score, precision_recall_fscore_support


def f1_metric(average: str, thresh: float = 0.5):
    """sklearn's F1 as a fastai metric. ``zero_division=0`` scores a class that is neither present
    nor predicted as 0, as the HPA 2018 leaderboard did, and keeps sklearn from warning every epoch."""
    return skm_to_fastai(f1_score, thresh=thresh, flatten=False, average=average, zero_division=0,
                         name=f"f1_{average}")


def binary_f1(preds: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """F1 of each column of boolean ``preds`` against ``targets`` (0 where undefined)."""
    tp = (preds & targets).sum(0)
    denom = preds.sum(0) + targets.sum(0)
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)


def tune_thresholds(probs: np.ndarray, targets: np.ndarray, default: float = 0.5,
                    min_positives: int = 3, grid=None) -> np.ndarray:
    """One threshold per class that maximises that class's F1 on validation predictions.

    Classes with fewer than ``min_positives`` positives keep ``default``: a threshold tuned
    on one or two examples is noise. Ties go to the value nearest ``default``, and ``default``
    is among the candidates, so no class scores lower than at ``default``.
    """
    grid = np.unique(np.r_[np.arange(0.05, 0.951, 0.025).round(3), default]) if grid is None else np.asarray(grid)
    targets = targets.astype(bool)
    out = np.full(probs.shape[1], default, dtype=float)
    order = np.argsort(np.abs(grid - default), kind="stable")
    for c in range(probs.shape[1]):
        if targets[:, c].sum() < min_positives:
            continue
        scores = binary_f1(probs[:, c, None] >= grid[None, order], np.repeat(targets[:, c, None], len(grid), 1))
        out[c] = grid[order][int(np.argmax(scores))]
    return out


def decode(probs: np.ndarray, thresholds) -> np.ndarray:
    """Labels as a boolean matrix; a row where no class passes gets its most probable class,
    since a submission row without a label can only score zero."""
    preds = probs >= np.asarray(thresholds)[None, :]
    empty = ~preds.any(1)
    preds[empty, probs[empty].argmax(1)] = True
    return preds


def f1_scores(probs: np.ndarray, targets: np.ndarray, thresholds) -> dict:
    """Macro, micro and samples F1 of the labels that pass ``thresholds``."""
    preds = probs >= np.asarray(thresholds)[None, :]
    targets = targets.astype(bool)
    return {avg: float(f1_score(targets, preds, average=avg, zero_division=0))
            for avg in ("macro", "micro", "samples")}


def split_halves(targets: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two halves of the rows, each class's positives dealt as evenly as the labels allow
    (multi-label iterative stratification), so that a rare class has positives on both sides."""
    from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

    kfold = MultilabelStratifiedKFold(n_splits=2, shuffle=True, random_state=seed)
    first, second = next(kfold.split(np.zeros(len(targets)), targets.astype(int)))
    return second, first


def out_of_sample_f1(probs: np.ndarray, targets: np.ndarray, default: float = 0.5, seed: int = 0,
                     min_positives: int = 3) -> dict | None:
    """F1 with tuned thresholds, measured on images the thresholds were not tuned on: tuned on one
    half of the rows and scored on the other, then the reverse, the two scores averaged. The
    in-sample tuned score (thresholds tuned and scored on the same rows) is optimistic, most of all
    for rare classes, whose few positives the thresholds fit. None for fewer than 4 rows."""
    if len(targets) < 4:
        return None
    targets = targets.astype(bool)
    halves = split_halves(targets, seed)
    scores = []
    for tune, score in (halves, halves[::-1]):
        thresholds = tune_thresholds(probs[tune], targets[tune], default, min_positives)
        scores.append(f1_scores(probs[score], targets[score], thresholds))
    return {avg: float(np.mean([s[avg] for s in scores])) for avg in scores[0]}


def per_class_report(probs: np.ndarray, targets: np.ndarray, thresholds, names) -> pd.DataFrame:
    preds = probs >= np.asarray(thresholds)[None, :]
    p, r, f, s = precision_recall_fscore_support(targets.astype(bool), preds, average=None,
                                                 zero_division=0)
    return pd.DataFrame({"class": range(len(names)), "name": names, "threshold": np.asarray(thresholds, float),
                         "precision": p, "recall": r, "f1": f, "support": s})


def worst_first(probs: np.ndarray, preds: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Row order with the worst mistakes first: the number of wrong labels (missed or extra), then,
    among equal counts, how far the probabilities are from the truth (that term stays below 1, so
    it only breaks ties)."""
    wrong = (preds != targets).sum(1) + np.abs(probs - targets).sum(1) / (probs.shape[1] + 1)
    return np.argsort(-wrong, kind="stable")
