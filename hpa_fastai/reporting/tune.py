"""The page of a hyperparameter search, ``tune.html``: the optimisation history, each trial's score per
epoch (where pruning stopped the weaker ones), the parameters' importances, the score against each
parameter, the trials table and the confirmation of the best configuration.

It is drawn from what the study folder holds: ``tune.json`` (settings, best trial, confirmation,
importances), ``trials.csv`` and the trials' own ``history.csv``. Like ``report.html`` it is one
self-contained file (images as data URIs, no network) rendered with autoescaping; every value read
from those files is shown as text or as a number only if it is one.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from .. import plots
from ..atomic import write_text
from ..errors import HPAError
from ..runs.files import read_history, read_trials, read_tune
from ..runs.folder import TUNE, TUNE_REPORT, is_run_dir, is_study_dir
from .html import TEMPLATES, data_uri, figure_png, fmt_value, num

MAX_PLOTTED_PARAMS = 16
PLAIN_NAME = re.compile(r"[A-Za-z0-9._-]{1,100}")
STATE_COLOURS = {"complete": "C0", "pruned": "C7", "failed": "C3", "running": "C2"}


def _numbers(frame: pd.DataFrame, column: str) -> pd.Series:
    if column not in frame:
        return pd.Series(np.nan, index=frame.index, dtype=float)
    values = pd.to_numeric(frame[column], errors="coerce").astype(float)
    return values.where(np.isfinite(values))


def _texts(frame: pd.DataFrame, column: str) -> pd.Series:
    if column not in frame:
        return pd.Series("", index=frame.index)
    return frame[column].map(lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))


def _trial_dir(study_dir: Path, name: str) -> Path | None:
    """A trial's run folder named in trials.csv: a plain name directly inside the study folder."""
    if not PLAIN_NAME.fullmatch(name) or name in (".", ".."):
        return None
    path = study_dir / name
    return path if not path.is_symlink() and is_run_dir(path) else None


# --- the plots --------------------------------------------------------------------------------------

def history_plot(trials: pd.DataFrame, objective: str, maximize: bool) -> bytes:
    fig, ax = plots.subplots(figsize=(8, 3.6))
    numbers, values, states = _numbers(trials, "number"), _numbers(trials, "value"), _texts(trials, "state")
    done = (states == "complete") & values.notna() & numbers.notna()
    ax.plot(numbers[done], values[done], "o", color="C0", label="complete trial")
    if done.any():
        order = numbers[done].sort_values().index
        best = values[order].cummax() if maximize else values[order].cummin()
        ax.step(numbers[order], best, where="post", color="C1", label="best so far")
    for state, marker in (("pruned", "x"), ("failed", "v")):
        mask = (states == state) & numbers.notna()
        if mask.any() and done.any():
            low = float(values[done].min())
            ax.plot(numbers[mask], [low] * int(mask.sum()), marker, color=STATE_COLOURS[state], label=f"{state} (no score)")
    ax.set(xlabel="trial", ylabel=plots.plain_text(objective), title="optimisation history")
    ax.grid(alpha=.3)
    if ax.lines:
        ax.legend(fontsize=8)
    return figure_png(fig)


def epochs_plot(study_dir: Path, trials: pd.DataFrame, metric: str, best_number) -> tuple[bytes | None, int]:
    """Each trial's per-epoch score (what pruning compares); returns the plot and how many trials it shows."""
    fig, ax = plots.subplots(figsize=(8, 3.6))
    shown = 0
    for number, state, run in zip(_numbers(trials, "number"), _texts(trials, "state"), _texts(trials, "run")):
        run_dir = _trial_dir(study_dir, run) if run else None
        if run_dir is None:
            continue
        history = read_history(run_dir)
        if "epoch" not in history or metric not in history:
            continue
        epochs, scores = pd.to_numeric(history["epoch"], errors="coerce"), pd.to_numeric(history[metric], errors="coerce")
        best = number == best_number
        ax.plot(epochs, scores, marker="o" if best else None, lw=2.5 if best else 1, alpha=1 if best else .6,
                color="C1" if best else STATE_COLOURS.get(state, "C7"), ls="--" if state == "pruned" else "-",
                label="best trial" if best else None)
        shown += 1
    if not shown:
        return None, 0
    ax.set(xlabel="epoch", ylabel=plots.plain_text(metric),
           title="each trial's validation score per epoch (dashed: pruned)")
    ax.grid(alpha=.3)
    if any(line.get_label() == "best trial" for line in ax.lines):
        ax.legend(fontsize=8)
    return figure_png(fig), shown


def importance_plot(importances: dict) -> bytes | None:
    items = [(str(k), float(v)) for k, v in importances.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    if not items:
        return None
    fig, ax = plots.subplots(figsize=(6, 0.35 * len(items) + 1.2))
    ax.barh([plots.plain_text(k) for k, _ in items], [v for _, v in items], color="C0")
    ax.invert_yaxis()
    ax.set(xlabel="importance (share of the objective's variation)", title="parameter importances")
    return figure_png(fig)


def params_plot(trials: pd.DataFrame, space: dict, objective: str) -> bytes | None:
    """The objective of each complete trial against each parameter it drew."""
    params = [c for c in trials.columns if str(c).startswith("param_")][:MAX_PLOTTED_PARAMS]
    done = (_texts(trials, "state") == "complete") & _numbers(trials, "value").notna()
    if not params or not done.any():
        return None
    cols = min(3, len(params))
    rows = math.ceil(len(params) / cols)
    fig, axes = plots.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax in axes.flat[len(params):]:
        ax.axis("off")
    values = _numbers(trials, "value")
    for ax, column in zip(axes.flat, params):
        name = str(column)[len("param_"):]
        spec = space.get(name) if isinstance(space.get(name), dict) else {}
        x = _numbers(trials, column)
        mask = done & x.notna()
        if "choices" in spec or not mask.any():  # categories, shown in the order the space lists them
            labels = _texts(trials, column)
            mask = done & (labels != "")
            categories = list(dict.fromkeys([str(c) for c in spec.get("choices", [])] + list(labels[mask])))
            position = labels[mask].map({c: i for i, c in enumerate(categories)}).astype(float)
            jitter = np.random.default_rng(0).uniform(-0.12, 0.12, len(position))
            ax.plot(position + jitter, values[mask], "o", alpha=.7)
            ax.set_xticks(range(len(categories)), [plots.plain_text(c)[:12] for c in categories], fontsize=8)
        else:
            ax.plot(x[mask], values[mask], "o", alpha=.7)
            if spec.get("log") is True and (x[mask] > 0).all():
                ax.set_xscale("log")
        ax.set_title(plots.plain_text(name), fontsize=9)
        ax.grid(alpha=.3)
    axes[0, 0].set_ylabel(plots.plain_text(objective))
    fig.tight_layout()
    return figure_png(fig)


# --- the page -------------------------------------------------------------------------------------

def _value(v, spec=".4f") -> str:
    return num(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else fmt_value(v) if v is not None else "-"


def trials_table(trials: pd.DataFrame) -> dict:
    params = [c for c in trials.columns if str(c).startswith("param_")]
    columns = ["trial", "state", "score", *[str(c)[len("param_"):] for c in params], "epochs", "time", "folder", "reason"]
    rows = []
    numbers, values = _numbers(trials, "number"), _numbers(trials, "value")
    epochs, seconds = _numbers(trials, "epochs_run"), _numbers(trials, "seconds")
    for i in trials.index:
        cells = [num(numbers[i], ".0f"), _texts(trials, "state")[i], num(values[i], ".4f")]
        for c in params:
            v = trials.at[i, c]
            cells.append(num(v, ".4g") if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
                         else _texts(trials, c)[i] or "-")
        cells += [num(epochs[i], ".0f"), num(seconds[i], ".0f") + ("s" if num(seconds[i]) != "-" else ""),
                  _texts(trials, "run")[i] or "-", _texts(trials, "reason")[i]]
        rows.append(cells)
    numeric = [0, 2, *range(3, 3 + len(params)), 3 + len(params), 4 + len(params)]
    return {"columns": columns, "rows": rows, "numeric": numeric}


def confirmation_values(confirmation, objective: str) -> dict | None:
    if not isinstance(confirmation, dict):
        return None
    runs = confirmation.get("runs") if isinstance(confirmation.get("runs"), list) else []
    return {"trial": _value(confirmation.get("trial"), ".0f"),
            "search_value": _value(confirmation.get("search_value")),
            "mean": _value(confirmation.get("mean")), "std": _value(confirmation.get("std")),
            "min": _value(confirmation.get("min")), "max": _value(confirmation.get("max")),
            "rows": [[fmt_value(r.get("run")), _value(r.get("seed"), ".0f"), _value(r.get("value")),
                      fmt_value(r.get("status"))] for r in runs if isinstance(r, dict)],
            "objective": objective}


def tune_values(study_dir: Path) -> dict:
    """What tune.html shows, section by section."""
    settings, trials = read_tune(study_dir), read_trials(study_dir)
    objective = fmt_value(settings.get("objective", "objective"))
    maximize = settings.get("direction") != "minimize"
    space = settings.get("space") if isinstance(settings.get("space"), dict) else {}
    best = settings.get("best") if isinstance(settings.get("best"), dict) else None
    metric = str(settings.get("epoch_metric", "f1_macro"))
    states = _texts(trials, "state").value_counts().to_dict() if len(trials) else {}
    epochs, shown = epochs_plot(study_dir, trials, metric, best.get("number") if best else None) if len(trials) \
        else (None, 0)
    importances = settings.get("importances") if isinstance(settings.get("importances"), dict) else {}
    fixed = settings.get("fixed") if isinstance(settings.get("fixed"), dict) else {}
    return {
        "name": fmt_value(settings.get("study", study_dir.name)),
        "objective": objective, "direction": "higher is better" if maximize else "lower is better",
        "metric": metric,
        "settings": [[k, fmt_value(settings.get(k))] for k in ("storage", "sampler", "pruner", "seed", "n_trials",
                                                                "status", "started", "finished")],
        "states": ", ".join(f"{n} {fmt_value(state)}" for state, n in states.items()) or "no trials yet",
        "n_trials": len(trials),
        "best": None if best is None else {
            "number": _value(best.get("number"), ".0f"), "value": _value(best.get("value")),
            "run": fmt_value(best.get("run")),
            "params": [[fmt_value(k), _value(v, ".4g")] for k, v in (best.get("params") or {}).items()]
            if isinstance(best.get("params"), dict) else []},
        "best_run": fmt_value(settings.get("best_run")) if settings.get("best_run") else None,
        "confirmation": confirmation_values(settings.get("confirmation"), objective),
        "history": data_uri(history_plot(trials, objective, maximize)) if len(trials) else None,
        "epochs": data_uri(epochs) if epochs else None, "epochs_shown": shown,
        "importances": (lambda png: data_uri(png) if png else None)(importance_plot(importances)),
        "params": (lambda png: data_uri(png) if png else None)(params_plot(trials, space, objective)) if len(trials)
        else None,
        "trials": trials_table(trials) if len(trials) else None,
        "space": [[fmt_value(k), _spec(v)] for k, v in space.items()],
        "fixed": [[fmt_value(k), fmt_value(v)] for k, v in fixed.items()],
    }


def _spec(spec) -> str:
    if not isinstance(spec, dict):
        return "-"
    if isinstance(spec.get("choices"), list):
        return "one of " + ", ".join(fmt_value(c) for c in spec["choices"])
    text = f"{_value(spec.get('low'), 'g')} to {_value(spec.get('high'), 'g')}"
    return text + (", log scale" if spec.get("log") is True else "") + (
        f", step {_value(spec.get('step'), 'g')}" if spec.get("step") is not None else "")


def render_tune_report(study_dir: Path) -> str:
    return TEMPLATES.get_template("search.html").render(tune_values(study_dir))


def write_tune_report(study_dir, out=None) -> Path:
    """Write the search's page (default ``study_dir/tune.html``); returns its path."""
    study_dir = Path(study_dir)
    if not is_study_dir(study_dir):
        raise HPAError(f"{study_dir}: not a search's study folder (no {TUNE})")
    return write_text(Path(out) if out else study_dir / TUNE_REPORT, render_tune_report(study_dir))
