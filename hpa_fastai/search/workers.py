"""The workers of a search: the lock a worker holds while it lives (how a killed worker is told
from a live one), failing the trials of workers that are gone, and ``--jobs``: worker processes on
this machine, each with its share of the cores and its own GPU, whose finished trials this process
reports.

Each worker holds a lock file in the study's ``workers/`` folder for as long as it lives and
records it in its trials; a running trial whose worker's lock is free belongs to a worker that was
killed (the operating system drops the lock with the process, kill -9 included), and the next
worker or ``tune`` on that machine marks it failed. Trials of other machines in a PostgreSQL study
are failed by Optuna's heartbeat check instead.
"""
from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
import logging

import optuna
from optuna.trial import TrialState

from ..atomic import exclusive_lock, lock_is_free
from ..errors import HPAError
from ..runs.files import read_history, read_status
from ..runs.folder import WORKERS, is_run_dir, run_lock, write_status
from .study import Search, load_study
from .trials import TOKEN, host_name, trial_name, trial_report, write_trials

logger = logging.getLogger(__name__)

POLL_SECONDS = 1.0

# a running trial that never recorded its worker (killed between Optuna's ask and the first attribute,
# a few milliseconds) is given up after this long
UNCLAIMED_SECONDS = 600

WORKER_ENV, STORAGE_ENV = "HPA_TUNE_WORKER", "HPA_TUNE_STORAGE"


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


def live_running(study: optuna.Study, folder: Path) -> int:
    """Running trials that may still finish: those whose worker is alive or cannot be checked from
    here and still sends heartbeats. A trial of another machine on a journal file, which cannot be
    checked, is not waited for."""
    heartbeat = getattr(study._storage, "get_heartbeat_interval", lambda: None)() is not None
    count = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        alive = _worker_alive(folder, trial)
        count += bool(alive) or (alive is None and heartbeat)
    return count


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


def on_gpu() -> bool:
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
