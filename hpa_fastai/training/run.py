"""One training run, start to finish: check the config and the data, open the run folder (or the
one ``--resume`` continues), build the Learner, find the learning rate, fit the one-cycle phases
with checkpoints, then score the best epoch and export it.

Everything a run produces goes into its run folder (see ``rundir``). The report, the TensorBoard
summary and the ``latest`` link are added by ``workflows.train``, which is what the CLI runs.
"""
from __future__ import annotations

import dataclasses
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .. import config as config_checks
from .. import plots
from ..atomic import write_json
from ..config import TrainConfig
from ..console import console, log
from ..data.training_set import TrainingSet, load_training_set
from ..device import training_precision
from ..errors import HPAError
from ..models import check_arch
from ..rundir import CHECKPOINT, CONFIG, CURVES, TENSORBOARD, make_run_dir, now, remove_resume_files, write_status
from . import distributed
from .callbacks import KeepBestModel, NaNGuard, ProgressiveResize, StopOnSignal, WarmupEarlyStopping
from .evaluation import evaluate_valid
from .export import export_model, model_meta
from .learner import build_learner, default_device
from .progress import EpochLogger
from .resume import Checkpoint, read_resume, restore
from .schedule import find_lr, learning_rate, phases


def validate(cfg: TrainConfig) -> None:
    """The config's own constraints, then what the environment must offer: a known architecture,
    the ``--weights`` file, the TensorBoard package for ``--log tensorboard``, a GPU for fp16."""
    config_checks.validate(cfg)
    training_precision(cfg.precision, default_device())
    try:
        check_arch(cfg.arch)
    except ValueError as e:
        raise HPAError(f"--arch: {e}") from None
    if cfg.weights is not None and not Path(cfg.weights).is_file():
        raise HPAError(f"--weights {cfg.weights}: file not found")
    if cfg.log == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise HPAError("--log tensorboard needs the tensorboard package: "
                           "pip install 'hpa_fastai[tensorboard]'") from None


def prepare(cfg: TrainConfig, stats: tuple | None = None) -> TrainingSet:
    """Check the flags and the data before any model is built (see ``load_training_set``)."""
    validate(cfg)
    return load_training_set(cfg, stats, cuda=default_device().type == "cuda")


@dataclass
class Resumed:
    """A run continued with ``--resume``: its saved config.json and its checkpoint."""
    config: dict
    checkpoint: dict


@dataclass
class RunResult:
    """A finished run: its folder, its validation metrics (metrics.json plus the tuned thresholds)
    and the status it ended with; None on the ranks other than 0 of a distributed run."""
    run_dir: Path
    metrics: dict
    status: str


def train_run(cfg: TrainConfig, run_name: str | None = None) -> RunResult | None:
    """Train one model as ``cfg`` says (or continue ``cfg.resume``) into ``cfg.out/run_name``
    (default ``cfg.out/<time>-<arch>``)."""
    t_start = time.time()
    ts, run_dir, resumed, device = _start(cfg, run_name)
    main = distributed.is_main()
    console.quiet = not main  # one process speaks for a distributed run
    cfg = ts.cfg
    log(f"{'resuming' if resumed else 'run folder'} {run_dir}")
    log(f"data {ts.data_dir} ({ts.format}, {len(ts.items)} images, {cfg.channels}, {cfg.size}px)")
    if not resumed:
        write_json(run_dir / CONFIG, cfg.to_json())
    write_status(run_dir, "running", started=now())
    try:
        learn, setup = build_learner(ts, run_dir, device=device)
        pretrained = resumed.config["pretrained_used"] if resumed else setup.pretrained
        log(f"model {cfg.arch} ({'ImageNet weights' if pretrained else cfg.weights or 'random init'}), "
            f"{len(learn.dls.train_ds)} train / {len(learn.dls.valid_ds)} valid images, "
            f"device {device.type}, precision {setup.precision}"
            f"{', channels-last' if setup.channels_last else ''}{', compiled' if setup.compiled else ''}")
        lr = learning_rate(cfg, learn, run_dir, resumed.config if resumed else None)
    except BaseException as e:  # --bs too large, --weights that do not fit, a library error: never left "running"
        _mark_stopped(run_dir, e, 0)
        raise
    if not resumed:
        write_json(run_dir / CONFIG, {**cfg.to_json(), "lr_used": lr, "pretrained_used": pretrained,
                                      "precision_used": setup.precision, "mean": ts.mean, "std": ts.std})
    fit = _Fit(learn, cfg, run_dir, lr, pretrained)
    # under several processes a signal reaches each at a different batch; let the launcher handle it
    previous_handlers = _catch_signals(fit.stopper.handle) if distributed.world_size() == 1 else {}
    try:
        with distributed.context(learn, device):
            fit.run(resumed)
    except BaseException as e:
        try:  # the last complete epoch's checkpoint, still being written, is what --resume needs
            fit.checkpoint.wait()
        except Exception as write_error:
            log(f"warning: the last checkpoint could not be written ({write_error})")
        _mark_stopped(run_dir, e, len(fit.logger.rows))
        if isinstance(e, KeyboardInterrupt):
            log(f"interrupted after {len(fit.logger.rows)} complete epoch(s); continue with: "
                f"python run.py --resume {run_dir}")
        raise
    finally:
        _restore_signals(previous_handlers)
        if not main:
            shutil.rmtree(run_dir, ignore_errors=True)
    if not main:
        return None
    return _finish(fit, ts, run_dir, pretrained, setup.precision, t_start)


def _start(cfg: TrainConfig, run_name: str | None):
    """The training set, the run folder, what a resumed run continues, and this process's device.
    Under several processes only rank 0 writes the run folder; the others get a scratch folder."""
    resumed = None
    if cfg.resume:
        run_dir = Path(cfg.resume)
        saved, ckpt = read_resume(run_dir)
        resumed = Resumed(saved, ckpt)
        stats = (saved["mean"], saved["std"]) if "mean" in saved and "std" in saved else None
        ts = prepare(dataclasses.replace(TrainConfig.from_json(run_dir / CONFIG), resume=None), stats)
    else:
        ts = prepare(cfg)
    device = distributed.init(default_device())
    if not distributed.is_main():
        if not resumed:
            distributed.share(None)
        return ts, Path(tempfile.mkdtemp(prefix="hpa-rank-")), resumed, device
    if not resumed:
        run_dir = make_run_dir(ts.cfg.out, ts.cfg.arch, run_name)
        if distributed.world_size() > 1:
            distributed.share(run_dir)
    return ts, run_dir, resumed, device


class _Fit:
    """The one-cycle fits of a run's phases with the callbacks that watch them."""

    def __init__(self, learn, cfg: TrainConfig, run_dir: Path, lr: float, pretrained: bool):
        comp = np.greater if cfg.monitor_higher_is_better else np.less
        self.learn, self.run_dir, self.lr = learn, run_dir, lr
        self.phases = phases(cfg, lr, pretrained)
        self.logger = learn.cbs.filter(lambda c: isinstance(c, EpochLogger))[0]
        self.checkpoint = Checkpoint(run_dir / CHECKPOINT, skip_last=not cfg.keep_checkpoint)
        self.best = KeepBestModel(monitor=cfg.monitor, comp=comp, fname="best", reset_on_fit=False)
        self.nan, self.stopper = NaNGuard(), StopOnSignal()
        self.stopping = WarmupEarlyStopping(monitor=cfg.monitor, comp=comp, patience=cfg.patience)
        self.cbs = [self.stopping, self.best, self.checkpoint, self.nan, self.stopper]
        self.resize, self.small_epochs = None, 0
        if cfg.progressive_size is not None:
            self.small_epochs = cfg.progressive_epochs or cfg.epochs // 2
            self.resize = ProgressiveResize(cfg.progressive_size)
            self.cbs.append(self.resize)
            log(f"progressive resizing: {'the frozen epochs and ' if len(self.phases) > 1 else ''}the first "
                f"{self.small_epochs} epoch(s) train at {cfg.progressive_size}px, the others at {cfg.size}px; "
                f"validation at {cfg.size}px")
        if cfg.log == "tensorboard":
            from fastai.callback.tensorboard import TensorBoardCallback
            self.cbs.append(TensorBoardCallback(log_dir=run_dir / TENSORBOARD, trace_model=False))

    def run(self, resumed: Resumed | None) -> None:
        names = [name for name, _, _ in self.phases]
        first_phase = names.index(resumed.checkpoint["phase"]) if resumed else 0
        for i, (phase, n_epochs, phase_lr) in enumerate(self.phases[first_phase:], start=first_phase):
            self.logger.phase = self.checkpoint.phase = phase
            if self.resize is not None:  # one one-cycle schedule across both sizes
                small = n_epochs if phase == "frozen" else self.small_epochs
                self.resize.small_epochs = self.stopping.min_epochs = small
            self.checkpoint.final_phase = i == len(self.phases) - 1
            if phase == "frozen":
                self.learn.freeze()
            elif phase == "unfrozen":
                self.learn.unfreeze()
            start_epoch = 0
            if resumed and i == first_phase:
                start_epoch = restore(self.learn, resumed.checkpoint, self.checkpoint)
                log(f"continuing phase {phase} after epoch {start_epoch} of {n_epochs}")
            self.learn.fit_one_cycle(n_epochs, phase_lr, cbs=self.cbs, start_epoch=start_epoch)
            if self.stopper.requested:
                raise KeyboardInterrupt
            if self.nan.nan is not None:
                bad = self.nan.nan
                raise HPAError(f"training stopped: the loss became {bad['loss']} at epoch {len(self.logger.rows) + 1}, "
                               f"batch {bad['batch'] + 1}; nothing was exported. Last good checkpoint: "
                               f"{self.run_dir / CHECKPOINT}. Lower --lr (now {self.lr:.3g}) or check the data")


def _finish(fit: _Fit, ts: TrainingSet, run_dir: Path, pretrained: bool, precision: str, t_start: float) -> RunResult:
    """Score the best epoch, export it, mark the run finished, drop what only --resume needs."""
    learn, cfg = fit.learn, ts.cfg
    history = pd.DataFrame(fit.logger.rows)
    plots.curves_plot(run_dir / CURVES, history)
    valid_preds = fit.best.best_preds if distributed.world_size() == 1 else None
    if valid_preds is None or len(valid_preds[0]) != len(learn.dls.valid_ds):
        # the best epoch came before a --resume, or each process saw a share of the validation set
        with distributed.single_process():
            valid_preds = learn.get_preds(dl=learn.dls.valid)
    result = evaluate_valid(ts, learn.dls.valid.items, valid_preds, history, run_dir, pretrained, t_start)
    learn.remove_cb(fit.logger)
    export_model(learn, model_meta(ts, result["thresholds"], precision), run_dir)
    status = "stopped early" if result["stopped_early"] else "finished"
    write_status(run_dir, status, finished=now(), seconds=round(time.time() - t_start, 1))
    if cfg.keep_checkpoint:
        fit.best.write()
    else:
        remove_resume_files(run_dir)
    return RunResult(run_dir, result, status)


def _mark_stopped(run_dir: Path, e: BaseException, epochs_done: int) -> None:
    """status.json for a run that did not finish: never left saying "running"."""
    if isinstance(e, KeyboardInterrupt):
        write_status(run_dir, "interrupted", epochs_done=epochs_done)
    else:
        reason = str(e) if isinstance(e, HPAError) else f"{type(e).__name__}: {e}"[:500]
        write_status(run_dir, "failed", reason=reason, epochs_done=epochs_done)


def _catch_signals(handler) -> dict:
    """Route Ctrl-C and SIGTERM to ``handler`` while training (main thread only: signal's rule)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}


def _restore_signals(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def lr_find_run(cfg: TrainConfig) -> Path:
    """Only the learning-rate finder: its plot, table and suggestions in a run folder of its own."""
    ts = prepare(cfg)
    run_dir = make_run_dir(ts.cfg.out, f"lr_find-{ts.cfg.arch}")
    learn, _ = build_learner(ts, run_dir)
    write_json(run_dir / CONFIG, ts.cfg.to_json())
    from .schedule import auto_lr_find_iters

    find_lr(learn, run_dir, ts.cfg.lr_find_iters or auto_lr_find_iters(learn))
    return run_dir
