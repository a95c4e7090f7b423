"""A hyperparameter search: trials drawn by Optuna from a search space, each an ordinary training run
through the training door, on one machine or on many that share one study.

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

Storage: by default the study is Optuna's journal file in the study folder, which needs no server and
which several worker processes append to under a file lock (SQLite, the other file storage, is
not made for concurrent writers). ``--storage postgresql://...`` keeps it in a database that ``tune``
commands on any number of machines share.

Faults: each worker holds a lock file for as long as it lives and records it in its trials; a
running trial whose worker's lock is free belongs to a worker that was killed, and the next worker
or ``tune`` on that machine marks it failed. Trials of other machines in a PostgreSQL study send
Optuna's heartbeats, and a trial whose heartbeat stops is failed by whichever worker looks next.
Ctrl-C ends the current trial (failed, reason "interrupted") and keeps the study; the same command
continues it, since ``--n-trials`` counts the finished trials (complete or pruned) the study holds.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
from optuna.trial import TrialState

from ..atomic import exclusive_lock, lock_is_free, write_csv, write_json
from ..config import OBJECTIVES, TrainConfig, TuneConfig, validate
from ..errors import HPAError
from ..outputs import for_spreadsheet
from ..runs.files import read_history, read_metrics, read_status
from ..runs.folder import (BEST_RUN, CHECKPOINT, LATEST, STUDY_JOURNAL, TRIALS, TUNE, WORKERS, is_run_dir, now,
                           point_link, remove_resume_files, run_lock, study_dir, write_status)
from ..training import RunResult, prepare, train
from .callback import OptunaPruning
from .space import NOT_SEARCHED, Space, default_space, read_space, space_from_dict, trial_config

logger = logging.getLogger(__name__)

POLL_SECONDS = 1.0
# PostgreSQL studies: a worker's heartbeat every 30 s; a trial silent for 2 minutes is failed
HEARTBEAT_SECONDS, GRACE_SECONDS = 30, 120
SCHEMA_TRIES = 5
MAX_FAILURES_IN_A_ROW = 10  # a set-up where every trial fails would otherwise retry forever
# a running trial that never recorded its worker (killed between Optuna's ask and the first attribute,
# a few milliseconds) is given up after this long
UNCLAIMED_SECONDS = 600
WORKER_ENV, STORAGE_ENV = "HPA_TUNE_WORKER", "HPA_TUNE_STORAGE"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
STATE_WORDS = {TrialState.FAIL: "failed"}  # the others as Optuna names them: complete, pruned, running, waiting
DONE = ("finished", "stopped early")


class TrialFailed(Exception):
    """A trial that failed (its reason is in the trial's ``reason`` attribute); the study goes on."""


# --- the search's settings -------------------------------------------------------------------------

@dataclass
class Search:
    """Everything a worker needs to run trials of a study; ``tune.json`` holds it (less the storage
    URL's password)."""
    study: str
    folder: Path
    storage: str | None
    base: TrainConfig  # the resolved training config every trial starts from
    space: Space
    objective: str = "f1_macro_tuned_oos"
    sampler: str = "tpe"
    pruner: str = "median"
    seed: int = 42
    n_trials: int = 20
    deadline: float | None = None  # time.time() after which no trial starts
    jobs: int = 1
    fixed: dict = field(default_factory=dict)  # the training flags given on the command line

    @property
    def direction(self) -> str:
        return OBJECTIVES[self.objective]

    def settings(self) -> dict:
        return {"study": self.study, "storage": shown_storage(self.storage), "objective": self.objective,
                "direction": self.direction, "epoch_metric": epoch_metric(self.objective), "sampler": self.sampler,
                "pruner": self.pruner, "seed": self.seed, "n_trials": self.n_trials, "deadline": self.deadline,
                "jobs": self.jobs, "space": self.space.to_json(), "fixed": self.fixed, "config": self.base.to_json()}


def shown_storage(url: str | None) -> str:
    """The storage as it may be shown and written down: a server's URL without its password."""
    if url is None:
        return f"journal file {STUDY_JOURNAL}"
    from sqlalchemy.engine import make_url

    return make_url(_sqlalchemy_url(url)).render_as_string(hide_password=True)


def epoch_metric(objective: str) -> str:
    """The per-epoch score that stands in for the objective while a trial trains (what it reports
    for pruning): macro F1 at --threshold for the F1 objectives, the validation loss for the loss."""
    return "valid_loss" if objective == "valid_loss" else "f1_macro"


def run_value(metrics: dict, history: pd.DataFrame, objective: str) -> float:
    """A finished run's objective: a metrics.json value, or the best epoch's validation loss."""
    if objective == "valid_loss":
        row = history[history["epoch"] == metrics.get("best_epoch")] if "epoch" in history else history.iloc[:0]
        value = row["valid_loss"].iloc[0] if len(row) and "valid_loss" in row else None
    else:
        value = metrics.get(objective)
    ok = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else float("nan")


# --- storage, sampler, pruner ----------------------------------------------------------------------

def _sqlalchemy_url(url: str) -> str:
    # SQLAlchemy reads a bare postgresql:// as psycopg2's; the driver installed with the postgres
    # extra is psycopg 3
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme):]
    return url


def open_storage(url: str | None, folder: Path):
    """The study's storage: the journal file in ``folder``, or the PostgreSQL server at ``url``."""
    if url is None:
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        # Optuna's default lock (a link made beside the file), as optuna-dashboard's, which may write notes
        return JournalStorage(JournalFileBackend(str(folder / STUDY_JOURNAL)))
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(SCHEMA_TRIES):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.9, and its only way
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(_sqlalchemy_url(url), heartbeat_interval=HEARTBEAT_SECONDS,
                                                  grace_period=GRACE_SECONDS, engine_kwargs={"pool_pre_ping": True})
        except ImportError as e:
            raise HPAError(f"--storage {shown_storage(url)} needs the PostgreSQL driver: pip install "
                           f"'hpa_fastai[postgres]' ({e})") from None
        except (IntegrityError, ProgrammingError) as e:
            # tune commands started together on a new database race to create Optuna's tables; the
            # loser finds them made when it tries again
            if attempt == SCHEMA_TRIES - 1:
                raise HPAError(f"--storage {shown_storage(url)}: cannot create the study's tables "
                               f"({str(e).splitlines()[0][:200]})") from None
            time.sleep(0.5 + secrets.randbelow(1000) / 1000)
        except Exception as e:  # sqlalchemy's OperationalError and the like: say why in one line
            raise HPAError(f"--storage {shown_storage(url)}: cannot use the database "
                           f"({str(e).splitlines()[0][:200]})") from None


def trial_seed(seed: int, number: int) -> int:
    """The seed of trial ``number``'s draws: the same for the same --seed and trial, different for
    every trial of a study, so workers never draw alike."""
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


def make_sampler(kind: str, seed: int, n_trials: int):
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # TPE models the trials it has seen; its first few trials are drawn at random
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(3, n_trials // 4)))


def make_pruner(kind: str, epochs: int):
    """Pruning decides only after the one-cycle warm-up (a quarter of the epochs, where a rising
    learning rate makes scores worse on purpose, and where early stopping does not count either).
    ``median``: from the 6th trial on, a trial whose best epoch score so far is below the median of the
    complete trials at the same epoch stops. ``halving``: asynchronous successive halving, which
    lets the best third of the trials go on at the first epoch after the warm-up, and again at three
    and nine times that many epochs."""
    first = math.ceil(0.25 * epochs) + 1  # the first epoch after the warm-up
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=first)
    if kind == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=first, reduction_factor=3)
    return optuna.pruners.NopPruner()


def load_study(search: Search, storage=None) -> optuna.Study:
    storage = storage or open_storage(search.storage, search.folder)
    return optuna.load_study(study_name=search.study, storage=storage,
                             sampler=make_sampler(search.sampler, search.seed, search.n_trials),
                             pruner=make_pruner(search.pruner, search.base.epochs))


def open_study(search: Search) -> optuna.Study:
    """The study, created or continued; one that searches another space or objective is refused."""
    storage = open_storage(search.storage, search.folder)
    try:
        try:  # loading first: creating an existing study would still append to a journal
            study = load_study(search, storage)
        except KeyError:
            study = optuna.create_study(study_name=search.study, storage=storage, direction=search.direction,
                                        load_if_exists=True,  # another command may create it at the same time
                                        sampler=make_sampler(search.sampler, search.seed, search.n_trials),
                                        pruner=make_pruner(search.pruner, search.base.epochs))
    except Exception as e:  # a damaged journal, a database that refuses the schema
        raise HPAError(f"{_where(search)}: cannot open the study ({str(e).splitlines()[0][:200]})") from None
    if study.direction.name.lower() != search.direction:
        raise HPAError(f"{_where(search)} {study.direction.name.lower()}s its objective, and --objective "
                       f"{search.objective} is to {search.direction}; choose another --study")
    attrs = study.user_attrs
    if "space" in attrs or "objective" in attrs:
        _check_same_search(search, attrs)
    else:
        study.set_user_attr("space", search.space.to_json())
        study.set_user_attr("objective", search.objective)
    return study


def _where(search: Search) -> str:
    return f"study {search.study!r} ({search.folder / STUDY_JOURNAL if search.storage is None else shown_storage(search.storage)})"


def _check_same_search(search: Search, attrs: dict) -> None:
    if attrs.get("objective") != search.objective:
        raise HPAError(f"{_where(search)} optimises {str(attrs.get('objective'))[:40]!r}, not --objective "
                       f"{search.objective}; give the same --objective, or another --study")
    theirs, ours = attrs.get("space"), search.space.to_json()
    if json.dumps(theirs, sort_keys=True) == json.dumps(ours, sort_keys=True):
        return
    theirs = theirs if isinstance(theirs, dict) else {}
    differ = [name for name in dict.fromkeys([*ours, *theirs]) if theirs.get(name) != ours.get(name)]
    detail = "; ".join(f"{name}: {_spec(theirs.get(name))} there, {_spec(ours.get(name))} here" for name in differ[:3])
    raise HPAError(f"{_where(search)} searches another space ({detail}); run it with the same --space and "
                   f"flags, or choose another --study")


def _spec(spec) -> str:
    if not isinstance(spec, dict):
        return "not searched"
    if "choices" in spec:
        return "one of " + ", ".join(str(c)[:20] for c in list(spec["choices"])[:8])
    return f"{spec.get('low')} to {spec.get('high')}" + (" (log)" if spec.get("log") else "")


# --- which worker runs what ------------------------------------------------------------------------

def host_name() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:60] or "host"


TOKEN = re.compile(r"(?P<host>[A-Za-z0-9.-]{1,60})-(?P<pid>\d{1,10})-[0-9a-f]{6}")  # a worker: host, pid, random


@contextmanager
def worker_lock(folder: Path):
    """This process as a worker of the study in ``folder``: a lock file it holds while it lives
    (the operating system drops the lock with the process, kill -9 included). Yields its name and
    the lock's path."""
    workers = folder / WORKERS
    workers.mkdir(parents=True, exist_ok=True)
    token = f"{host_name()}-{os.getpid()}-{secrets.token_hex(3)}"
    path = workers / f"{token}.lock"
    with exclusive_lock(path, f"{path}: in use by another process"):
        try:
            yield token, path.resolve()
        finally:
            path.unlink(missing_ok=True)


def _worker_alive(folder: Path, trial) -> bool | None:
    """Whether the worker that runs ``trial`` is alive: True or False where this machine can tell (the
    trial's worker ran here), None where it cannot (another machine: its heartbeat says)."""
    token = trial.user_attrs.get("worker")
    match = TOKEN.fullmatch(token) if isinstance(token, str) else None
    if match is None:
        started = trial.datetime_start
        unclaimed = started is not None and (time.time() - started.timestamp()) > UNCLAIMED_SECONDS
        return False if unclaimed else None
    if match["host"] != host_name():
        return None
    # the lock's own path: a study shared through a server may have workers here with other --out folders
    lock = trial.user_attrs.get("worker_lock")
    if not (isinstance(lock, str) and os.path.isabs(lock) and Path(lock).name == f"{token}.lock"
            and Path(lock).parent.name == WORKERS):
        return None
    free = lock_is_free(lock)
    return None if free is None else not free


def fail_dead_workers(study: optuna.Study, folder: Path) -> list[int]:
    """Mark failed the running trials whose worker is gone (killed, or its machine lost): those of
    this machine's workers whose lock is free, and those whose heartbeat stopped (PostgreSQL).
    Returns their numbers."""
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if _worker_alive(folder, trial) is not False:
            continue
        token = trial.user_attrs.get("worker", "an unknown worker")
        reason = f"its worker process ({str(token)[:80]}) ended without finishing it (killed?)"
        try:
            # Optuna has no public setter for a trial this process did not ask for
            study._storage.set_trial_user_attr(trial._trial_id, "run", {"reason": reason,
                                                                          "run_dir": trial_name(trial.number)})
            study.tell(trial.number, state=TrialState.FAIL)
        except (optuna.exceptions.UpdateFinishedTrialError, ValueError, RuntimeError):
            continue  # another worker got there first
        failed.append(trial.number)
        logger.warning(f"trial {trial.number}: {reason}; marked failed")
        _mark_run_interrupted(folder, trial_name(trial.number), reason)
    with warnings.catch_warnings():  # experimental since Optuna 2.9, and the only door to heartbeats
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    return failed


def _mark_run_interrupted(folder: Path, name, reason: str) -> None:
    if not (isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9._-]{1,100}", name) and name not in (".", "..")):
        return
    run_dir = folder / name
    if not is_run_dir(run_dir) or run_dir.is_symlink():
        return
    try:
        with run_lock(run_dir):
            if read_status(run_dir).get("status") == "running":
                write_status(run_dir, "interrupted", reason=reason, epochs_done=len(read_history(run_dir)))
    except HPAError:  # someone is training it again (--resume): theirs now
        pass


def _live_running(study: optuna.Study, folder: Path) -> int:
    """Running trials that may still finish: those whose worker is alive or cannot be checked from
    here and still sends heartbeats. A trial of another machine on a journal file, which cannot be
    checked, is not waited for."""
    heartbeat = getattr(study._storage, "get_heartbeat_interval", lambda: None)() is not None
    count = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        alive = _worker_alive(folder, trial)
        count += bool(alive) or (alive is None and heartbeat)
    return count


# --- running trials ------------------------------------------------------------------------------

class StatsCache:
    """The channels' mean and std per (size, stains): measured once per worker, not once per trial."""

    def __init__(self, known: dict | None = None):
        self.known = dict(known or {})

    def get(self, cfg: TrainConfig) -> tuple:
        key = (cfg.size, cfg.channels)
        if key not in self.known:
            ts = prepare(cfg)
            self.known[(ts.cfg.size, ts.cfg.channels)] = self.known[key] = (ts.mean, ts.std)
        return self.known[key]


def _one_line(e: BaseException) -> str:
    text = str(e) if isinstance(e, HPAError) else f"{type(e).__name__}: {e}"
    head, sep, original = text.partition(":\n\t")  # fastai's rewording of a callback's exception
    text = original if sep and head.startswith("Exception occured in `") else text
    return " ".join(text.split())[:500]


class Objective:
    """One trial: draw the configuration, train it through the training door with the pruning
    callback, and return its objective; a failure is recorded with its reason."""

    def __init__(self, search: Search, worker: tuple, stats: StatsCache, cbs=()):
        (self.token, self.lock), self.search, self.stats, self.cbs = worker, search, stats, list(cbs)

    def __call__(self, trial: optuna.Trial) -> float:
        s = self.search
        # the sampler is set per trial, seeded by the trial's number: Optuna samples when suggest_*
        # is called, after ask, so the draws of this trial come from this generator
        trial.study.sampler = make_sampler(s.sampler, trial_seed(s.seed, trial.number), s.n_trials)
        trial.set_user_attr("worker", self.token)
        trial.set_user_attr("worker_lock", str(self.lock))
        params = s.space.sample(trial, s.base)
        name = trial_name(trial.number)
        pruning = OptunaPruning(trial, epoch_metric(s.objective))
        t0 = time.time()
        try:
            cfg = trial_config(s.base, params, out=str(s.folder))
            result = train(cfg, run_name=name, cbs=[pruning, *self.cbs], link_latest=False, stats=self.stats.get(cfg))
        except optuna.TrialPruned:
            run_dir = pruning.run_dir or s.folder / name
            reason = (f"pruned after epoch {pruning.pruned_at}: {epoch_metric(s.objective)} "
                      f"{pruning.last_value:.4f}")
            _mark_pruned(run_dir, reason, pruning.reported)
            self._record(trial, run_dir=run_dir.name, epochs=pruning.reported, seconds=time.time() - t0, reason=reason)
            raise
        except KeyboardInterrupt:
            self._record(trial, run_dir=(pruning.run_dir or s.folder / name).name, epochs=pruning.reported,
                         seconds=time.time() - t0, reason="interrupted (Ctrl-C or SIGTERM)")
            raise
        except Exception as e:  # NaN loss, a configuration the model cannot take, a library error
            reason = _one_line(e)
            self._record(trial, run_dir=pruning.run_dir.name if pruning.run_dir else None, epochs=pruning.reported,
                         seconds=time.time() - t0, reason=reason)
            raise TrialFailed(reason) from None
        return self._finished(trial, result, time.time() - t0)

    def _finished(self, trial, result: RunResult, seconds: float) -> float:
        value = run_value(result.metrics, result.history, self.search.objective)
        epoch_seconds = float(pd.to_numeric(result.history.get("seconds"), errors="coerce").sum()) \
            if "seconds" in result.history else None
        reason = None if math.isfinite(value) else f"the run's {self.search.objective} is not a number"
        self._record(trial, run_dir=result.run_dir.name, epochs=int(result.metrics["epochs_run"]), seconds=seconds,
                     epoch_seconds=epoch_seconds, status=result.status, reason=reason,
                     **{k: result.metrics.get(k) for k in ("f1_macro", "f1_macro_tuned", "f1_macro_tuned_oos")})
        if reason is not None:
            raise TrialFailed(reason)
        return value

    @staticmethod
    def _record(trial, **attrs) -> None:
        """What the trial's run gave, as one attribute (each is a write to the study)."""
        trial.set_user_attr("run", {key: round(value, 4) if isinstance(value, float) else value
                                    for key, value in attrs.items() if value is not None})


def trial_name(number: int) -> str:
    """The run folder of trial ``number`` in the study folder."""
    return f"trial-{number:04d}"


def _mark_pruned(run_dir: Path, reason: str, epochs: int) -> None:
    """A pruned trial's folder: status "pruned", and no weights (the checkpoint and best epoch go)."""
    if not is_run_dir(run_dir):
        return
    write_status(run_dir, "pruned", reason=reason, epochs_done=epochs, finished=now())
    remove_resume_files(run_dir)


def run_trials(search: Search, on_trial=None, cbs=(), stats: dict | None = None) -> int:
    """Run trials in this process until the study holds ``n_trials`` finished ones (complete or
    pruned), counting those other workers run, or until the deadline; ``on_trial(report)`` after each.
    Returns how many this process ran. Ctrl-C ends the current trial (failed, "interrupted") and
    raises KeyboardInterrupt."""
    study = load_study(search)
    cache = StatsCache(stats)
    cuda = _on_gpu()
    ran = failures_in_a_row = 0
    with worker_lock(search.folder) as (token, lock):
        objective = Objective(search, (token, lock), cache, cbs)
        while True:
            fail_dead_workers(study, search.folder)
            finished = len(study.get_trials(deepcopy=False, states=FINISHED))
            if finished >= search.n_trials or (search.deadline is not None and time.time() >= search.deadline):
                break
            if finished + _live_running(study, search.folder) >= search.n_trials:
                time.sleep(POLL_SECONDS)  # the last trials are running elsewhere; one may yet fail
                continue
            # a Learner's reference cycles hold its model until a collection, which on a GPU must come
            # before the next trial's model; on the CPU a full collection costs more than it frees
            study.optimize(objective, n_trials=1, catch=(TrialFailed,), gc_after_trial=cuda)
            trial = _my_last_trial(study, token)
            ran += 1
            failures_in_a_row = failures_in_a_row + 1 if trial is not None and trial.state == TrialState.FAIL else 0
            if on_trial is not None and trial is not None:
                on_trial(trial_report(study, trial, search.n_trials))
            if failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
                raise HPAError(f"{failures_in_a_row} trials in a row failed, the last one (trial {trial.number}) "
                               f"with: {trial_row(trial)['reason'] or '?'}")
    return ran


def _my_last_trial(study: optuna.Study, token: str):
    mine = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("worker") == token]
    return mine[-1] if mine else None


# --- what the trials show ------------------------------------------------------------------------

def _text(value, limit: int = 300) -> str | None:
    return " ".join(value.split())[:limit] if isinstance(value, str) else None


def _num(value):
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
    return {"number": trial.number, "state": STATE_WORDS.get(trial.state, trial.state.name.lower()), "value": _num(value),
            "epochs_run": _num(attrs.get("epochs")), "seconds": _num(attrs.get("seconds")),
            "epoch_seconds": _num(attrs.get("epoch_seconds")), "run": _text(attrs.get("run_dir"), 100),
            "host": match["host"] if match else None, "worker": token if match else None,
            "reason": _text(attrs.get("reason")),
            "f1_macro": _num(attrs.get("f1_macro")), "f1_macro_tuned_oos": _num(attrs.get("f1_macro_tuned_oos")),
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


# --- several workers -------------------------------------------------------------------------------

def _worker_env(search: Search, k: int) -> dict:
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])  # the workers run this very package
    env["PYTHONPATH"] = os.pathsep.join([package_root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env[WORKER_ENV] = str(k)
    if search.storage is not None:
        env[STORAGE_ENV] = search.storage  # the password stays out of files
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    env.setdefault("OMP_NUM_THREADS", str(max(1, cores // search.jobs)))  # J workers share the cores
    gpus = _gpus()
    if len(gpus) > 1:
        env["CUDA_VISIBLE_DEVICES"] = gpus[k % len(gpus)]
    return env


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _gpus() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def worker_log(folder: Path, k: int) -> Path:
    return folder / WORKERS / f"worker-{k}.log"


def run_workers(search: Search, on_trial=None) -> None:
    """``search.jobs`` worker processes on this machine, each running trials of the study; this
    process reports the trials they finish (``on_trial``) until all of them have ended. Ctrl-C or
    SIGTERM reaches each worker once: it ends its current trial and stops."""
    (search.folder / WORKERS).mkdir(parents=True, exist_ok=True)
    study = load_study(search)
    seen = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
    procs = []
    for k in range(search.jobs):
        with open(worker_log(search.folder, k), "ab") as log:
            # a session of its own: Ctrl-C in the terminal reaches this process, which passes it on once
            procs.append(subprocess.Popen([sys.executable, "-m", "hpa_fastai.search.worker", str(search.folder)],
                                          env=_worker_env(search, k), stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True))
    stops = []

    def stop(signum, frame):
        stops.append(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    forwarded = 0
    try:
        while any(p.poll() is None for p in procs):
            while forwarded < len(stops):
                forwarded += 1
                for p in procs:
                    if p.poll() is None:
                        p.send_signal(signal.SIGINT)
            _report_new(study, seen, search, on_trial)
            time.sleep(POLL_SECONDS / 2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    _report_new(study, seen, search, on_trial)
    for k, p in enumerate(procs):
        if p.returncode != 0 and not stops:
            logger.warning(f"worker {k} ended with exit code {p.returncode}: {_last_line(worker_log(search.folder, k))} "
                           f"(log: {worker_log(search.folder, k)})")
    fail_dead_workers(study, search.folder)
    if stops:
        raise KeyboardInterrupt


def _report_new(study: optuna.Study, seen: set, search: Search, on_trial) -> None:
    for trial in study.get_trials(deepcopy=False):
        if trial.state.is_finished() and trial.number not in seen:
            seen.add(trial.number)
            write_trials(search.folder, study)
            if on_trial is not None:
                on_trial(trial_report(study, trial, search.n_trials))


def _last_line(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 4096))
            lines = f.read().decode("utf-8", "replace").strip().splitlines()
    except OSError:
        return "-"
    return " ".join(lines[-1].split())[:300] if lines else "-"


# --- the winner's curse -------------------------------------------------------------------------------

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
            runs.append({"seed": seed, "run": name, "value": None, "status": "failed", "reason": _one_line(e)})
            logger.warning(f"the confirmation run with seed {seed} failed: {_one_line(e)}")
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


# --- the door ------------------------------------------------------------------------------------------

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
        if deadline is not None and not (_num(deadline) is not None and deadline > 0):
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
