"""The training door: ``train(cfg)`` runs one training start to finish and returns its result, for the
command line, cross-validation, a hyperparameter search and scripts alike.

It checks the config and the data, opens the run folder (or the one ``--resume`` continues, under
the folder's lock), builds the Learner, finds the learning rate, fits the one-cycle phases with
checkpoints, scores the best epoch and exports it. Everything a run produces goes into its run folder
(``runs.folder`` names the files). It prints nothing: messages go to ``logging``, each epoch to the
run's history, which extra fastai callbacks (``cbs``) can watch; the command line shows both.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .. import config as config_checks
from .. import plots
from ..atomic import write_csv, write_json
from ..config import TrainConfig
from ..data.pipeline import close_workers
from ..data.training_set import TrainingSet, load_training_set
from ..device import training_precision
from ..errors import HPAError
from ..evaluation import predictions_table, score, write_per_class
from ..losses import set_thresholds
from ..modelfile import export_learner, model_meta
from ..models import check_arch, min_size, size_problem
from ..runs.folder import (CHECKPOINT, CONFIG, CURVES, METRICS, VALID_PREDICTIONS, make_run_dir, now, point_latest,
                           remove_resume_files, run_lock, write_status)
from ..transfer import weights_form
from . import distributed
from .callbacks import (KeepBestModel, NaNGuard, ProgressiveResize, RunPhase, StopOnSignal, WarmupEarlyStopping,
                        best_epoch_index, trick_callbacks, warmup_length)
from .learner import default_device, run_learner
from .resume import Checkpoint, check_resumed_values, read_checkpoint, read_resume_config, restore
from .schedule import auto_lr_find_iters, find_lr, fit_one_cycle, learning_rate, phases
from .trackers import callback_list, check_trackers, tracker_callbacks, user_callbacks

logger = logging.getLogger(__name__)


def validate(cfg: TrainConfig) -> TrainConfig:
    """The config's own constraints, then what the environment must offer: a known architecture,
    the ``--weights`` and ``--duplicates`` files, the package of each ``--log`` tracker, a GPU for fp16.
    Returns ``cfg`` with the architecture under its registry name (a bare timm name gets ``timm:``)."""
    config_checks.validate(cfg)
    training_precision(cfg.precision, default_device())
    try:
        arch = check_arch(cfg.arch)
    except ValueError as e:
        raise HPAError(f"--arch: {e}") from None
    if arch != cfg.arch:
        logger.info(f"--arch {cfg.arch}: the timm model {arch}")
        cfg = dataclasses.replace(cfg, arch=arch)
    for flag, size in (("--size", cfg.size), ("--progressive-size", cfg.progressive_size)):
        if size is not None and (problem := size_problem(cfg.arch, size)):
            raise HPAError(f"{flag} {size} {problem}: pass a larger {flag}, or another --arch")
    if cfg.weights is not None:
        weights_form(cfg.weights)  # a missing file, a folder that is no run, a pickle: before anything is built
    if cfg.duplicates is not None and not Path(cfg.duplicates).is_file():
        raise HPAError(f"--duplicates {cfg.duplicates}: file not found")
    check_trackers(cfg.log)
    return cfg


def prepare(cfg: TrainConfig, stats: tuple | None = None) -> TrainingSet:
    """Check the flags and the data before any model is built (see ``load_training_set``)."""
    cfg = validate(cfg)
    ts = load_training_set(cfg, stats, cuda=default_device().type == "cuda")
    size = ts.cfg.size
    if cfg.size is None and (problem := size_problem(cfg.arch, size)):  # the images' own size
        low = min_size(cfg.arch)
        advice = f"pass --size {low} or more to enlarge them" if low and size < low else "pass a --size it takes"
        raise HPAError(f"{ts.data_dir}: the images are {size}x{size} pixels, the automatic --size, which {problem}; "
                       f"{advice}")
    return ts


@dataclass
class Resumed:
    """A run continued with ``--resume``: its saved config.json and its checkpoint."""
    config: dict
    checkpoint: dict


@dataclass
class RunResult:
    """A finished run: its folder, the status it ended with (``finished`` or ``stopped early``), its
    validation metrics (metrics.json's contents), the tuned per-class thresholds, the history and the
    config it trained with (every automatic value resolved, as config.json holds it)."""
    run_dir: Path
    status: str
    metrics: dict
    thresholds: list = field(default_factory=list)
    history: pd.DataFrame = field(default_factory=pd.DataFrame)
    config: TrainConfig | None = None


def train(cfg: TrainConfig, run_name: str | None = None, cbs=(), link_latest: bool = True,
          stats: tuple | None = None) -> RunResult | None:
    """Train one model as ``cfg`` says (or continue ``cfg.resume``) into ``cfg.out/run_name``
    (default ``cfg.out/<time>-<arch>``); ``cbs``: extra fastai callbacks for every fit of the run
    (progress displays, a search's pruning), besides those ``cfg.callback`` names; one that reads
    ``learn.run_history`` in ``after_epoch`` needs an ``order`` above ``RunHistory.order``;
    ``link_latest``: point ``cfg.out/latest`` at the run; ``stats``: the channels' (mean, std) when the
    caller has measured them already on the same data and size (a search's trials), instead of
    measuring them again. Returns None on the processes other than the first of a distributed run."""
    t_start = time.time()
    with _run_folder(cfg, run_name, stats) as (ts, run_dir, resumed, device, own_cbs), \
            _closing_workers() as learners:
        result = _train(ts, run_dir, resumed, device, [*cbs, *own_cbs], t_start, learners)
    if result is not None and link_latest:
        point_latest(run_dir)
    return result


@contextlib.contextmanager
def _run_folder(cfg: TrainConfig, run_name: str | None, stats: tuple | None = None):
    """The training set, the run folder (locked for this process), what a resumed run continues, this
    process's device, and the callbacks of ``--callback`` (imported before a run folder is made).
    Under several processes only rank 0 writes the run folder; the others get a scratch folder,
    removed at the end."""
    with contextlib.ExitStack() as stack:
        resumed = None
        if cfg.resume:
            run_dir = Path(cfg.resume)
            if not run_dir.is_dir():
                raise HPAError(f"--resume {run_dir}: not a run folder (no config.json)")
            stack.enter_context(run_lock(run_dir))  # before anything is read: it may be training elsewhere
            saved = read_resume_config(run_dir)
            run_cfg = dataclasses.replace(TrainConfig.from_dict(saved), resume=None)
            run_cfg = validate(run_cfg)  # what it trains with is checked as flags are, then what else it takes
            check_resumed_values(saved, run_dir / CONFIG)
            resumed = Resumed(saved, read_checkpoint(run_dir))
            stats = (saved["mean"], saved["std"]) if "mean" in saved and "std" in saved else None
            ts = prepare(run_cfg, stats)
        else:
            ts = prepare(cfg, stats)
        # code named in a run folder's config.json is never imported: a resumed run takes --callback anew
        if resumed and ts.cfg.callback and not cfg.callback:
            named = " ".join(callback_list(ts.cfg.callback))
            logger.info(f"note: the run trained with --callback {named}; --resume imports no code named in a run "
                        "folder: pass --callback again to add it")
        own_cbs = user_callbacks(cfg.callback)
        device = distributed.init(default_device())
        if not distributed.is_main():
            if not resumed:
                distributed.share(None)
            scratch = Path(tempfile.mkdtemp(prefix="hpa-rank-"))
            stack.callback(shutil.rmtree, scratch, ignore_errors=True)
            yield ts, scratch, resumed, device, own_cbs
            return
        if not resumed:
            run_dir = make_run_dir(ts.cfg.out, ts.cfg.arch, run_name)
            stack.enter_context(run_lock(run_dir))
            if distributed.world_size() > 1:
                distributed.share(run_dir)
        yield ts, run_dir, resumed, device, own_cbs


@contextlib.contextmanager
def _closing_workers():
    """A list for the Learners a run builds, whose DataLoader worker processes (kept from epoch to
    epoch) end with the run, however it ends: a loop of runs (cross-validation, a search) would
    otherwise keep every finished run's workers until garbage collection finds them."""
    learners = []
    try:
        yield learners
    finally:
        for learn in learners:
            close_workers(learn.dls)


def _train(ts: TrainingSet, run_dir: Path, resumed: Resumed | None, device, cbs: list, t_start: float,
           learners: list):
    cfg = ts.cfg
    logger.info(f"{'resuming' if resumed else 'run folder'} {run_dir}")
    logger.info(f"data {ts.data_dir} ({ts.format}, {len(ts.items)} images, {cfg.channels}, {cfg.size}px)")
    if not resumed:
        write_json(run_dir / CONFIG, cfg.to_json())
    write_status(run_dir, "running", started=now())
    try:
        learn, setup = run_learner(ts, run_dir, device)
        learners.append(learn)
        pretrained = resumed.config["pretrained_used"] if resumed else setup.pretrained
        start = setup.start.describe()
        logger.info(f"model {cfg.arch} ({start}), "
                    f"{len(learn.dls.train_ds)} train / {len(learn.dls.valid_ds)} valid images, "
                    f"device {device.type}, precision {setup.precision}"
                    f"{', channels-last' if setup.channels_last else ''}{', compiled' if setup.compiled else ''}")
        if pretrained and cfg.freeze_epochs > 0:
            learn.freeze()  # lr_find on the model as its first phase trains it, as with fastai's vision_learner
        lr = learning_rate(cfg, learn, run_dir, resumed.config if resumed else None)
    except BaseException as e:  # --bs too large, --weights that do not fit, a library error: never left "running"
        _mark_stopped(run_dir, e, 0)
        raise
    if not resumed:
        write_json(run_dir / CONFIG, {**cfg.to_json(), "lr_used": lr, "pretrained_used": pretrained,
                                      "start_weights": start, "precision_used": setup.precision, "mean": ts.mean,
                                      "std": ts.std})
    fit = _Fit(learn, cfg, run_dir, lr, pretrained, cbs, resumed)
    # under several processes a signal reaches each at a different batch; let the launcher handle it
    previous_handlers = _catch_signals(fit.stopper.handle) if distributed.world_size() == 1 else {}
    try:
        with distributed.context(learn, device):
            fit.run()
    except BaseException as e:
        try:  # the last complete epoch's checkpoint, still being written, is what --resume needs
            fit.checkpoint.wait()
        except Exception as write_error:
            logger.warning(f"the last checkpoint could not be written ({write_error})")
        _mark_stopped(run_dir, e, len(fit.history.rows))
        fit.end_trackers("interrupted" if isinstance(e, KeyboardInterrupt) else "failed")
        if isinstance(e, KeyboardInterrupt):
            logger.info(f"interrupted after {len(fit.history.rows)} complete epoch(s); continue with: "
                        f"hpa-fastai --resume {run_dir}")
        raise
    finally:
        _restore_signals(previous_handlers)
    if not distributed.is_main():
        return None
    try:
        return _finish(fit, ts, run_dir, pretrained, setup.precision, t_start)
    except BaseException as e:  # exporting on a full disk: the run is not finished
        _mark_stopped(run_dir, e, len(fit.history.rows))
        fit.end_trackers("failed")
        raise


class _Fit:
    """The one-cycle fits of a run's phases with the callbacks that watch them."""

    def __init__(self, learn, cfg: TrainConfig, run_dir: Path, lr: float, pretrained: bool, extra_cbs: list,
                 resumed: Resumed | None):
        comp = np.greater if cfg.monitor_higher_is_better else np.less
        self.learn, self.cfg, self.run_dir, self.lr, self.resumed = learn, cfg, run_dir, lr, resumed
        self.phases = phases(cfg, lr, pretrained)
        self.history = learn.run_history
        self.checkpoint = Checkpoint(run_dir / CHECKPOINT, skip_last=not cfg.keep_checkpoint,
                                     restore=resumed.checkpoint if resumed else None)
        self.best = KeepBestModel(monitor=cfg.monitor, comp=comp, fname="best", reset_on_fit=False)
        self.nan, self.stopper = NaNGuard(), StopOnSignal()
        self.cbs = [WarmupEarlyStopping(monitor=cfg.monitor, comp=comp, patience=cfg.patience), self.best,
                    self.checkpoint, self.nan, self.stopper, *trick_callbacks(cfg), *extra_cbs]
        self.small_epochs = 0
        if cfg.progressive_size is not None:
            self.small_epochs = cfg.progressive_epochs or cfg.epochs // 2
            self.cbs.append(ProgressiveResize(cfg.progressive_size))
            logger.info(f"progressive resizing: {'the frozen epochs and ' if len(self.phases) > 1 else ''}the first "
                        f"{self.small_epochs} epoch(s) train at {cfg.progressive_size}px, the others at {cfg.size}px; "
                        f"validation at {cfg.size}px")
        # the trackers record what rank 0 sees: the other processes train into a scratch folder
        tracker_cbs, self.trackers = tracker_callbacks(cfg.log, run_dir, run_dir.parent, resumed is not None) \
            if distributed.is_main() else ([], [])
        self.cbs += tracker_cbs

    def phase_small_epochs(self, spec) -> int:
        """Epochs of the phase ``spec`` at progressive resizing's smaller size (all of a frozen phase)."""
        if not self.small_epochs:
            return 0
        return spec.epochs if spec.name == "frozen" else self.small_epochs

    def best_epoch_index(self, history: pd.DataFrame) -> int:
        """The history row whose weights ``KeepBestModel`` kept (see ``callbacks.best_epoch_index``)."""
        warmup = {spec.name: warmup_length(spec.epochs, spec.pct_start, self.phase_small_epochs(spec))
                  for spec in self.phases}
        cfg = self.cfg
        return best_epoch_index(history[cfg.monitor].tolist(), history.groupby("phase").cumcount().tolist(),
                                [warmup[p] for p in history["phase"]], cfg.monitor_higher_is_better)

    def end_trackers(self, status: str, metrics: dict | None = None) -> None:
        for tracker in self.trackers:
            tracker.end(status, metrics)

    def run(self) -> None:
        names = [phase.name for phase in self.phases]
        resumed = self.resumed
        if resumed and resumed.checkpoint["phase"] not in names:
            raise HPAError(f"{self.run_dir / CHECKPOINT}: phase {resumed.checkpoint['phase']!r:.40} is not a phase "
                           f"of this run ({', '.join(names)}); start the run again")
        first_phase = names.index(resumed.checkpoint["phase"]) if resumed else 0
        for i, spec in enumerate(self.phases[first_phase:], start=first_phase):
            phase, n_epochs = spec.name, spec.epochs
            # one one-cycle schedule across both sizes of progressive resizing
            run_phase = RunPhase(phase, final=i == len(self.phases) - 1, small_epochs=self.phase_small_epochs(spec),
                                 pct_start=spec.pct_start)
            if phase == "frozen":
                self.learn.freeze()
            elif phase == "unfrozen":
                self.learn.unfreeze()
            start_epoch = 0
            if resumed and i == first_phase:
                start_epoch = restore(self.learn, resumed.checkpoint)
                if start_epoch > n_epochs:
                    raise HPAError(f"{self.run_dir / CHECKPOINT}: {start_epoch} epochs done in phase {phase}, which "
                                   f"has {n_epochs}; start the run again")
                logger.info(f"continuing phase {phase} after epoch {start_epoch} of {n_epochs}")
            fit_one_cycle(self.learn, n_epochs, spec.lr, cbs=[run_phase, *self.cbs], start_epoch=start_epoch,
                          **spec.one_cycle())
            if self.stopper.requested:
                raise KeyboardInterrupt
            if self.nan.nan is not None:
                bad = self.nan.nan
                raise HPAError(f"training stopped: the loss became {bad['loss']} at epoch {len(self.history.rows) + 1}, "
                               f"batch {bad['batch'] + 1}; nothing was exported. Last good checkpoint: "
                               f"{self.run_dir / CHECKPOINT}. Lower --lr (now {self.lr:.3g}) or check the data")


def _finish(fit: _Fit, ts: TrainingSet, run_dir: Path, pretrained: bool, precision: str, t_start: float) -> RunResult:
    """Score the best epoch, export it, mark the run finished, drop what only --resume needs."""
    learn, cfg = fit.learn, ts.cfg
    history = pd.DataFrame(fit.history.rows)
    plots.curves_plot(run_dir / CURVES, history)
    valid_preds = fit.best.best_preds if distributed.world_size() == 1 else None
    if valid_preds is None or len(valid_preds[0]) != len(learn.dls.valid_ds):
        # the best epoch came before a --resume, or each process saw a share of the validation set
        with distributed.single_process():
            valid_preds = learn.get_preds(dl=learn.dls.valid)
    metrics, thresholds = _score_best_epoch(ts, learn.dls.valid.items, valid_preds, history, fit.best_epoch_index(history),
                                            run_dir, pretrained, t_start)
    set_thresholds(learn.loss_func, thresholds)  # learn.predict and export.pkl decode as predict does
    export_learner(learn, model_meta(ts, thresholds, precision), run_dir)
    status = "stopped early" if metrics["stopped_early"] else "finished"
    write_status(run_dir, status, finished=now(), seconds=round(time.time() - t_start, 1))
    fit.end_trackers(status, metrics)
    if cfg.keep_checkpoint:
        fit.best.write()
    else:
        remove_resume_files(run_dir)
    return RunResult(run_dir, status, metrics, [float(t) for t in thresholds], history, cfg)


def _score_best_epoch(ts: TrainingSet, valid_items: pd.DataFrame, valid_preds, history: pd.DataFrame, best_idx: int,
                      run_dir: Path, pretrained: bool, t_start: float) -> tuple[dict, np.ndarray]:
    """metrics.json, per_class.csv and its plot, valid_predictions.csv: the best epoch's validation
    predictions scored at ``--threshold`` and with per-class thresholds tuned on them (see
    ``evaluation.score``). Returns metrics.json's contents and the tuned thresholds."""
    cfg = ts.cfg
    probs, targs = valid_preds
    probs, targs = probs.float().numpy(), targs.numpy().astype(bool)
    scores = score(probs, targs, ts.names, threshold=cfg.threshold, seed=cfg.seed)
    stopped_early = len(history) < cfg.epochs + (cfg.freeze_epochs if pretrained else 0)
    metrics = {
        "best_epoch": int(history["epoch"].iloc[best_idx]),
        "epochs_run": int(len(history)),
        "stopped_early": bool(stopped_early),
        "monitor": cfg.monitor,
        "valid_images": int(len(targs)),
        **{f"f1_{avg}": scores.at_threshold[avg] for avg in ("macro", "micro", "samples")},
        **{f"f1_{avg}_tuned": scores.tuned[avg] for avg in ("macro", "micro", "samples")},
        **{f"f1_{avg}_tuned_oos": value for avg, value in scores.tuned_oos.items()},
        "threshold": cfg.threshold,
        "seconds": round(time.time() - t_start, 1),
        "per_class": scores.per_class.to_dict("records"),
    }
    write_json(run_dir / METRICS, metrics)
    write_per_class(run_dir, scores.per_class)
    # the report's image grid and cv read these instead of predicting the validation images again
    write_csv(run_dir / VALID_PREDICTIONS, predictions_table(valid_items["id"], valid_items["labels"], probs,
                                                             scores.thresholds, key=valid_items["key"]))
    return metrics, scores.thresholds


def _mark_stopped(run_dir: Path, e: BaseException, epochs_done: int) -> None:
    """status.json for a run that did not finish: never left saying "running". Where even that
    cannot be written (a full disk), the run's own error is what the user sees, with a warning."""
    try:
        if isinstance(e, KeyboardInterrupt):
            write_status(run_dir, "interrupted", epochs_done=epochs_done)
        else:
            reason = str(e) if isinstance(e, HPAError) else f"{type(e).__name__}: {e}"[:500]
            write_status(run_dir, "failed", reason=reason, epochs_done=epochs_done)
    except HPAError as status_error:
        logger.warning(f"the run's status could not be recorded ({status_error})")


def _catch_signals(handler) -> dict:
    """Route Ctrl-C and SIGTERM to ``handler`` while training (main thread only: signal's rule)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}


def _restore_signals(previous: dict) -> None:
    for sig, handler in previous.items():
        # None: a handler set outside Python, which cannot be put back; the default is the nearest
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


@dataclass
class LrFindResult:
    """The learning-rate finder's folder (lr_find.png, lr_find.json) and its suggestions."""
    run_dir: Path
    suggestions: dict


def lr_find(cfg: TrainConfig) -> LrFindResult:
    """Only the learning-rate finder: its plot, table and suggestions in a run folder of its own."""
    ts = prepare(cfg)
    run_dir = make_run_dir(ts.cfg.out, f"lr_find-{ts.cfg.arch}")
    learn, setup = run_learner(ts, run_dir)
    if setup.pretrained and ts.cfg.freeze_epochs > 0:
        learn.freeze()  # as training's first phase sees it
    write_json(run_dir / CONFIG, ts.cfg.to_json())
    try:
        suggestions = find_lr(learn, run_dir, ts.cfg.lr_find_iters or auto_lr_find_iters(learn))
    finally:
        close_workers(learn.dls)
    return LrFindResult(run_dir, suggestions)
