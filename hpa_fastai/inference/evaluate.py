"""``evaluate``: a trained model scored on a labelled folder (see ``evaluation``), with per-class
precision, recall and F1, the macro, micro and samples F1, and plots of the per-class F1 and of the
worst mistakes."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from .. import metrics as M
from .. import plots
from ..atomic import write_json
from ..data.images import read_image
from ..data.layouts import CHANNEL_SETS, detect_format, labels_matrix, read_items
from ..evaluation import label_text, score, write_per_class
from ..errors import HPAError
from ..outputs import check_output_folder
from ..runs.files import read_config, read_valid_predictions
from ..runs.folder import EVAL_SAMPLES, EVAL_SUMMARY, EVALUATE, EVALUATION_FILES
from .predictor import Ensemble
from .submission import check_compatible, input_files, model_dirs, workers_for

logger = logging.getLogger(__name__)


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
    trained, runs = trained_images(pred, data, items)
    if trained:
        logger.warning(f"{data} is training data of {', '.join(map(str, runs))}: the model trained on {trained} of its "
                       f"{len(items)} images, so these scores are optimistic; evaluate on labelled images it never saw")
    probs = pred.probabilities(items, tta, bs, workers_for(workers, items))
    targets = labels_matrix(items["labels"], len(pred.names)).astype(bool)
    thresholds = pred.thresholds if threshold is None else np.full(len(pred.names), threshold)
    scores = score(probs, targets, pred.names, thresholds=thresholds)
    write_per_class(out, scores.per_class, for_people=True)
    write_json(out / EVAL_SUMMARY, {"images": int(len(targets)), "f1": scores.tuned,
                                    "thresholds": list(map(float, thresholds))})
    _worst_mistakes_plot(out / EVAL_SAMPLES, probs, targets, thresholds, items, pred.channels)
    return {"report": scores.per_class, "f1": scores.tuned, "images": len(items), "out": out, "trained_on": trained}


def _same_folder(a, b) -> bool:
    try:
        return os.path.samefile(Path(a), Path(b))
    except (OSError, TypeError, ValueError):  # gone, or moved since: not the same folder any more
        return False


def trained_images(pred, data: Path, items) -> tuple[int, list[Path]]:
    """How many of ``items`` (the labelled folder ``data``) the model trained on, and the runs that
    did: a run trained on the images of its ``--data`` (or ``--extra-data``) folder that are not among
    its validation images; an ensemble's members each count (a cross-validation trained on them all).
    Runs whose config or validation predictions cannot be read are left out."""
    members = pred.members if isinstance(pred, Ensemble) else [pred]
    trained, runs = np.zeros(len(items), bool), []
    for member in members:
        try:
            config = read_config(member.source)
            extra = config.get("extra_data")
            folders = [config.get("data"), *(extra if isinstance(extra, list) else [extra])]
            if not any(isinstance(f, str) and _same_folder(f, data) for f in folders):
                continue
            valid = set(read_valid_predictions(member.source)["id"])
        except HPAError:
            continue
        trained |= ~items["id"].isin(valid).to_numpy()
        runs.append(member.source)
    if isinstance(pred, Ensemble) and runs:  # name the cross-validation rather than each of its folds
        runs = [pred.source]
    return int(trained.sum()), runs


def _worst_mistakes_plot(path: Path, probs, targets, thresholds, items, channels: str, n_images: int = 16) -> None:
    preds = M.decode(probs, thresholds)
    order = M.worst_first(probs, preds, targets)[:n_images]
    images = [read_image(items["key"].iloc[i], CHANNEL_SETS[channels], size=128) for i in order]
    titles = [f"{items['id'].iloc[i]}\ntrue: {label_text(targets[i]) or '-'}\npred: {label_text(preds[i]) or '-'}"
              for i in order]
    plots.sample_grid_plot(path, images, titles)
