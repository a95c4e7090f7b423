"""The run folder: the names of its files, its status, the ``runs/latest`` link, the lock that
keeps one process per run, and what counts as a run. Every module that reads or writes a run folder
takes the names from here (``tests/test_architecture.py`` checks that no other module spells them).

``train`` writes ``status.json`` before anything else, so a folder with one is a training run;
``cv`` writes ``cv.json`` into the folder that holds its fold runs; ``tune`` writes ``tune.json``
into its study folder, ``runs/tune-<study>/``, which holds one ordinary run folder per trial.
"""
from __future__ import annotations

import contextlib
import json
import os
from datetime import datetime
from pathlib import Path

from ..atomic import exclusive_lock, finite_json, write_json
from ..errors import HPAError

CONFIG = "config.json"
STATUS = "status.json"
HISTORY = "history.csv"
LR_FIND_PLOT = "lr_find.png"
LR_FIND = "lr_find.json"
CURVES = "curves.png"
METRICS = "metrics.json"
PER_CLASS = "per_class.csv"
PER_CLASS_PLOT = "per_class_f1.png"
VALID_PREDICTIONS = "valid_predictions.csv"
REPORT = "report.html"
BEST = "best.pth"
CHECKPOINT = "checkpoint.pth"
WEIGHTS = "model.safetensors"
MODEL_JSON = "model.json"
EXPORT_PKL = "export.pkl"
ONNX = "model.onnx"
TENSORBOARD = "tensorboard"
WANDB = "wandb"  # --log wandb: Weights & Biases' own files (an offline run waits there for `wandb sync`)
TRACKERS = "trackers.json"  # the MLflow and W&B run ids of a run, so --resume and its report go on in them
# --log mlflow without $MLFLOW_TRACKING_URI: the SQLite store and its artifacts, beside the run folders
MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS = "mlartifacts"
CV = "cv.json"  # the fold run folders ("runs") and the out-of-fold "thresholds"
OOF_PREDICTIONS = "oof_predictions.csv"
EVALUATE = "evaluate"  # evaluate's default output folder inside a run
LATEST = "latest"

# a hyperparameter search's study folder (runs/tune-<study>/), beside its trials' run folders
STUDY_PREFIX = "tune-"
TUNE = "tune.json"  # the search's settings, its best trial and the confirmation of it
STUDY_JOURNAL = "study.journal"  # Optuna's journal file: the study, when no --storage server holds it
TRIALS = "trials.csv"
TUNE_REPORT = "tune.html"
WORKERS = "workers"  # the worker processes' logs and locks
BEST_RUN = "best"  # a link to the best confirmed run folder

# what `evaluate` writes into its folder (by default <run>/evaluate), beside per_class.csv and its plot
EVAL_SUMMARY = "summary.json"
EVAL_SAMPLES = "samples.png"
EVALUATION_FILES = (PER_CLASS, EVAL_SUMMARY, PER_CLASS_PLOT, EVAL_SAMPLES)

SAFE_EXPORT = (MODEL_JSON, WEIGHTS)
RESUME_FILES = (CHECKPOINT, BEST)
# Everything training and cv write into a run folder: no other command may write over these.
RUN_FILES = frozenset({CONFIG, STATUS, HISTORY, LR_FIND_PLOT, LR_FIND, CURVES, METRICS, PER_CLASS, PER_CLASS_PLOT,
                       VALID_PREDICTIONS, REPORT, BEST, CHECKPOINT, WEIGHTS, MODEL_JSON, EXPORT_PKL, ONNX,
                       TENSORBOARD, WANDB, TRACKERS, CV, OOF_PREDICTIONS, TUNE, STUDY_JOURNAL, TRIALS, TUNE_REPORT,
                       WORKERS, BEST_RUN})


def is_run_dir(path) -> bool:
    """A training run's folder."""
    path = Path(path)
    return path.is_dir() and (path / STATUS).is_file()


def is_cv_dir(path) -> bool:
    """A cross-validation's folder (it holds the fold runs)."""
    path = Path(path)
    return path.is_dir() and (path / CV).is_file()


def is_study_dir(path) -> bool:
    """A hyperparameter search's study folder (it holds the trial runs)."""
    path = Path(path)
    return path.is_dir() and (path / TUNE).is_file()


def study_dir(out, study: str) -> Path:
    """The study folder of the search named ``study`` under ``out``."""
    return Path(out) / f"{STUDY_PREFIX}{study}"


def run_dirs(folder) -> list[Path]:
    """The run folders directly under ``folder`` (``folder`` itself if it is one), without links."""
    folder = Path(folder)
    if is_run_dir(folder):
        return [folder]
    return sorted(p for p in folder.iterdir() if not p.is_symlink() and is_run_dir(p))


def now() -> str:
    return datetime.now().isoformat(timespec="seconds")


def write_status(run_dir, status: str, **fields) -> None:
    """status.json: running, finished, stopped early, interrupted or failed, with what goes with it
    (``started``, ``finished``, ``seconds``, ``reason``, ``epochs_done``).

    Written atomically; on a full disk, where the atomic write has no room for its second copy, the
    file is rewritten in place instead (its own blocks hold the new text), so that a run that failed
    for want of space does not go on saying "running"."""
    path = Path(run_dir) / STATUS
    payload = {"status": status, **fields}
    try:
        write_json(path, payload)
    except HPAError:
        try:
            with open(path, "r+") as f:
                f.write(json.dumps(finite_json(payload), indent=2, allow_nan=False) + "\n")
                f.truncate()
        except OSError:
            pass
        else:
            return
        raise


def make_run_dir(out, arch: str, name: str | None = None) -> Path:
    """A new run folder under ``out`` (named ``name``, default ``<time>-<arch>``); fails early,
    before training, if ``out`` is not writable."""
    out = Path(out)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    name = name or f"{stamp}-{arch.replace(':', '-').replace('/', '-')}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        run_dir, n = out / name, 1
        while True:  # mkdir is the test: two runs started in the same second cannot both get a name
            try:
                run_dir.mkdir()
                break
            except FileExistsError:
                n += 1
                if n > 10_000:
                    raise
                run_dir = out / f"{name}-{n}"
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise HPAError(f"--out {out}: not writable ({e.strerror or e})") from None
    return run_dir


def point_latest(run_dir: Path) -> None:
    """``<parent>/latest`` -> ``run_dir``, replaced atomically."""
    point_link(Path(run_dir).parent / LATEST, run_dir)


def point_link(link: Path, run_dir: Path) -> None:
    """The link ``link`` -> ``run_dir`` (relative, so the folders can move together), replaced atomically."""
    link, run_dir = Path(link), Path(run_dir)
    tmp = link.parent / f".{link.name}.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(os.path.relpath(run_dir, link.parent), target_is_directory=True)
    os.replace(tmp, link)


def remove_resume_files(run_dir: Path) -> None:
    """A finished run is exported: what only --resume needs (three times the model's size) goes."""
    for name in RESUME_FILES:
        (Path(run_dir) / name).unlink(missing_ok=True)


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Held while a process trains into ``run_dir``: a second one (``--resume`` of a run that is still
    training) is refused rather than writing the same history, status and exports. The lock goes with
    the process, so a run that was killed can be resumed at once."""
    with exclusive_lock(Path(run_dir), f"{run_dir}: another process is training this run (started "
                                              "or resumed elsewhere); wait for it to end, or stop it first"):
        yield
