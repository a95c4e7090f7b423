"""Scoring predictions, the one way for every command: a run's best epoch on its validation images,
``evaluate`` on a labelled folder, ``cv`` on its out-of-fold predictions.

Per-class thresholds are tuned on the predictions; the tuned scores are given twice, scored on the
images they were tuned on (in-sample, optimistic for rare classes) and split-half (tuned on one half,
scored on the other, both ways, averaged), which is what new images will see. What a command keeps
of it goes into files whose names ``runs.folder`` gives.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import metrics as M
from . import plots
from .atomic import write_csv
from .outputs import for_spreadsheet
from .runs.folder import PER_CLASS, PER_CLASS_PLOT


@dataclass
class Scores:
    """Predictions scored: the thresholds decoded with, the per-class table, and macro, micro and
    samples F1 at one fixed threshold, at the tuned thresholds (in-sample) and split-half
    (out-of-sample; empty below 4 images)."""
    thresholds: np.ndarray
    per_class: pd.DataFrame
    at_threshold: dict
    tuned: dict
    tuned_oos: dict

    def flat(self) -> dict:
        """``f1_macro``, ``f1_macro_tuned``, ``f1_macro_tuned_oos`` ... as metrics.json and cv.json name them."""
        return {**{f"f1_{k}": v for k, v in self.at_threshold.items()},
                **{f"f1_{k}_tuned": v for k, v in self.tuned.items()},
                **{f"f1_{k}_tuned_oos": v for k, v in self.tuned_oos.items()}}


def score(probs: np.ndarray, targets: np.ndarray, names, threshold: float = 0.5, thresholds=None,
          seed: int = 0) -> Scores:
    """Score ``probs`` against boolean ``targets``. Without ``thresholds`` they are tuned per class
    on these predictions; the per-class table is at the thresholds used."""
    targets = np.asarray(targets).astype(bool)
    fixed = np.full(probs.shape[1], threshold)
    tuned_thresholds = M.tune_thresholds(probs, targets, default=threshold) if thresholds is None else None
    used = tuned_thresholds if thresholds is None else np.asarray(thresholds, float)
    oos = (M.out_of_sample_f1(probs, targets, default=threshold, seed=seed) or {}) if thresholds is None else {}
    return Scores(thresholds=used, per_class=M.per_class_report(probs, targets, used, names),
                  at_threshold=M.f1_scores(probs, targets, fixed), tuned=M.f1_scores(probs, targets, used),
                  tuned_oos=oos)


def label_text(row) -> str:
    """A boolean label row as the CSVs write labels: class ids separated by spaces."""
    return " ".join(map(str, np.flatnonzero(row)))


def predictions_table(ids, labels, probs: np.ndarray, thresholds, **columns) -> pd.DataFrame:
    """One row per image: id, any extra ``columns`` (key, fold), true labels, predicted labels
    (decoded as ``predict`` decodes: a row with none gets its most probable class) and probabilities."""
    return pd.DataFrame({"id": np.asarray(ids), **{k: np.asarray(v) for k, v in columns.items()},
                         "labels": np.asarray(labels),
                         "predicted": [label_text(row) for row in M.decode(probs, thresholds)],
                         "probs": [" ".join(f"{p:.4f}" for p in row) for row in probs]})


def write_per_class(folder: Path, per_class: pd.DataFrame, for_people: bool = False) -> None:
    """``per_class.csv`` and its bar plot ``per_class_f1.png`` in ``folder``; ``for_people``: text that
    a spreadsheet would run as a formula is quoted (a folder the tool never reads back)."""
    write_csv(folder / PER_CLASS, for_spreadsheet(per_class) if for_people else per_class)
    plots.f1_bars_plot(folder / PER_CLASS_PLOT, per_class)
