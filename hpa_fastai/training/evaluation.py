"""The end of a run: its best epoch's validation predictions scored, per-class thresholds tuned on
them, the tuned scores measured both on the same images (in-sample) and split-half (out-of-sample),
and everything the report and ``runs`` read written to the run folder."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from .. import metrics as M
from .. import plots
from ..atomic import write_csv, write_json
from ..console import console, table
from ..data.training_set import TrainingSet
from ..rundir import METRICS, PER_CLASS, PER_CLASS_PLOT, VALID_PREDICTIONS


def evaluate_valid(ts: TrainingSet, valid_items: pd.DataFrame, valid_preds, history: pd.DataFrame, run_dir: Path,
                   pretrained: bool, t_start: float) -> dict:
    """metrics.json, per_class.csv and its plot, valid_predictions.csv: the best epoch's validation
    predictions scored at ``--threshold`` and at per-class thresholds tuned on them; ``*_tuned`` is
    scored on the images the thresholds were tuned on, ``*_tuned_oos`` with thresholds tuned on one
    half of them and scored on the other, both ways, averaged."""
    probs, targs = valid_preds
    probs, targs = probs.float().numpy(), targs.numpy().astype(bool)
    cfg = ts.cfg
    thresholds = M.tune_thresholds(probs, targs, default=cfg.threshold)
    at_default = M.f1_scores(probs, targs, np.full(len(ts.vocab), cfg.threshold))
    tuned = M.f1_scores(probs, targs, thresholds)
    # the tuned scores above are measured on the images the thresholds were fitted to
    oos = M.out_of_sample_f1(probs, targs, default=cfg.threshold, seed=cfg.seed) or {}
    report = M.per_class_report(probs, targs, thresholds, ts.names)
    mon = cfg.monitor
    best_idx = int(history[mon].idxmax() if cfg.monitor_higher_is_better else history[mon].idxmin())
    stopped_early = len(history) < cfg.epochs + (cfg.freeze_epochs if pretrained else 0)
    result = {
        "best_epoch": int(history["epoch"].iloc[best_idx]),
        "epochs_run": int(len(history)),
        "stopped_early": bool(stopped_early),
        "monitor": mon,
        "valid_images": int(len(targs)),
        "f1_macro": at_default["macro"], "f1_micro": at_default["micro"], "f1_samples": at_default["samples"],
        "f1_macro_tuned": tuned["macro"], "f1_micro_tuned": tuned["micro"], "f1_samples_tuned": tuned["samples"],
        **{f"f1_{avg}_tuned_oos": value for avg, value in oos.items()},
        "threshold": cfg.threshold,
        "seconds": round(time.time() - t_start, 1),
        "per_class": report.to_dict("records"),
    }
    write_json(run_dir / METRICS, result)
    write_csv(run_dir / PER_CLASS, report)
    # the report's image grid reads these instead of predicting the validation images again
    valid = valid_items
    write_csv(run_dir / VALID_PREDICTIONS, pd.DataFrame({
        "id": valid["id"].to_numpy(), "key": valid["key"].to_numpy(), "labels": valid["labels"].to_numpy(),
        "predicted": [" ".join(map(str, np.flatnonzero(row))) for row in M.decode(probs, thresholds)],
        "probs": [" ".join(f"{p:.4f}" for p in row) for row in probs]}))
    plots.f1_bars_plot(run_dir / PER_CLASS_PLOT, report)
    console.print(table(f"validation, per class (tuned thresholds; {len(targs)} images)",
                        report.assign(support=report["support"].astype(int))))
    return {**result, "thresholds": thresholds, "probs": probs, "targets": targs}
