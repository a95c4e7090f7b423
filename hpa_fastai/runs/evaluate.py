"""Scoring a trained model on a labelled folder: per-class precision, recall and F1, the macro,
micro and samples F1, and plots of the per-class F1 and of the worst mistakes."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import metrics as M
from .. import plots
from ..atomic import write_csv, write_json
from ..data.images import read_image
from ..data.layouts import CHANNEL_SETS, detect_format, labels_matrix, read_items
from ..inference.submission import check_compatible, input_files, model_dirs, workers_for
from ..outputs import check_output_folder, for_spreadsheet
from ..rundir import EVALUATE

EVALUATION_FILES = ("per_class.csv", "summary.json", "per_class_f1.png", "samples.png")


def evaluate(pred, data: Path, out=None, threshold: float | None = None, tta: str | None = None, bs: int = 32,
             workers: int | None = None) -> dict:
    """Score ``pred`` on the labelled competition folder ``data``; writes the report into ``out``
    (default: the model's run folder's ``evaluate/``). Returns ``report`` (per class), ``f1``,
    ``images`` and ``out``."""
    fmt = detect_format(data)
    check_compatible(pred, fmt)
    items = read_items(data, fmt, split="train", labelled=True, channels=pred.channels)
    out = check_output_folder(out if out is not None else pred.source / EVALUATE, "--out", EVALUATION_FILES,
                              input_files(items, pred.channels, data / "train.csv"), model_dirs(pred))
    probs = pred.probabilities(items, tta, bs, workers_for(workers, items))
    targets = labels_matrix(items["labels"], len(pred.names)).astype(bool)
    thresholds = pred.thresholds if threshold is None else np.full(len(pred.names), threshold)
    return {**evaluation_report(probs, targets, thresholds, pred.names, items, pred.channels, out),
            "images": len(items), "out": out}


def evaluation_report(probs, targets, thresholds, names, items, channels, out: Path, n_images: int = 16) -> dict:
    """Write per_class.csv, summary.json, per_class_f1.png and samples.png (worst mistakes first)."""
    report = M.per_class_report(probs, targets, thresholds, names)
    f1 = M.f1_scores(probs, targets, thresholds)
    write_csv(out / "per_class.csv", for_spreadsheet(report))
    write_json(out / "summary.json", {"images": int(len(targets)), "f1": f1, "thresholds": list(map(float, thresholds))})
    plots.f1_bars_plot(out / "per_class_f1.png", report)
    preds = M.decode(probs, thresholds)
    order = M.worst_first(probs, preds, targets)[:n_images]
    images = [read_image(items["key"].iloc[i], CHANNEL_SETS[channels], size=128) for i in order]
    titles = [f"{items['id'].iloc[i]}\ntrue: {_label_text(targets[i])}\npred: {_label_text(preds[i])}" for i in order]
    plots.sample_grid_plot(out / "samples.png", images, titles)
    return {"report": report, "f1": f1}


def _label_text(row) -> str:
    return " ".join(str(i) for i in np.flatnonzero(row)) or "-"
