"""``evaluate``: a trained model scored on a labelled folder (see ``evaluation``), with per-class
precision, recall and F1, the macro, micro and samples F1, and plots of the per-class F1 and of the
worst mistakes."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import metrics as M
from .. import plots
from ..atomic import write_json
from ..data.images import read_image
from ..data.layouts import CHANNEL_SETS, detect_format, labels_matrix, read_items
from ..evaluation import label_text, score, write_per_class
from ..outputs import check_output_folder
from ..runs.folder import EVAL_SAMPLES, EVAL_SUMMARY, EVALUATE, EVALUATION_FILES
from .submission import check_compatible, input_files, model_dirs, workers_for


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
    scores = score(probs, targets, pred.names, thresholds=thresholds)
    write_per_class(out, scores.per_class, for_people=True)
    write_json(out / EVAL_SUMMARY, {"images": int(len(targets)), "f1": scores.tuned,
                                    "thresholds": list(map(float, thresholds))})
    _worst_mistakes_plot(out / EVAL_SAMPLES, probs, targets, thresholds, items, pred.channels)
    return {"report": scores.per_class, "f1": scores.tuned, "images": len(items), "out": out}


def _worst_mistakes_plot(path: Path, probs, targets, thresholds, items, channels: str, n_images: int = 16) -> None:
    preds = M.decode(probs, thresholds)
    order = M.worst_first(probs, preds, targets)[:n_images]
    images = [read_image(items["key"].iloc[i], CHANNEL_SETS[channels], size=128) for i in order]
    titles = [f"{items['id'].iloc[i]}\ntrue: {label_text(targets[i]) or '-'}\npred: {label_text(preds[i]) or '-'}"
              for i in order]
    plots.sample_grid_plot(path, images, titles)
