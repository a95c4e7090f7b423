"""What a search's trials show: one row per trial (trials.csv, the page, the console), the best
trial, the parameters' importances, and which worker ran a trial. Every value comes from the
study, which other machines may write too, so each is checked for its type."""
from __future__ import annotations

import math
import re
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
import pandas as pd
from optuna.trial import TrialState

from ..atomic import write_csv
from ..outputs import for_spreadsheet
from ..runs.folder import TRIALS

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)

STATE_WORDS = {TrialState.FAIL: "failed"}  # the others as Optuna names them: complete, pruned, running, waiting


def host_name() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:60] or "host"


TOKEN = re.compile(r"(?P<host>[A-Za-z0-9.-]{1,60})-(?P<pid>\d{1,10})-[0-9a-f]{6}")  # a worker: host, pid, random


def trial_name(number: int) -> str:
    """The run folder of trial ``number`` in the study folder."""
    return f"trial-{number:04d}"


def _text(value, limit: int = 300) -> str | None:
    return " ".join(value.split())[:limit] if isinstance(value, str) else None


def finite_number(value):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return value if ok else None


def trial_row(trial) -> dict:
    """One trial as trials.csv and the page show it; the values come from the study, which other
    machines write too, so each is checked for its type."""
    run = trial.user_attrs.get("run")
    attrs = run if isinstance(run, dict) else {}
    token = trial.user_attrs.get("worker")
    match = TOKEN.fullmatch(token) if isinstance(token, str) else None
    # Optuna keeps a pruned trial's last reported epoch score as its value: not the objective
    value = trial.values[0] if trial.values and trial.state == TrialState.COMPLETE else None
    return {"number": trial.number, "state": STATE_WORDS.get(trial.state, trial.state.name.lower()), "value": finite_number(value),
            "epochs_run": finite_number(attrs.get("epochs")), "seconds": finite_number(attrs.get("seconds")),
            "epoch_seconds": finite_number(attrs.get("epoch_seconds")), "run": _text(attrs.get("run_dir"), 100),
            "host": match["host"] if match else None, "worker": token if match else None,
            "reason": _text(attrs.get("reason")),
            "f1_macro": finite_number(attrs.get("f1_macro")), "f1_macro_tuned_oos": finite_number(attrs.get("f1_macro_tuned_oos")),
            "started": trial.datetime_start.isoformat(timespec="seconds") if trial.datetime_start else None,
            **{f"param_{k}": v for k, v in trial.params.items()}}


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    return pd.DataFrame([trial_row(t) for t in study.get_trials(deepcopy=False)])


def best_trial(study: optuna.Study):
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return None
    key = (lambda t: t.values[0]) if study.direction == optuna.study.StudyDirection.MAXIMIZE else \
        (lambda t: -t.values[0])
    return max(complete, key=key)


@dataclass
class TrialReport:
    """A finished trial as the console shows it: its row, and where the study stands."""
    row: dict
    finished: int
    n_trials: int
    best_number: int | None
    best_value: float | None


def trial_report(study: optuna.Study, trial, n_trials: int) -> TrialReport:
    best = best_trial(study)
    return TrialReport(trial_row(trial), len(study.get_trials(deepcopy=False, states=FINISHED)), n_trials,
                       best.number if best else None, best.values[0] if best else None)


def write_trials(folder: Path, study: optuna.Study) -> pd.DataFrame:
    trials = trials_frame(study)
    write_csv(folder / TRIALS, for_spreadsheet(trials) if len(trials) else trials)
    return trials


def importances(study: optuna.Study) -> dict:
    """How much each parameter moved the objective among the complete trials (Optuna's default
    evaluator, PED-ANOVA); empty until there are enough of them."""
    if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) < 3:
        return {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
    except (RuntimeError, ValueError, ZeroDivisionError):  # too few distinct values to tell
        return {}
