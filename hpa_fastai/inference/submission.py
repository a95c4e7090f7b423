"""Predictions written out: a Kaggle submission for a competition folder (every test id, in the
order of its submission CSV), or one row of labels, names and probabilities per image for a
folder of images or a single image."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..atomic import write_csv
from ..data.layouts import CHANNEL_SETS, FORMATS, Format, detect_format, key_files, read_items, scan_images
from ..data.pipeline import bound_workers, default_workers
from ..errors import HPAError
from ..outputs import check_output, for_spreadsheet
from .predictor import Ensemble


def competition_format(data: Path) -> Format | None:
    """The competition layout of ``data`` if it is a competition folder, else None."""
    if not data.is_dir():
        return None
    if (data / "sample_submission.csv").is_file():
        return FORMATS["hpa2018"]
    if (data / "submission.csv").is_file() or ((data / "test").is_dir() and (data / "train.csv").is_file()):
        return detect_format(data) if (data / "train.csv").is_file() else FORMATS["z2g"]
    return None


def check_compatible(pred, fmt: Format) -> None:
    if fmt.name != pred.format:
        raise HPAError(f"the model was trained on {pred.format} data ({len(pred.names)} classes) "
                       f"but this folder is in the {fmt.name} layout")
    if pred.channels == "rgby" and not fmt.channel_files:
        raise HPAError("the model expects 4 channels (RGBY, one file per stain); this folder has RGB images")


def workers_for(workers: int | None, items: pd.DataFrame) -> int:
    return bound_workers(workers, len(items), default_workers(torch.cuda.is_available()))


def model_dirs(pred) -> list[Path]:
    """The run folders a predictor was loaded from (an ensemble's members and its cv folder)."""
    if isinstance(pred, Ensemble):
        return [m.source for m in pred.members] + [pred.source]
    return [pred.source]


def input_files(items: pd.DataFrame, channels: str, *csvs: Path) -> list:
    """The files a command reads for ``items``: the label CSVs and every image file."""
    return [*csvs, *(f for key in items["key"] for f in key_files(key, CHANNEL_SETS[channels]))]


@dataclass
class Predictions:
    out: Path
    table: pd.DataFrame  # what was written
    submission: Format | None  # the competition layout, for a Kaggle submission


def prediction_items(pred, data: Path) -> tuple[pd.DataFrame, Format | None]:
    """What ``predict`` predicts in ``data`` for ``pred``: a competition folder's test images (with its
    layout, checked against the model's), or the images of a folder, or one image (layout None)."""
    fmt = competition_format(Path(data))
    if fmt is None:
        return scan_images(Path(data), pred.channels), None
    check_compatible(pred, fmt)
    return read_items(Path(data), fmt, split="test", labelled=False, channels=pred.channels), fmt


def write_predictions(pred, data: Path, out, threshold: float | None = None, tta: str | None = None,
                      bs: int = 32, workers: int | None = None) -> Predictions:
    """Predict every image of ``data`` with ``pred`` (a Predictor or Ensemble) and write ``out``."""
    items, fmt = prediction_items(pred, data)
    if fmt is not None:
        out = check_output(out, "--out", input_files(items, pred.channels, data / "train.csv",
                                                     data / fmt.submission_csv), model_dirs(pred))
        probs = pred.probabilities(items, tta, bs, workers_for(workers, items))
        preds = pred.decode(probs, threshold)
        labels = [" ".join(str(i) for i in np.flatnonzero(row)) for row in preds]
        # ids verbatim, not made safe for spreadsheets: Kaggle matches them exactly
        sub = pd.DataFrame({fmt.id_col: items["id"], fmt.submission_label_col: labels})
        write_csv(out, sub)
        return Predictions(out, sub, fmt)
    out = check_output(out, "--out", input_files(items, pred.channels), model_dirs(pred))
    probs = pred.probabilities(items, tta, bs, workers_for(workers, items))
    preds = pred.decode(probs, threshold)
    rows = pd.DataFrame({
        "image": items["id"],
        "labels": [" ".join(str(i) for i in np.flatnonzero(r)) for r in preds],
        "names": ["; ".join(pred.names[i] for i in np.flatnonzero(r)) for r in preds],
        "probabilities": [" ".join(f"{probs[n, i]:.4f}" for i in np.flatnonzero(r)) for n, r in enumerate(preds)],
    })
    write_csv(out, for_spreadsheet(rows))  # a table for people: file names starting with = stay text
    return Predictions(out, rows, None)
