"""Running trials in a worker: each trial draws its configuration, trains it through the training
door with the pruning callback, and returns its objective; a failing trial is recorded with its
reason and the study goes on. The channels' statistics are measured once per worker, not per trial.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import optuna
import pandas as pd
from optuna.trial import TrialState

from ..config import TrainConfig
from ..errors import HPAError
from ..runs.folder import is_run_dir, now, remove_resume_files, write_status
from ..training import RunResult, prepare, train
from .callback import OptunaPruning
from .space import trial_config
from .study import Search, epoch_metric, load_study, make_sampler, run_value, trial_seed
from .trials import FINISHED, trial_name, trial_report, trial_row
from .workers import POLL_SECONDS, fail_dead_workers, live_running, on_gpu, worker_lock

logger = logging.getLogger(__name__)

MAX_FAILURES_IN_A_ROW = 10  # a set-up where every trial fails would otherwise retry forever


class TrialFailed(Exception):
    """A trial that failed (its reason is recorded with the trial); the study goes on."""


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


def one_line(e: BaseException) -> str:
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
            reason = one_line(e)
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
    cuda = on_gpu()
    ran = failures_in_a_row = 0
    with worker_lock(search.folder) as (token, lock):
        objective = Objective(search, (token, lock), cache, cbs)
        while True:
            fail_dead_workers(study, search.folder)
            finished = len(study.get_trials(deepcopy=False, states=FINISHED))
            if finished >= search.n_trials or (search.deadline is not None and time.time() >= search.deadline):
                break
            if finished + live_running(study, search.folder) >= search.n_trials:
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
