"""One reader per file of a run folder, for every command that reads one.

A run folder may come from someone else or have been edited by hand, so every reader bounds the
file's size before reading it and checks what it parsed. The lenient readers serve the pages and
tables that show what they can (``runs``, ``report``): a missing or damaged file reads as empty.
The strict ones serve what must not go on without the file (``--resume``, ``cv``, ``predict``): they
raise one ``HPAError`` line that names the file.
"""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from .. import jsonfile
from ..errors import HPAError
from .folder import (CONFIG, CV, HISTORY, LR_FIND, METRICS, OOF_PREDICTIONS, STATUS, TRACKERS, TRIALS, TUNE,
                     VALID_PREDICTIONS, is_cv_dir,
                     is_run_dir)

# a run's largest JSON (lr_find.json, metrics.json) is a few hundred KB; its config and status a few KB
MAX_JSON_BYTES = 16 * 1024 * 1024
MAX_CSV_BYTES = 1024 * 1024 * 1024  # valid_predictions.csv of the 31,072 HPA 2018 images is about 10 MB


def read_json_file(path, what: str = "run file", max_bytes: int = MAX_JSON_BYTES) -> object:
    """The JSON in ``path``, read only if it is a regular file of at most ``max_bytes`` (see
    ``jsonfile.read_json``); strict: NaN and Infinity, which training never writes, are refused."""
    return jsonfile.read_json(path, what, max_bytes)


def read_json(path) -> dict:
    """A run file's JSON object, or {} when it is missing, unreadable or not an object (a run being
    written, or damaged): lenient, for the runs table and the report, where one damaged file leaves
    the other runs and files readable. NaN and Infinity read as None, a missing value."""
    try:
        data = jsonfile.read_json(path, "run file", MAX_JSON_BYTES, nonfinite=jsonfile.AS_NONE, missing={})
    except HPAError:
        return {}
    return data if isinstance(data, dict) else {}


def read_config(run_dir) -> dict:
    """``config.json`` of a run (or of a cross-validation folder) as a JSON object; strict."""
    path = Path(run_dir) / CONFIG
    data = read_json_file(path, "run config")
    if not isinstance(data, dict):
        raise HPAError(f"{path}: not a run config (a JSON {type(data).__name__}, not an object)")
    return data


def check_run_dir(path) -> Path:
    """``path`` as a training run's folder with a readable config.json, or an HPAError naming it."""
    path = Path(path)
    if not path.exists():
        raise HPAError(f"{path}: run folder not found")
    if not path.is_dir():
        raise HPAError(f"{path}: not a run folder (a file)")
    if not is_run_dir(path):
        raise HPAError(f"{path}: not a run folder (no {STATUS})")
    read_config(path)
    return path


def check_report_dir(path) -> Path:
    """``path`` as what ``report`` takes: a training run's folder (see ``check_run_dir``) or a
    cross-validation's, with a readable config.json; an HPAError naming it otherwise."""
    path = Path(path)
    if path.is_dir() and not is_run_dir(path):
        if not is_cv_dir(path):
            raise HPAError(f"{path}: not a run folder or a cross-validation folder (no {STATUS} or {CV})")
        read_config(path)
        return path
    return check_run_dir(path)


def read_cv_summary(cv_dir) -> dict:
    """``cv.json`` of a cross-validation, lenient (for ``runs`` and ``report``): {} when it is missing or
    damaged; a cross-validation still running has only ``status`` and ``n_folds``."""
    return read_json(Path(cv_dir) / CV)


def read_metrics(run_dir) -> dict:
    return read_json(Path(run_dir) / METRICS)


def read_status(run_dir) -> dict:
    return read_json(Path(run_dir) / STATUS)


def read_lr_find(run_dir) -> dict:
    return read_json(Path(run_dir) / LR_FIND)


def read_history(run_dir) -> pd.DataFrame:
    """``history.csv``: one row per trained epoch; an empty frame when there is none yet."""
    path = Path(run_dir) / HISTORY
    try:
        if not path.is_file() or path.stat().st_size > MAX_CSV_BYTES:  # a FIFO would block read_csv
            return pd.DataFrame()
        return pd.read_csv(path)
    except (OSError, ValueError):
        return pd.DataFrame()


def _read_predictions(path: Path, columns: list[str], what: str) -> pd.DataFrame:
    if not path.is_file():
        raise HPAError(f"{path}: not found ({what})")
    if path.stat().st_size > MAX_CSV_BYTES:
        raise HPAError(f"{path}: larger than {MAX_CSV_BYTES // 2**30} GiB; not a file this tool wrote")
    try:
        # dtype=str: a single label such as "3" must stay text, like "3 7"
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as e:
        raise HPAError(f"{path}: not readable as CSV ({str(e)[:120]})") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise HPAError(f"{path}: not {what} (no column {', '.join(missing)})")
    return df


def read_valid_predictions(run_dir) -> pd.DataFrame:
    """``valid_predictions.csv``: id, key, labels, predicted, probs of the best epoch's validation images."""
    return _read_predictions(Path(run_dir) / VALID_PREDICTIONS, ["id", "key", "labels", "predicted", "probs"],
                             "the validation predictions of a finished run")


def read_oof_predictions(cv_dir) -> pd.DataFrame:
    """``oof_predictions.csv`` of a cross-validation: every image, predicted by the fold that did not train on it."""
    return _read_predictions(Path(cv_dir) / OOF_PREDICTIONS, ["id", "fold", "labels", "predicted", "probs"],
                             "the out-of-fold predictions of a cross-validation")


def read_cv(cv_dir) -> dict:
    """``cv.json``, checked: ``runs`` the names of fold folders directly inside ``cv_dir`` (never the
    folder itself, a link out of it, or another cross-validation) and ``thresholds`` numbers in 0..1."""
    folder = Path(cv_dir)
    where = folder / CV
    cv = read_json_file(where, "cross-validation summary")
    if isinstance(cv, dict) and cv.get("status") == "running":
        raise HPAError(f"{folder}: the cross-validation has not finished; continue it with: "
                       f"hpa-fastai cv --resume {folder}")
    runs, thresholds = (cv.get("runs"), cv.get("thresholds")) if isinstance(cv, dict) else (None, None)
    if not isinstance(runs, list) or not runs:
        raise HPAError(f"{where}: lists no fold runs (expected a list of fold folder names)")
    if not (isinstance(thresholds, list)
            and all(isinstance(t, (int, float)) and not isinstance(t, bool) and 0 <= t <= 1 for t in thresholds)):
        raise HPAError(f"{where}: 'thresholds' must be a list of numbers in 0..1 (got {thresholds!r:.60})")
    inside = folder.resolve()
    for run in runs:
        plain_name = isinstance(run, str) and run not in ("", ".", "..") and run.isprintable() and not (
            set(run) & {"/", "\\"})
        if not plain_name or inside not in (folder / run).resolve().parents:
            raise HPAError(f"{where}: run {run!r:.60} is not the name of a fold folder inside {folder}")
        if (folder / run / CV).exists():
            raise HPAError(f"{where}: run {run!r} is itself a cross-validation folder; nesting is not supported")
    return cv


TRACKER_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


def read_tracker_ids(run_dir) -> dict:
    """``trackers.json``: the id of the run's MLflow and W&B runs by tracker name (``mlflow``,
    ``wandb``), or {} without the file; lenient, and an id that is not a plain id is left out (where
    the tracker is, comes from the environment, never from this file)."""
    data = read_json(Path(run_dir) / TRACKERS)
    return {name: value for name, value in data.items()
            if name in ("mlflow", "wandb") and isinstance(value, str) and TRACKER_ID.fullmatch(value)}


def read_tune(study_dir) -> dict:
    """``tune.json`` of a search's study folder: its settings, best trial and confirmation; lenient."""
    return read_json(Path(study_dir) / TUNE)


def read_trials(study_dir) -> pd.DataFrame:
    """``trials.csv`` of a search: one row per trial; an empty frame when it is missing or unreadable
    (lenient, for the search's page)."""
    path = Path(study_dir) / TRIALS
    try:
        if not path.is_file() or path.stat().st_size > MAX_CSV_BYTES:  # a FIFO would block read_csv
            return pd.DataFrame()
        return pd.read_csv(path, keep_default_na=True)
    except (OSError, ValueError):
        return pd.DataFrame()
