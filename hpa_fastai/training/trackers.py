"""Experiment trackers for ``--log``, and the fastai callbacks a user adds with ``--callback``.

TensorBoard is fastai's ``TensorBoardCallback``; Weights & Biases is fastai's ``WandbCallback``
(losses, learning rates and metrics per batch and epoch) in a W&B run that ``WandbRun`` opens;
MLflow has no fastai callback (fastai ships none, and MLflow 3 dropped its fastai flavour), so
``MLflowRun`` is a small one. The W&B and MLflow runs get the run's config, the lr_find plot, every
epoch's row of history.csv and, when the run ends, its final scores and files (config, metrics,
per-class table and plot, curves, history, model.json); ``reporting.trackers`` adds report.html
once the command has written it. Their ids are kept in the run folder's ``trackers.json``, so
``--resume`` continues the same tracker run.

Where they record comes from the trackers' own settings: ``$MLFLOW_TRACKING_URI`` (else a SQLite
store beside the run folders, ``mlflow_tracking_uri``), ``$WANDB_PROJECT``, ``$WANDB_MODE``
(``offline`` writes into the run folder's ``wandb/`` for a later ``wandb sync``). A tracker that
fails while the run trains is reported once and left out; it never stops the training.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import os
import time
from pathlib import Path

from fastai.callback.core import Callback
from fastai.learner import Recorder

from ..atomic import write_json
from ..config import trackers
from ..errors import HPAError
from ..runs.files import read_json, read_tracker_ids
from ..runs.folder import (CONFIG, CURVES, HISTORY, LR_FIND_PLOT, METRICS, MLFLOW_ARTIFACTS, MLFLOW_DB, MODEL_JSON,
                           PER_CLASS, PER_CLASS_PLOT, TENSORBOARD, TRACKERS, WANDB)

logger = logging.getLogger(__name__)

PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}  # module to import, per tracker
FINAL_FILES = (CONFIG, METRICS, PER_CLASS, PER_CLASS_PLOT, CURVES, HISTORY, LR_FIND_PLOT, MODEL_JSON)
EXPERIMENT = "hpa_fastai"  # MLflow experiment and W&B project unless the environment names one


def check_trackers(log) -> None:
    """Each tracker ``--log`` names is installed (one error line saying what to install)."""
    for name in trackers(log):
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise HPAError(f"--log {name} needs the {name} package: pip install 'hpa_fastai[{name}]'")


def mlflow_tracking_uri(out) -> str:
    """``$MLFLOW_TRACKING_URI``, or a SQLite store in ``out`` (MLflow 3's local store: its plain-file
    store is deprecated); view it with ``mlflow ui --backend-store-uri <that URI>``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(Path(out).resolve() / MLFLOW_DB).as_posix()}"


def mlflow_client(out):
    """An MLflow client of the store ``mlflow_tracking_uri`` names, and the experiment to record in."""
    from mlflow.tracking import MlflowClient

    uri = mlflow_tracking_uri(out)
    client = MlflowClient(tracking_uri=uri)
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return client, experiment.experiment_id
    # the local store keeps its artifacts beside it; a server's own setting decides otherwise
    location = None if "MLFLOW_TRACKING_URI" in os.environ else (Path(out).resolve() / MLFLOW_ARTIFACTS).as_uri()
    return client, client.create_experiment(name, artifact_location=location)


def _numbers(row: dict) -> dict:
    return {k: float(v) for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _save_id(run_dir: Path, name: str, run_id: str) -> None:
    write_json(run_dir / TRACKERS, {**read_tracker_ids(run_dir), name: run_id})


class _TrackerRun(Callback):
    """Opens the tracker's run at the first fit of a training run, logs each trained epoch's row of
    the history, and closes the run in ``end`` (called by the training door when the run ends)."""

    order = Recorder.order + 2  # after the history has its row of the epoch
    tracker = ""  # fastai names a callback by .name on the Learner: not that

    def __init__(self, run_dir: Path, out: Path, resume_id: str | None = None):
        self.run_dir, self.out, self.resume_id = Path(run_dir), Path(out), resume_id
        self.started, self.failed, self.logged_rows = False, False, None

    def _guard(self, what, *args):
        """Run a tracker call; a failure is logged once and switches the tracker off for this run."""
        if self.failed:
            return None
        try:
            return what(*args)
        except Exception as e:  # the tracker's own errors (a server away, a full disk): training goes on
            self.failed = True
            logger.warning(f"--log {self.tracker}: {type(e).__name__}: {e}; this run goes on without it")
            return None

    def before_fit(self):
        if not self.started and not hasattr(self.learn, "lr_finder"):
            self.started = True
            self._guard(self._start, read_json(self.run_dir / CONFIG))

    def before_train(self):
        # the first epoch that trains: a resumed run's history is back by now (the checkpoint puts it
        # back when the fit starts), and its earlier epochs are in the tracker already
        if self.started and self.logged_rows is None:
            self.logged_rows = len(self.learn.run_history.rows)

    def after_epoch(self):
        rows = getattr(getattr(self.learn, "run_history", None), "rows", [])
        if self.started and self.logged_rows is not None and len(rows) > self.logged_rows:
            for row in rows[self.logged_rows:]:
                self._guard(self._log_epoch, row)
            self.logged_rows = len(rows)

    def end(self, status: str, metrics: dict | None = None) -> None:
        """The run ended: its final scores and files, and the tracker run closed with ``status``."""
        if self.started:
            self._guard(self._end, status, metrics or {})

    def _start(self, config: dict): raise NotImplementedError
    def _log_epoch(self, row: dict): raise NotImplementedError
    def _end(self, status: str, metrics: dict): raise NotImplementedError


class MLflowRun(_TrackerRun):
    """An MLflow run per training run: the config as parameters, every epoch's losses, metrics,
    learning rate and seconds (step: the epoch), the final scores, and the run's files as artifacts."""

    tracker = "mlflow"

    def _start(self, config: dict):
        self.client, experiment = mlflow_client(self.out)
        if self.resume_id is not None:
            self.run_id = self.resume_id
            self.client.update_run(self.run_id, status="RUNNING")
            return
        run = self.client.create_run(experiment, run_name=self.run_dir.name,
                                     tags={"hpa_fastai.run_dir": str(self.run_dir.resolve())})
        self.run_id = run.info.run_id
        _save_id(self.run_dir, self.tracker, self.run_id)
        from mlflow.entities import Param

        # MLflow caps a parameter's value at 6000 characters
        params = [Param(k, str(v)[:6000]) for k, v in config.items() if k not in ("mean", "std")]
        for start in range(0, len(params), 100):  # log_batch takes at most 100 parameters
            self.client.log_batch(self.run_id, params=params[start:start + 100])
        if (self.run_dir / LR_FIND_PLOT).is_file():
            self.client.log_artifact(self.run_id, str(self.run_dir / LR_FIND_PLOT))

    def _log_epoch(self, row: dict):
        from mlflow.entities import Metric

        stamp, step = int(time.time() * 1000), int(row["epoch"])
        values = {k: v for k, v in _numbers(row).items() if k != "epoch"}
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, stamp, step) for k, v in values.items()])

    def _end(self, status: str, metrics: dict):
        from mlflow.entities import Metric

        stamp, step = int(time.time() * 1000), int(metrics.get("epochs_run", 0) or 0)
        finals = [Metric(f"final/{k}", v, stamp, step) for k, v in _numbers(metrics).items()]
        if finals:
            self.client.log_batch(self.run_id, metrics=finals)
        for name in FINAL_FILES:
            if (self.run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(self.run_dir / name))
        self.client.set_terminated(self.run_id, {"finished": "FINISHED", "stopped early": "FINISHED",
                                                 "interrupted": "KILLED"}.get(status, "FAILED"))


def wandb_init(run_dir: Path, run_id: str | None = None, config: dict | None = None):
    """A W&B run for ``run_dir``, its files under the run folder (``$WANDB_PROJECT``, else
    hpa_fastai); ``run_id`` continues one (W&B's resume)."""
    import wandb

    folder = run_dir / WANDB
    folder.mkdir(exist_ok=True)
    return wandb.init(project=os.environ.get("WANDB_PROJECT") or EXPERIMENT, name=run_dir.name, dir=str(folder),
                      id=run_id, resume="allow" if run_id else None, config=config, reinit="finish_previous")


class WandbRun(_TrackerRun):
    """A W&B run per training run for fastai's ``WandbCallback`` (added beside it), with the config,
    the lr_find plot, the final scores in its summary and the run's files."""

    tracker = "wandb"
    order = -5  # wandb.init before WandbCallback's before_fit, which needs the run

    def _start(self, config: dict):
        config = {k: v for k, v in config.items() if k not in ("mean", "std")}
        self.session = wandb_init(self.run_dir, self.resume_id, config)
        if self.resume_id is None:
            _save_id(self.run_dir, self.tracker, self.session.id)
        if (self.run_dir / LR_FIND_PLOT).is_file():
            import wandb

            self.session.log({"lr_find": wandb.Image(str(self.run_dir / LR_FIND_PLOT))}, commit=False)

    def _log_epoch(self, row: dict):
        pass  # fastai's WandbCallback logs each epoch's metrics and each batch's loss

    def _end(self, status: str, metrics: dict):
        self.session.summary.update({f"final/{k}": v for k, v in _numbers(metrics).items()})
        self.session.summary["status"] = status
        for name in FINAL_FILES:
            if (self.run_dir / name).is_file():
                self.session.save(str(self.run_dir / name), base_path=str(self.run_dir), policy="now")
        self.session.finish(exit_code=0 if status in ("finished", "stopped early") else 1)


def wandb_metrics_callback():
    """fastai's ``WandbCallback`` (a batch's loss and learning rates, an epoch's metrics) without the
    config it gathers when a fit starts: fastai 2.8.12's ``gather_args`` hands each callback's
    arguments to fastcore 2.2's ``init_args``, which fails on a plain number (``vars(0)``), and the
    run's own config is in the W&B run already (``WandbRun``). Its ``before_fit`` otherwise does what
    fastai's does with ``log=None``, ``log_preds=False`` and ``log_dataset=False``."""
    import wandb
    from fastai.callback.wandb import WandbCallback
    from fastai.torch_core import rank_distrib

    class WandbMetrics(WandbCallback):
        def before_fit(self):
            self._wandb_step = wandb.run.step - 1
            self._wandb_epoch = math.ceil(wandb.run.summary["epoch"]) if wandb.run.step else 0
            self.run = not hasattr(self.learn, "lr_finder") and rank_distrib() == 0

    return WandbMetrics


def tracker_callbacks(log, run_dir: Path, out, resumed: bool) -> tuple[list, list]:
    """(every callback ``--log`` adds to the fits, the tracker runs among them that the door ends)."""
    ids = read_tracker_ids(run_dir) if resumed else {}
    cbs, runs = [], []
    for name in trackers(log):
        if name == "tensorboard":
            from fastai.callback.tensorboard import TensorBoardCallback

            cbs.append(TensorBoardCallback(log_dir=run_dir / TENSORBOARD, trace_model=False))
        elif name == "mlflow":
            runs.append(MLflowRun(run_dir, out, ids.get("mlflow")))
            cbs.append(runs[-1])
        elif name == "wandb":
            runs.append(WandbRun(run_dir, out, ids.get("wandb")))
            # no prediction samples: they would predict a batch of the validation set once more
            cbs += [runs[-1], wandb_metrics_callback()(log_preds=False)]
    return cbs, runs


def callback_list(specs) -> list[str]:
    """``--callback``'s value as a list (a config made in Python may give one str)."""
    return [specs] if isinstance(specs, str) else list(specs or [])


def user_callbacks(specs) -> list:
    """The callbacks ``--callback`` names (``module:Class`` or ``path/to/file.py:Class``), each created
    without arguments. Importing them runs their code: the flag is the user's explicit word."""
    found = []
    for spec in callback_list(specs):
        source, _, class_name = spec.rpartition(":")
        try:
            if source.endswith(".py"):
                path = Path(source)
                if not path.is_file():
                    raise HPAError(f"--callback {spec}: {path} not found")
                module_spec = importlib.util.spec_from_file_location(f"hpa_user_callback_{path.stem}", path)
                module = importlib.util.module_from_spec(module_spec)
                module_spec.loader.exec_module(module)
            else:
                module = importlib.import_module(source)
        except HPAError:
            raise
        except Exception as e:  # the user's module raised while importing: name it, and what it raised
            raise HPAError(f"--callback {spec}: importing {source} failed ({type(e).__name__}: {e})") from None
        cls = getattr(module, class_name, None)
        if not (isinstance(cls, type) and issubclass(cls, Callback)):
            raise HPAError(f"--callback {spec}: {source} has no fastai Callback class named {class_name}")
        try:
            found.append(cls())
        except Exception as e:
            raise HPAError(f"--callback {spec}: {class_name}() failed ({type(e).__name__}: {e}); it is created "
                           "without arguments") from None
    return found
