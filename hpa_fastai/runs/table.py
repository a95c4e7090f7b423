"""One table of every training run and cross-validation under a folder (the ``runs`` command), read
from their folders' files.

A run folder is a folder with a ``status.json`` (``train`` writes it before anything else), so
``lr-find`` folders, other folders and the ``latest`` link are skipped. Each value comes from the
run's own files: ``config.json`` (data, arch, channels, size), ``metrics.json`` (epochs run, best
epoch, macro F1 at the run's ``--threshold`` and with tuned per-class thresholds, in-sample and
split-half out-of-sample, seconds) and
``status.json``; ``history.csv`` gives the epochs of a run that has no metrics yet.

A cross-validation (a folder with ``cv.json``) is one row: its config, the number of folds, and the
out-of-fold scores of ``cv.json`` (at the threshold, tuned in-sample and split-half); its fold runs
follow it on request (``folds``), or when the folder named is the cross-validation itself. Its
status is ``cv.json``'s, with a ``running`` one whose folds have all gone quiet read as
``interrupted``.

Status is what ``status.json`` says (finished, stopped early, interrupted, failed), except for a
run that says ``running``: a run killed outright (SIGKILL, a crash, a lost machine) never gets
to update its status. Nothing in the folder proves the process is alive, so the age of its newest
file decides: a training run writes ``history.csv`` (and checkpoints) every epoch, so a running
run whose files have not changed for ``max(10 minutes, 3 x its slowest epoch)`` is reported as
``interrupted``. A run on another machine that is still alive but stuck for that long is reported
the same way, which is the honest reading of the evidence.
"""
from __future__ import annotations

import math
import time
from datetime import datetime
from pathlib import Path

import pandas as pd

from ..atomic import folder_size
from ..errors import HPAError
from .files import read_config, read_cv_summary, read_history, read_metrics, read_status
from .folder import is_cv_dir, is_run_dir

STALE_SECONDS = 10 * 60
COLUMNS = ["run", "date", "data", "arch", "channels", "size", "epochs", "best_epoch", "folds", "f1", "f1_tuned",
           "f1_oos", "time", "status", "disk_bytes"]
# --sort key -> (column, descending): scores best first, the rest in natural order (dates oldest
# first, so the newest run sits next to the prompt)
SORTS = {"date": ("date", False), "arch": ("arch", False), "size": ("size", False), "epochs": ("epochs", True),
         "f1": ("f1", True), "f1_tuned": ("f1_tuned", True), "f1_oos": ("f1_oos", True), "time": ("time", False), "status": ("status", False),
         "disk": ("disk_bytes", True)}


def _started(run_dir: Path, status: dict) -> datetime | None:
    """When the run started: the time stamp ``train`` puts in the folder name, else status.json's."""
    try:
        return datetime.strptime(run_dir.name[:15], "%Y%m%d-%H%M%S")
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(status["started"])
    except (KeyError, TypeError, ValueError):
        return None


def run_status(run_dir: Path, status: dict, history: pd.DataFrame, now: float | None = None) -> str:
    """status.json's word, with a ``running`` run whose files went quiet read as ``interrupted``."""
    word = status.get("status", "unknown")
    if word != "running":
        return word if isinstance(word, str) else "unknown"
    newest = max((p.stat().st_mtime for p in run_dir.iterdir() if p.is_file()), default=0.0)
    seconds = pd.to_numeric(history["seconds"], errors="coerce").max() if "seconds" in history else None
    slowest_epoch = float(seconds) if seconds is not None and math.isfinite(seconds) else 0.0
    quiet = (time.time() if now is None else now) - newest
    return "interrupted" if quiet > max(STALE_SECONDS, 3 * slowest_epoch) else "running"


def _lenient(read, run_dir) -> dict:
    try:
        return read(run_dir)
    except HPAError:  # a damaged config.json: the row shows what the other files say
        return {}


def run_summary(run_dir) -> dict:
    """One row of the runs table for ``run_dir``; missing values are None."""
    run_dir = Path(run_dir)
    config, metrics, status = _lenient(read_config, run_dir), read_metrics(run_dir), read_status(run_dir)
    history = read_history(run_dir)
    started = _started(run_dir.resolve(), status)
    epochs = metrics.get("epochs_run", len(history) if len(history) else None)
    seconds = metrics.get("seconds", status.get("seconds"))
    return _typed({
        "run": run_dir.resolve().name,  # "latest" is a link: name the run it points at
        "date": started.strftime("%Y-%m-%d %H:%M:%S") if started else None,
        "data": config.get("data"),
        "arch": config.get("arch"),
        "channels": config.get("channels"),
        "size": config.get("size"),
        "epochs": epochs,
        "best_epoch": metrics.get("best_epoch"),
        "f1": metrics.get("f1_macro"),
        "f1_tuned": metrics.get("f1_macro_tuned"),
        "f1_oos": metrics.get("f1_macro_tuned_oos"),  # absent from runs made before it existed
        "time": seconds,
        "status": run_status(run_dir, status, history),
        "disk_bytes": folder_size(run_dir.resolve()),
        "threshold": metrics.get("threshold", config.get("threshold")),
        "path": str(run_dir),
    })


def cv_summary(cv_dir) -> dict:
    """One row of the runs table for the cross-validation in ``cv_dir``: its config, its number of
    folds and the out-of-fold scores of cv.json; missing values are None."""
    cv_dir = Path(cv_dir)
    config, summary = _lenient(read_config, cv_dir), read_cv_summary(cv_dir)
    oof = summary.get("oof") if isinstance(summary.get("oof"), dict) else {}
    started = _started(cv_dir.resolve(), {})
    return _typed({
        "run": cv_dir.resolve().name,
        "date": started.strftime("%Y-%m-%d %H:%M:%S") if started else None,
        **{k: config.get(k) for k in ("data", "arch", "channels", "size")},
        "epochs": config.get("epochs"),
        "folds": summary.get("n_folds", config.get("n_folds")),
        "f1": oof.get("f1_macro"),
        "f1_tuned": oof.get("f1_macro_tuned"),
        "f1_oos": oof.get("f1_macro_tuned_oos"),
        "time": summary.get("seconds"),
        "status": cv_status(cv_dir, summary),
        "disk_bytes": folder_size(cv_dir.resolve()),
        "threshold": summary.get("threshold", config.get("threshold")),
        "path": str(cv_dir),
    })


def fold_dirs(cv_dir) -> list[Path]:
    """The fold run folders of a cross-validation, in fold order (fold0, fold1, ...)."""
    folds = [p for p in Path(cv_dir).iterdir() if not p.is_symlink() and is_run_dir(p)]
    return sorted(folds, key=lambda p: (len(p.name), p.name))


def cv_status(cv_dir: Path, summary: dict) -> str:
    """cv.json's status; a ``running`` cross-validation none of whose folds still trains is
    ``interrupted`` (killed before it could say so)."""
    word = summary.get("status", "unknown")
    if word != "running":
        return word if isinstance(word, str) else "unknown"
    folds = fold_dirs(cv_dir)
    alive = any(run_status(f, read_status(f), read_history(f)) == "running" for f in folds)
    if alive:
        return "running"
    newest = max((p.stat().st_mtime for p in Path(cv_dir).iterdir() if p.is_file()), default=0.0)
    return "running" if not folds and time.time() - newest < STALE_SECONDS else "interrupted"


# What each value of a row must be; the run files are JSON anyone can edit, so a value of another
# type (text where a number belongs, a list) is shown as missing rather than breaking the table.
ROW_TYPES = {"data": str, "arch": str, "channels": str, "size": int, "epochs": int, "best_epoch": int, "folds": int,
             "f1": float, "f1_tuned": float, "f1_oos": float, "time": float, "threshold": float, "status": str}


def _typed(row: dict) -> dict:
    for key, kind in ROW_TYPES.items():
        row[key] = _as(kind, row.get(key))
    row["status"] = row["status"] or "unknown"
    return row


def _as(kind, value):
    if kind is str:
        return value if isinstance(value, str) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or abs(value) > 1e15 or not math.isfinite(value):
        return None  # abs() first: math.isfinite overflows on a huge JSON integer
    return None if kind is int and value != int(value) else kind(value)


def collect_runs(folder="runs", sort: str = "date", folds: bool = False) -> pd.DataFrame:
    """Every run and cross-validation under ``folder`` as a frame (columns ``COLUMNS`` plus threshold and
    path), sorted by ``sort`` (a ``--sort`` key); with ``folds``, each cross-validation's fold runs
    follow its row (named ``<cv folder>/fold0``...). ``folder`` may be one run or one cross-validation,
    which then lists its folds. Empty when there are none or ``folder`` does not exist."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise HPAError(f"{folder}: not a folder of runs")
    groups = []  # (row, the rows that follow it)
    if is_run_dir(folder):
        groups.append((run_summary(folder), []))
    elif is_cv_dir(folder):
        groups.append((cv_summary(folder), _fold_rows(folder)))
    elif folder.is_dir():
        for path in sorted(p for p in folder.iterdir() if not p.is_symlink()):
            if is_run_dir(path):
                groups.append((run_summary(path), []))
            elif is_cv_dir(path):
                groups.append((cv_summary(path), _fold_rows(path) if folds else []))
    tops = _frame([row for row, _ in groups])
    column, descending = SORTS[sort]
    # the folder name breaks ties, so equal keys keep the order of their dates
    order = tops.sort_values("run").sort_values(column, ascending=not descending, na_position="last", kind="stable").index
    rows = [r for i in order for r in [groups[i][0], *groups[i][1]]]
    return _frame(rows)


def _fold_rows(cv_dir: Path) -> list[dict]:
    return [{**run_summary(f), "run": f"{cv_dir.resolve().name}/{f.name}"} for f in fold_dirs(cv_dir)]


def _frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=COLUMNS + ["threshold", "path"])
    for col in ("size", "epochs", "best_epoch", "folds", "disk_bytes"):
        df[col] = df[col].astype("Int64")
    for col in ("f1", "f1_tuned", "f1_oos", "time", "threshold"):
        df[col] = df[col].astype(float)
    return df.reset_index(drop=True)


def format_seconds(seconds) -> str:
    if seconds is None or pd.isna(seconds):
        return "-"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def format_bytes(n) -> str:
    if n is None or pd.isna(n):
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return "-"


def short_data(path) -> str:
    """The last two parts of the data path: enough to tell data sets apart in a narrow table."""
    if not isinstance(path, str):
        return "-"
    return "/".join(Path(path).parts[-2:])


def display_frame(df: pd.DataFrame) -> pd.DataFrame:
    """The runs frame as the strings the console table shows."""
    def text(v, spec="{}"):
        return "-" if v is None or pd.isna(v) else spec.format(v)

    return pd.DataFrame({
        "run": df["run"],
        "date": df["date"].map(lambda v: text(v)[:16]),  # minutes: the run name has the seconds
        "data": df["data"].map(short_data),
        "arch": df["arch"].map(text),
        "channels": df["channels"].map(text),
        "size": df["size"].map(text),
        "epochs": df["epochs"].map(text),
        "best": df["best_epoch"].map(text),
        "folds": df["folds"].map(text),
        "macro F1": df["f1"].map(lambda v: text(v, "{:.4f}")),
        "tuned": df["f1_tuned"].map(lambda v: text(v, "{:.4f}")),
        "tuned, split-half": df["f1_oos"].map(lambda v: text(v, "{:.4f}")),
        "time": df["time"].map(format_seconds),
        "status": df["status"],
        "disk": df["disk_bytes"].map(format_bytes),
    })


NUMERIC = {"size", "epochs", "best", "folds", "macro F1", "tuned", "tuned, split-half", "time", "disk"}
