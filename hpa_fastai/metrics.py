"""Metrics of multi-label classification: F1 as Kaggle scored it, thresholds per class, and the order
of the worst mistakes; the running losses and metrics of a fit, kept on the device. (The losses are in
``losses``.)"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from fastai.learner import AvgLoss, AvgSmoothLoss
from fastai.metrics import AccumMetric, ActivationType
from fastai.torch_core import find_bs
from sklearn.metrics import f1_score, precision_recall_fscore_support

# fastai's Recorder and metrics copy every batch's loss, predictions and targets to the host
# (``to_detach`` with ``cpu=True``): a copy to the host waits for the GPU to finish the step, so the
# host can no longer queue the next step's kernels while the GPU works. The three classes below are
# fastai's, accumulating on the device instead; their value is read once, at the end of the epoch.


class DeviceAvgSmoothLoss(AvgSmoothLoss):
    """fastai's ``AvgSmoothLoss`` (the training loss, exponentially smoothed) on the device. Its value
    is a device tensor: the Recorder reads it as a number after the epoch (and ``lr_find`` after every
    batch, which it needs to decide when to stop)."""

    def accumulate(self, learn):
        loss = learn.loss.detach()
        if loss.ndim or loss.dtype != torch.float32:  # a loss with reduction "none", or in half precision
            loss = loss.float().mean()
        if self.val.device != loss.device:  # reset, or a resumed run's value: the first batch of a fit
            self.val = self.val.to(loss.device)
        self.count += 1
        self.val = torch.lerp(loss, self.val, self.beta)


class DeviceAvgLoss(AvgLoss):
    """fastai's ``AvgLoss`` (the validation loss, averaged over images) summed on the device."""

    def accumulate(self, learn):
        bs = find_bs(learn.yb)
        self.total = learn.to_detach(learn.loss.detach().mean().float(), cpu=False) * bs + self.total
        self.count += bs

    @property
    def value(self):
        return self.total / self.count if self.count else None


class DeviceAccumMetric(AccumMetric):
    """fastai's ``AccumMetric`` (predictions and targets of the validation set, scored once at the
    end) keeping them on the device until they are scored, then copied to the host in one piece."""

    def accum_values(self, preds, targs, learn=None):
        preds, targs = (learn.to_detach(t, cpu=False) if learn is not None else t.detach() for t in (preds, targs))
        self.preds.append(preds)
        self.targs.append(targs)

    @property
    def value(self):
        if len(self.preds) == 0:
            return None
        preds, targs = torch.cat(self.preds).cpu().numpy(), torch.cat(self.targs).cpu().numpy()
        return self.func(targs, preds, **self.kwargs)


def f1_metric(average: str, thresh: float = 0.5):
    """sklearn's F1 as a fastai metric (what ``skm_to_fastai(f1_score, thresh=...)`` makes, kept on the
    device). ``zero_division=0`` scores a class that is neither present nor predicted as 0, as the HPA
    2018 leaderboard did, and keeps sklearn from warning every epoch."""
    return DeviceAccumMetric(f1_score, activation=ActivationType.Sigmoid, thresh=thresh, flatten=False,
                             average=average, zero_division=0, name=f"f1_{average}")


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
