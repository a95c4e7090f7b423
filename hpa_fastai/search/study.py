"""The study of a hyperparameter search: the search's settings (``Search``), where the study lives
(Optuna's journal file in the study folder, or a PostgreSQL database), the sampler and pruner, and
opening a study, which refuses one that searches another space or objective.

Storage: by default the study is Optuna's journal file in the study folder, which needs no server and
which several worker processes append to under a file lock (SQLite, the other file storage, is
not made for concurrent writers). ``--storage postgresql://...`` keeps it in a database that ``tune``
commands on any number of machines share; their workers send Optuna's heartbeats there.
"""
from __future__ import annotations

import json
import math
import secrets
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import optuna
import pandas as pd

from ..config import OBJECTIVES, TrainConfig
from ..errors import HPAError
from ..runs.folder import STUDY_JOURNAL
from .space import Space

# PostgreSQL studies: a worker's heartbeat every 30 s; a trial silent for 2 minutes is failed
HEARTBEAT_SECONDS, GRACE_SECONDS = 30, 120

SCHEMA_TRIES = 5


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
