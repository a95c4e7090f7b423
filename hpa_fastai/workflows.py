"""What the commands do, end to end, as Python functions: a training run with its report,
TensorBoard summary and ``latest`` link; a cross-validation of such runs; the learning-rate
finder alone. The CLI calls these; so can a script or a notebook."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from .config import TrainConfig
from .console import console, log, table
from .rundir import LR_FIND_PLOT, point_latest
from .training import cv
from .training.run import lr_find_run, train_run


def train(cfg: TrainConfig, run_name: str | None = None) -> Path | None:
    """Train one model as ``cfg`` says (or continue ``cfg.resume``); returns the run folder
    (``cfg.out/run_name`` if given, else ``cfg.out/<time>-<arch>``), None on the ranks other
    than 0 of a distributed run."""
    result = train_run(cfg, run_name)
    if result is None:
        return None
    from .reporting import log_tensorboard_summary, write_report  # jinja2: once the run has finished

    run_dir, metrics = result.run_dir, result.metrics
    log(f"report {write_report(run_dir)}")
    if cfg.log == "tensorboard":
        log_tensorboard_summary(run_dir, metrics)
    point_latest(run_dir)
    threshold = metrics["threshold"]
    at = "threshold 0.5" if threshold == 0.5 else f"threshold {threshold}"
    # tuned thresholds scored on the images they were tuned on (in-sample) flatter rare classes;
    # the split-half estimate (tuned on one half, scored on the other) is what new images will see
    nan = float("nan")
    summary = pd.DataFrame([
        {"": "macro F1", at: metrics["f1_macro"], "tuned, out-of-sample": metrics.get("f1_macro_tuned_oos", nan),
         "tuned, in-sample": metrics["f1_macro_tuned"]},
        {"": "samples F1", at: metrics["f1_samples"], "tuned, out-of-sample": metrics.get("f1_samples_tuned_oos", nan),
         "tuned, in-sample": metrics["f1_samples_tuned"]},
    ])
    console.print(table(f"best epoch {metrics['best_epoch']} of {metrics['epochs_run']} ({result.status}), "
                        f"{metrics['seconds']:.0f}s", summary))
    log("tuned thresholds, out-of-sample: tuned on one half of the validation images and scored on the other, "
        "both ways, averaged; in-sample: tuned and scored on the same images")
    log(f"artifacts in {run_dir} (exported model: export.pkl, model.safetensors + model.json)")
    return run_dir


def cross_validate(cfg: TrainConfig) -> Path:
    """K-fold cross-validation: one ``train`` per fold, then out-of-fold scores and thresholds."""
    return cv.cross_validate(cfg, train)


def lr_find(cfg: TrainConfig) -> Path:
    """Only the learning-rate finder; returns its folder (lr_find.png, lr_find.json)."""
    run_dir = lr_find_run(cfg)
    log(f"plot: {run_dir / LR_FIND_PLOT}")
    return run_dir
