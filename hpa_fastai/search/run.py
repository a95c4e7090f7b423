"""The search's door, ``tune(cfg)``: check the flags, the data and the space, open the study, run its
trials (in this process, or in ``--jobs`` worker processes), retrain the best configuration with new
seeds, and point ``best`` and ``runs/latest`` at the best confirmed run.

``run.py tune [training flags] --n-trials N`` writes::

    runs/tune-<study>/
        tune.json          the search's settings (objective, sampler, pruner, space, the flags held
                           fixed, the resolved training config), then its best trial, the
                           confirmation and the parameter importances
        study.journal      the study itself (Optuna's journal file), unless --storage names a server
        trial-0000/ ...    one run folder per trial; a pruned one says "pruned" and keeps no weights
        confirm-t0007-seed43/ ...   the best configuration retrained with new seeds
        best -> confirm-t0007-seed44   the best confirmed run folder (runs/latest points there too)
        trials.csv         one row per trial: state, objective, parameters, epochs, time, folder
        workers/           each worker's lock (how a killed worker is told from a live one) and,
                           with --jobs, its log
        tune.html          written by the command line (``reporting.write_tune_report``)

Faults: a worker killed outright leaves a running trial that the next worker or ``tune`` marks
failed (``workers``); Ctrl-C ends the current trial (failed, reason "interrupted") and keeps the
study; the same command continues it, since ``--n-trials`` counts the finished trials (complete or
pruned) the study holds; a failing trial is recorded with its reason (``objective``).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import optuna
import pandas as pd

from ..atomic import write_json
from ..config import TrainConfig, TuneConfig, validate
from ..errors import HPAError
from ..runs.files import read_history, read_metrics, read_status
from ..runs.folder import (BEST_RUN, CHECKPOINT, LATEST, STUDY_JOURNAL, TUNE, is_run_dir, now, point_link,
                           study_dir)
from ..training import prepare, train
from .objective import one_line, run_trials
from .space import NOT_SEARCHED, Space, default_space, read_space, space_from_dict, trial_config
from .study import Search, open_study, run_value, shown_storage
from .trials import best_trial, finite_number, importances, trial_row, write_trials
from .workers import STORAGE_ENV, fail_dead_workers, run_workers

logger = logging.getLogger(__name__)

DONE = ("finished", "stopped early")


def _run_state(run_dir: Path) -> str:
    """``done``, ``resume`` (interrupted after an epoch) or ``new``, as cross-validation's folds."""
    if not is_run_dir(run_dir):
        return "new"
    if read_status(run_dir).get("status") in DONE:
        return "done"
    return "resume" if (run_dir / CHECKPOINT).is_file() else "new"


def confirm(search: Search, trial, k: int, cbs=()) -> dict:
    """Retrain the configuration of ``trial`` with ``k`` new seeds (--seed + 1 ... --seed + k), each a
    full run without pruning: a search picks the trial that scored best, which is partly luck, and
    these runs say what the configuration scores without that luck. A run finished before (an
    interrupted confirmation) is kept, one interrupted after an epoch continues."""
    runs = []
    for i in range(1, k + 1):
        seed = search.base.seed + i
        name = f"confirm-t{trial.number:04d}-seed{seed}"
        run_dir = search.folder / name
        try:
            cfg = trial_config(search.base, trial.params, out=str(search.folder), seed=seed)
            state = _run_state(run_dir)
            logger.info(f"confirming trial {trial.number} with seed {seed} ({i} of {k})" +
                        {"done": ": finished before, kept", "resume": ": continuing it", "new": ""}[state])
            if state == "resume":
                train(dataclasses.replace(cfg, resume=str(run_dir)), cbs=cbs, link_latest=False)
            elif state == "new":
                if run_dir.exists() and not run_dir.is_symlink():
                    shutil.rmtree(run_dir)  # a run that failed before its first epoch: nothing to continue
                train(cfg, run_name=name, cbs=cbs, link_latest=False)
        except (HPAError, Exception) as e:
            runs.append({"seed": seed, "run": name, "value": None, "status": "failed", "reason": one_line(e)})
            logger.warning(f"the confirmation run with seed {seed} failed: {one_line(e)}")
            continue
        value = run_value(read_metrics(run_dir), read_history(run_dir), search.objective)
        runs.append({"seed": seed, "run": name, "value": value if math.isfinite(value) else None,
                     "status": read_status(run_dir).get("status")})
    values = [r["value"] for r in runs if r["value"] is not None]
    return {"trial": trial.number, "search_value": trial.values[0], "params": dict(trial.params), "runs": runs,
            "mean": float(np.mean(values)) if values else None,
            "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
            "min": min(values) if values else None, "max": max(values) if values else None}


def best_run(search: Search, trial, confirmation: dict | None) -> Path | None:
    """The best confirmed run folder, or the best trial's where none was confirmed."""
    sign = 1 if search.direction == "maximize" else -1
    confirmed = [r for r in (confirmation or {}).get("runs", []) if r["value"] is not None]
    if confirmed:
        return search.folder / max(confirmed, key=lambda r: sign * r["value"])["run"]
    run = trial_row(trial)["run"] if trial is not None else None
    return search.folder / run if run and is_run_dir(search.folder / run) else None


@dataclass
class TuneResult:
    """A search that ended: its folder, the trials (trials.csv's rows), the best trial, the
    confirmation of it, the folder ``best`` points at, and whether it was interrupted."""
    study_dir: Path
    study: str
    objective: str
    direction: str
    trials: pd.DataFrame
    best: dict | None = None
    confirmation: dict | None = None
    best_run: Path | None = None
    importances: dict = field(default_factory=dict)
    space: dict = field(default_factory=dict)


def prepare_search(cfg: TuneConfig, space: Space | None = None, fixed=()) -> tuple[Search, object]:
    """The search ``cfg`` describes, every flag, the data and the space checked, nothing written:
    (the search, the training set of its base config)."""
    validate(cfg)
    base_cfg = cfg.training_config()
    ts = prepare(base_cfg)  # flags and data, checked once before any trial
    base = ts.cfg
    if space is None:
        space = read_space(cfg.space) if cfg.space else default_space(base.size)
    # the training flags given that a space could draw (where the data is and the runs go never are)
    fixed = [name for name in dict.fromkeys(fixed)
             if name in {f.name for f in dataclasses.fields(TrainConfig)} and name not in NOT_SEARCHED]
    searched = space.without(fixed)
    if not searched.params:
        raise HPAError(f"nothing to search: every field of the space ({', '.join(space.names)}) is given as a flag")
    deadline = time.time() + cfg.timeout if cfg.timeout else None
    search = Search(cfg.study, study_dir(cfg.out, cfg.study), cfg.storage, base, searched, cfg.objective, cfg.sampler,
                    cfg.pruner, cfg.seed, cfg.n_trials, deadline, cfg.jobs,
                    {name: getattr(base, name) for name in fixed})
    return search, ts


def tune(cfg: TuneConfig, space: Space | None = None, fixed=(), on_trial=None, cbs=()) -> TuneResult:
    """Run the study ``cfg`` describes until it holds ``cfg.n_trials`` finished trials, then retrain the
    best configuration with ``cfg.confirm`` new seeds. ``space``: the search space (default
    ``cfg.space``'s file, else the built-in one); ``fixed``: training fields held at ``cfg``'s values
    (the command line's given flags), taken out of the space; ``on_trial(TrialReport)`` after each
    finished trial; ``cbs``: extra fastai callbacks for every run. Ctrl-C ends the current trial,
    writes trials.csv and tune.json and raises KeyboardInterrupt; the same call continues."""
    search, ts = prepare_search(cfg, space, fixed)
    folder = search.folder
    # a study that exists (on a server, or in the folder) is opened and checked before anything is
    # written: another space, objective or an unreachable server leaves no folder behind
    exists = search.storage is not None or (folder / STUDY_JOURNAL).is_file()
    study = open_study(search) if exists else None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HPAError(f"--out {cfg.out}: cannot create the study folder {folder} ({e.strerror or e})") from None
    study = study or open_study(search)
    settings = {**search.settings(), "status": "running", "started": now()}
    write_json(folder / TUNE, settings)
    logger.info(f"study {search.study} in {folder}: searching " +
                "; ".join(f"{k} {v}" for k, v in search.space.describe().items()))
    if search.fixed:
        logger.info("held fixed: " + ", ".join(f"{k} {v}" for k, v in search.fixed.items()))
    fail_dead_workers(study, folder)
    try:
        if search.jobs == 1:
            def reported(report):
                write_trials(folder, study)
                if on_trial is not None:
                    on_trial(report)
            run_trials(search, reported, cbs, stats={(ts.cfg.size, ts.cfg.channels): (ts.mean, ts.std)})
        else:  # the workers read their settings from tune.json
            run_workers(search, on_trial)
        best = best_trial(study)
        confirmation = confirm(search, best, cfg.confirm, cbs) if best is not None and cfg.confirm else None
    except KeyboardInterrupt:
        _finish(search, study, settings, "interrupted")
        raise
    result = _finish(search, study, settings, "finished", best, confirmation)
    if result.best_run is not None:
        point_link(folder / BEST_RUN, result.best_run)
        point_link(Path(cfg.out) / LATEST, result.best_run)
    return result


def _finish(search: Search, study: optuna.Study, settings: dict, status: str, best=None,
            confirmation: dict | None = None) -> TuneResult:
    trials = write_trials(search.folder, study)
    best = best if best is not None else best_trial(study)
    run = best_run(search, best, confirmation) if status == "finished" else None
    found = {"number": best.number, "value": best.values[0], "params": dict(best.params),
             "run": trial_row(best)["run"]} if best is not None else None
    weights = importances(study)
    write_json(search.folder / TUNE, {**settings, "status": status, "finished": now(), "best": found,
                                      "confirmation": confirmation, "importances": weights,
                                      "best_run": run.name if run is not None else None})
    return TuneResult(search.folder, search.study, search.objective, search.direction, trials, found, confirmation,
                      run, weights, search.space.to_json())


def search_from_settings(folder: Path, settings: dict) -> Search:
    """The search a worker runs, from its study folder's tune.json (checked as flags are)."""
    where = folder / TUNE
    try:
        base = TrainConfig.from_dict(settings["config"])
        validate(base)
        space = space_from_dict(settings["space"], str(where))
        objective, sampler, pruner = settings["objective"], settings["sampler"], settings["pruner"]
        tune_checks = TuneConfig(**{**base.to_json(), "objective": objective, "sampler": sampler, "pruner": pruner,
                                    "seed": settings["seed"], "n_trials": settings["n_trials"],
                                    "study": settings["study"], "jobs": settings["jobs"]})
        validate(tune_checks)
        deadline = settings.get("deadline")
        if deadline is not None and not (finite_number(deadline) is not None and deadline > 0):
            raise HPAError(f"'deadline' must be a time in seconds (got {deadline!r:.40})")
        fixed = settings.get("fixed") if isinstance(settings.get("fixed"), dict) else {}
    except (KeyError, TypeError) as e:
        raise HPAError(f"{where}: not the settings of a search (no {e})") from None
    except HPAError as e:
        raise HPAError(f"{where}: {e}") from None
    storage = None
    if settings.get("storage") != shown_storage(None):
        storage = os.environ.get(STORAGE_ENV)
        if not storage:
            raise HPAError(f"{where}: the study is on a server ({str(settings.get('storage'))[:200]}), whose URL "
                           f"comes in {STORAGE_ENV}, which is not set")
    return Search(tune_checks.study, folder, storage, base, space, objective, sampler, pruner, tune_checks.seed,
                  tune_checks.n_trials, deadline, tune_checks.jobs, fixed)
