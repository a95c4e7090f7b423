"""K-fold cross-validation: one training run per fold of the multi-label stratified split, the
out-of-fold predictions of all of them, and per-class thresholds tuned on those.

``run.py cv --n-folds 5 [training flags]`` (``--n-folds 0``, the default, means 5) writes::

    runs/<time>-cv-<arch>/
        config.json           the resolved training config
        fold0/ ... fold4/     ordinary run folders (see train.py); fold k validates on the k-th fold
        oof_predictions.csv   id, fold, labels, predicted, probs: every image, predicted by the
                              one model that did not train on it
        cv.json               per-fold and overall F1 at --threshold and at the per-class
                              thresholds tuned on all out-of-fold predictions; those thresholds

and points ``runs/latest`` at the cv folder, so that ``run.py predict`` and ``evaluate`` use the
ensemble of the fold models with the out-of-fold thresholds (``predict.Ensemble``). Near-duplicate
groups listed in the data folder's duplicates.csv stay within one fold (see dedup.py).
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pandas as pd

from .. import metrics as M
from ..atomic import write_csv, write_json
from ..config import TrainConfig
from ..console import console, log, table
from ..data.layouts import labels_matrix
from ..errors import HPAError
from ..rundir import CONFIG, CV, LATEST, OOF_PREDICTIONS, VALID_PREDICTIONS, make_run_dir, point_latest
from .run import prepare

DEFAULT_FOLDS = 5


def cross_validate(cfg: TrainConfig, train) -> Path:
    """Train every fold with ``train(cfg, run_name=...)`` (which returns the fold's run folder), then
    score and tune thresholds on the out-of-fold predictions; returns the cv folder."""
    t_start = time.time()
    if cfg.resume:
        raise HPAError("--resume continues one training run, not a cross-validation; resume the interrupted "
                       "fold with: python run.py --resume <cv folder>/fold<k>")
    cfg = dataclasses.replace(cfg, n_folds=cfg.n_folds or DEFAULT_FOLDS, fold=0)
    prep = prepare(cfg)  # flags and data are checked once, before any fold trains
    units = prep.items["group"].nunique() if "group" in prep.items.columns else len(prep.items)
    if cfg.n_folds > units:
        what = "near-duplicate groups and single images" if "group" in prep.items.columns else "images"
        raise HPAError(f"--n-folds {cfg.n_folds} is more than the {units} {what} of {prep.data_dir}")
    parent = make_run_dir(prep.cfg.out, f"cv-{prep.cfg.arch}")
    write_json(parent / CONFIG, prep.cfg.to_json())
    log(f"cross-validation folder {parent}: {cfg.n_folds} folds of {len(prep.items)} images")
    runs = []
    for fold in range(cfg.n_folds):
        log(f"fold {fold + 1} of {cfg.n_folds}")
        run_dir = train(dataclasses.replace(prep.cfg, fold=fold, out=str(parent)), run_name=f"fold{fold}")
        runs.append(run_dir.name)
    (parent / LATEST).unlink(missing_ok=True)  # train's link to its newest run; the folds are named
    result = summarise(parent, runs, len(prep.vocab), prep.cfg.threshold)
    write_json(parent / CV, {**result, "seconds": round(time.time() - t_start, 1)})
    show(result)
    point_latest(parent)
    log(f"out-of-fold predictions and scores in {parent}; {Path(prep.cfg.out) / LATEST} now points at it")
    log(f"predict with the {cfg.n_folds}-model ensemble: python run.py predict --learner {parent}")
    return parent


def fold_predictions(run_dir: Path) -> pd.DataFrame:
    """A fold's validation predictions (id, labels, probs), as train.py saved them."""
    path = run_dir / VALID_PREDICTIONS
    if not path.is_file():
        raise HPAError(f"{path}: not found; the fold's run did not finish")
    return pd.read_csv(path, dtype=str, keep_default_na=False)[["id", "labels", "probs"]]


def summarise(parent: Path, runs: list[str], n_classes: int, threshold: float) -> dict:
    """Write oof_predictions.csv and return cv.json's contents: thresholds tuned on the predictions
    of all folds together (a fold alone has too few positives of the rare classes), and macro,
    micro and samples F1 per fold and overall, at ``threshold`` and at the tuned thresholds."""
    oof = pd.concat([fold_predictions(parent / run).assign(fold=k) for k, run in enumerate(runs)],
                    ignore_index=True)
    probs = np.array([[float(p) for p in row.split()] for row in oof["probs"]])
    targets = labels_matrix(oof["labels"], n_classes).astype(bool)
    thresholds = M.tune_thresholds(probs, targets, default=threshold)
    fixed = np.full(n_classes, threshold)

    def scores(rows: np.ndarray) -> dict:
        at, tuned = M.f1_scores(probs[rows], targets[rows], fixed), M.f1_scores(probs[rows], targets[rows], thresholds)
        return {"images": int(rows.sum()), **{f"f1_{k}": v for k, v in at.items()},
                **{f"f1_{k}_tuned": v for k, v in tuned.items()}}

    fold_of = oof["fold"].to_numpy()
    write_csv(parent / OOF_PREDICTIONS, pd.DataFrame({
        "id": oof["id"], "fold": fold_of, "labels": oof["labels"],
        "predicted": [" ".join(map(str, np.flatnonzero(row))) for row in M.decode(probs, thresholds)],
        "probs": oof["probs"]}))
    return {"n_folds": len(runs), "runs": runs, "threshold": threshold,
            "thresholds": [float(t) for t in thresholds],
            "folds": [{"fold": k, "run": run, **scores(fold_of == k)} for k, run in enumerate(runs)],
            "oof": scores(np.ones(len(oof), bool))}


def show(result: dict) -> None:
    at = "threshold 0.5" if result["threshold"] == 0.5 else f"threshold {result['threshold']}"
    rows = [{"": f["run"], "images": f["images"], f"macro F1, {at}": f["f1_macro"],
             "macro F1, tuned": f["f1_macro_tuned"]} for f in result["folds"]]
    fold_scores = pd.DataFrame(rows)
    rows.append({"": "mean of folds", "images": int(fold_scores["images"].sum()),
                 f"macro F1, {at}": float(fold_scores[f"macro F1, {at}"].mean()),
                 "macro F1, tuned": float(fold_scores["macro F1, tuned"].mean())})
    oof = result["oof"]
    rows.append({"": "out-of-fold", "images": oof["images"], f"macro F1, {at}": oof["f1_macro"],
                 "macro F1, tuned": oof["f1_macro_tuned"]})
    console.print(table(f"{result['n_folds']}-fold cross-validation (tuned: per-class thresholds "
                        "from all out-of-fold predictions)", pd.DataFrame(rows)))
