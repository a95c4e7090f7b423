"""Where a command may write: never over one of its own inputs, never over a file that training
wrote into a run folder the command only reads; and CSVs meant for people that a spreadsheet can
open without running a formula hidden in an id.

Every command with an output flag calls ``check_output`` with that flag's value, the files it reads
and the run folders it reads, before it writes anything.
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from .errors import HPAError
from .runs.folder import RUN_FILES, is_cv_dir, is_run_dir, is_study_dir


def _is_run_folder(folder: Path) -> bool:
    return is_run_dir(folder) or is_cv_dir(folder) or is_study_dir(folder)


def check_output(out, flag: str, inputs=(), run_dirs=(), own=()) -> Path:
    """``out`` as a Path, or a one-line HPAError naming ``flag`` when ``out`` is empty, when it is
    (or links to) one of ``inputs``, the files the command reads, or when it is one of the
    ``RUN_FILES`` of a run folder: of any folder that holds a run, and of the folders in
    ``run_dirs`` (those the command reads), where the names in ``own`` are the command's own
    outputs (``report.html`` for ``report``, ``model.onnx`` for ``export``)."""
    if out is None or not str(out).strip():
        raise HPAError(f"{flag} is empty: give a path to write to")
    path = Path(out)
    # where a write lands: the atomic writer replaces the name inside the folder's real path
    landing = {Path(os.path.realpath(path.parent)) / path.name, Path(os.path.realpath(path))}
    read = {Path(os.path.realpath(d)) for d in run_dirs}
    for target in landing:
        for run_dir in [p for p in list(target.parents)[:3] if p in read or _is_run_folder(p)]:
            rel = target.relative_to(run_dir)
            if rel.parts[0] in RUN_FILES and not (run_dir in read and rel.as_posix() in own):
                raise HPAError(f"{flag} {out}: would overwrite {rel.as_posix()} of the run folder {run_dir}, "
                               "which this command did not create; choose another path")
    try:
        st = os.stat(path)  # follows a link: writing through it must not replace what it points at
    except OSError:
        return path  # nothing there yet, so no input can be overwritten
    for f in inputs:
        try:
            same = os.path.samestat(st, os.stat(f))
        except OSError:
            continue
        if same:
            raise HPAError(f"{flag} {out}: is {f}, which this command reads; choose another path")
    return path


def check_output_folder(out, flag: str, names, inputs=(), run_dirs=(), own=()) -> Path:
    """``out`` as a folder that files ``names`` are written into, each checked as ``check_output``."""
    if out is None or not str(out).strip():
        raise HPAError(f"{flag} is empty: give the path of a folder to write into")
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise HPAError(f"{flag} {out}: not a folder (a file is there); choose a folder to write the report into")
    for name in names:
        check_output(folder / name, flag, inputs, run_dirs, own)
    return folder


# Text a spreadsheet reads as a formula (OWASP, "CSV injection"): =, +, -, @ and tab or carriage return.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def for_spreadsheet(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with every text cell that starts like a formula prefixed with ``'``, as OWASP
    recommends. Only for CSVs meant for people: a Kaggle submission and the CSVs this tool reads
    back (valid_predictions.csv, oof_predictions.csv, duplicates.csv) keep their ids verbatim."""
    def safe(value):
        return "'" + value if isinstance(value, str) and value.startswith(FORMULA_START) else value

    return df.assign(**{col: df[col].map(safe) for col in df.columns if not pd.api.types.is_numeric_dtype(df[col])})
