"""K-fold cross-validation: a loop around the training door, one run per fold of the multi-label
stratified split, then the out-of-fold predictions of all of them and per-class thresholds tuned on
those.

``run.py cv --n-folds 5 [training flags]`` (``--n-folds 0``, the default, means 5) writes::

    runs/<time>-cv-<arch>/
        config.json           the resolved training config
        fold0/ ... fold4/     ordinary run folders; fold k validates on the k-th fold
        oof_predictions.csv   id, fold, labels, predicted, probs: every image, predicted by the
                              one model that did not train on it
        cv.json               status; per-fold and overall F1 at --threshold and at the per-class
                              thresholds tuned on all out-of-fold predictions (overall also
                              split-half), the per-class table; those thresholds
        report.html           the cross-validation's page (``run.py report``)

and points ``runs/latest`` at the cv folder, so that ``run.py predict`` and ``evaluate`` use the
ensemble of the fold models with the out-of-fold thresholds (``inference.predictor.Ensemble``).
Near-duplicate groups listed in the data folder's duplicates.csv stay within one fold (see dedup).

``cv.json`` is written when the cross-validation starts (``"status": "running"``) and again when it
ends. An interrupted cross-validation continues with ``run.py cv --resume <cv folder>``: finished
folds are kept, an interrupted one continues from its checkpoint, the others train, and the
out-of-fold step follows.
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import write_csv, write_json
from ..config import TrainConfig
from ..data.layouts import labels_matrix
from ..data.training_set import TrainingSet
from ..errors import HPAError
from ..evaluation import predictions_table, score
from ..runs.files import read_config, read_status, read_valid_predictions
from ..runs.folder import CHECKPOINT, CONFIG, CV, OOF_PREDICTIONS, is_run_dir, make_run_dir, point_latest, run_lock
from .run import RunResult, prepare, train

logger = logging.getLogger(__name__)

DEFAULT_FOLDS = 5
DONE = ("finished", "stopped early")


@dataclass
class CvResult:
    """A finished cross-validation: its folder and cv.json's contents (per-fold and out-of-fold
    scores, the out-of-fold thresholds), with the folds trained or continued by this call."""
    cv_dir: Path
    summary: dict
    trained: list[RunResult] = field(default_factory=list)


def fold_name(fold: int) -> str:
    return f"fold{fold}"


def cross_validate(cfg: TrainConfig, cbs=()) -> CvResult:
    """Train every fold (``cbs``: extra fastai callbacks for each fold's fits), then score and tune
    thresholds on the out-of-fold predictions; ``cfg.resume`` names a cross-validation to continue."""
    t_start = time.time()
    if cfg.resume:
        cv_dir, fold_cfg, ts = _continue(Path(cfg.resume))
        # code named in a folder's config.json is never imported: only the --callback given now
        fold_cfg = dataclasses.replace(fold_cfg, callback=cfg.callback)
    else:
        cv_dir, fold_cfg, ts = _start(cfg)
    n_folds = fold_cfg.n_folds
    with run_lock(cv_dir):
        runs, trained = [], []
        for fold in range(n_folds):
            name = fold_name(fold)
            fold_dir = cv_dir / name
            state = _fold_state(fold_dir)
            # the folder's name and --fold count from 0: fold0 is --fold 0
            logger.info(f"{name} (--fold {fold} of 0..{n_folds - 1}): "
                        + {"done": "finished before, kept", "resume": "continuing from its checkpoint",
                           "new": "training"}[state])
            if state == "resume":
                trained.append(train(dataclasses.replace(fold_cfg, resume=str(fold_dir)), cbs=cbs, link_latest=False))
            elif state == "new":
                if fold_dir.exists():  # a fold that failed before its first epoch: nothing to continue
                    shutil.rmtree(fold_dir)
                trained.append(train(dataclasses.replace(fold_cfg, fold=fold), run_name=name, cbs=cbs,
                                     link_latest=False))
            runs.append(name)
        summary = summarise(cv_dir, runs, len(ts.vocab), fold_cfg.threshold, fold_cfg.seed, ts.names)
        summary = {**summary, "status": "finished", "seconds": round(time.time() - t_start, 1)}
        write_json(cv_dir / CV, summary)
    point_latest(cv_dir)
    return CvResult(cv_dir, summary, [r for r in trained if r is not None])


def _start(cfg: TrainConfig) -> tuple[Path, TrainConfig, TrainingSet]:
    cfg = dataclasses.replace(cfg, n_folds=cfg.n_folds or DEFAULT_FOLDS, fold=0)
    prep = prepare(cfg)  # flags and data are checked once, before any fold trains
    units = prep.items["group"].nunique() if "group" in prep.items.columns else len(prep.items)
    if cfg.n_folds > units:
        what = "near-duplicate groups and single images" if "group" in prep.items.columns else "images"
        raise HPAError(f"--n-folds {cfg.n_folds} is more than the {units} {what} of {prep.data_dir}")
    cv_dir = make_run_dir(prep.cfg.out, f"cv-{prep.cfg.arch}")
    # the folds train on the resolved config with this cv folder as their parent
    fold_cfg = dataclasses.replace(prep.cfg, out=str(cv_dir))
    write_json(cv_dir / CONFIG, prep.cfg.to_json())
    write_json(cv_dir / CV, {"status": "running", "n_folds": cfg.n_folds})
    logger.info(f"cross-validation folder {cv_dir}: {cfg.n_folds} folds of {len(prep.items)} images")
    return cv_dir, fold_cfg, prep


def _continue(cv_dir: Path) -> tuple[Path, TrainConfig, TrainingSet]:
    """The cross-validation in ``cv_dir`` and the config its folds train with, checked as flags are."""
    if not cv_dir.is_dir() or (not (cv_dir / CV).is_file() and not (cv_dir / CONFIG).is_file()):
        raise HPAError(f"--resume {cv_dir}: not a cross-validation folder (no {CV}); "
                       "`hpa-fastai --resume` continues a single run")
    if is_run_dir(cv_dir):
        raise HPAError(f"--resume {cv_dir}: a single run, not a cross-validation; continue it with "
                       f"hpa-fastai --resume {cv_dir}")
    cfg = dataclasses.replace(TrainConfig.from_dict(read_config(cv_dir)), resume=None, out=str(cv_dir), fold=0)
    if cfg.n_folds < 2:
        raise HPAError(f"{cv_dir / CONFIG}: 'n_folds' must be 2 or more for a cross-validation (got {cfg.n_folds})")
    ts = prepare(cfg)  # the data is still there and the config is valid
    logger.info(f"continuing the cross-validation in {cv_dir} ({cfg.n_folds} folds)")
    return cv_dir, cfg, ts


def _fold_state(fold_dir: Path) -> str:
    """``done`` (finished, with its validation predictions), ``resume`` (interrupted after an epoch) or
    ``new`` (not started, or failed before it had anything to continue)."""
    if not is_run_dir(fold_dir):
        return "new"
    status = read_status(fold_dir).get("status")
    if status in DONE:
        read_valid_predictions(fold_dir)  # a finished fold without its predictions is an error, named
        return "done"
    return "resume" if (fold_dir / CHECKPOINT).is_file() else "new"


def summarise(cv_dir: Path, runs: list[str], n_classes: int, threshold: float, seed: int = 0,
              names: list[str] | None = None) -> dict:
    """Write oof_predictions.csv and return cv.json's contents: thresholds tuned on the predictions
    of all folds together (a fold alone has too few positives of the rare classes), and macro,
    micro and samples F1 per fold and overall, at ``threshold`` and at the tuned thresholds (the
    overall ones also split-half, out-of-sample)."""
    import pandas as pd

    frames = []
    for k, run in enumerate(runs):
        preds = read_valid_predictions(cv_dir / run)[["id", "labels", "probs"]]
        frames.append(preds.assign(fold=k))
    oof = pd.concat(frames, ignore_index=True)
    try:
        probs = np.array([[float(p) for p in row.split()] for row in oof["probs"]])
    except ValueError as e:
        raise HPAError(f"{cv_dir}: a fold's valid_predictions.csv holds probabilities that are not numbers ({e})") from None
    if probs.ndim != 2 or probs.shape[1] != n_classes:
        raise HPAError(f"{cv_dir}: the folds' valid_predictions.csv do not all hold {n_classes} probabilities per image")
    targets = labels_matrix(oof["labels"], n_classes).astype(bool)
    names = names if names and len(names) == n_classes else [str(c) for c in range(n_classes)]
    overall = score(probs, targets, names, threshold=threshold, seed=seed)
    fold_of = oof["fold"].to_numpy()

    def scores(rows: np.ndarray) -> dict:
        s = score(probs[rows], targets[rows], names, threshold=threshold, thresholds=overall.thresholds)
        return {"images": int(rows.sum()), **s.flat()}

    write_csv(cv_dir / OOF_PREDICTIONS, predictions_table(oof["id"], oof["labels"], probs, overall.thresholds,
                                                          fold=fold_of)[["id", "fold", "labels", "predicted", "probs"]])
    return {"n_folds": len(runs), "runs": runs, "threshold": threshold,
            "thresholds": [float(t) for t in overall.thresholds],
            "folds": [{"fold": k, "run": run, **scores(fold_of == k)} for k, run in enumerate(runs)],
            "oof": {"images": int(len(oof)), **overall.flat(), "per_class": overall.per_class.to_dict("records")}}
