"""The one Learner factory, for ``run.py`` and the notebook door alike: the DataLoaders of a
training set (rare classes oversampled unless turned off), the model from the registry with the
weights it starts from (``transfer``), the loss from the loss registry, macro and samples F1 and the
running losses (kept on the device: ``metrics``), torch's AdamW under fastai's body/head parameter
groups (``optimizer``), and what the device offers: mixed precision, channels-last, cuDNN's
autotuner, ``torch.compile`` (``device``)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from fastai import learner as fastai_learner
from fastai.callback.core import (Callback, CancelBackwardException, CancelBatchException, CancelEpochException,
                                  CancelFitException, CancelStepException, CancelTrainException,
                                  CancelValidException, TrainEvalCallback, _inner_loop)
from fastai.torch_core import set_seed
from fastcore.basics import noop
from fastcore.xtras import modify_exception

from .. import device as D
from .. import metrics as M
from ..config import TrainConfig
from ..data.pipeline import make_dls
from ..data.splits import make_splitter
from ..data.training_set import TrainingSet
from ..errors import HPAError
from ..losses import loss_from
from ..models import splitter
from ..runs.folder import HISTORY
from ..transfer import Start, start_model
from .history import RunHistory
from .optimizer import adamw, last_hyper

logger = logging.getLogger(__name__)


@dataclass
class LearnerSetup:
    """What building the Learner decided: the precision it trains in, the weights the model started
    from (offline the cache's ImageNet weights may be missing), the memory format and whether the
    model is compiled."""
    precision: str
    start: Start
    channels_last: bool = False
    compiled: bool = False

    @property
    def pretrained(self) -> bool:
        return self.start.pretrained


# fastai's Callback.__call__ lets a cancelling exception through and words any other one this way
_CANCELS = (CancelBatchException, CancelBackwardException, CancelEpochException, CancelFitException,
            CancelStepException, CancelTrainException, CancelValidException)
_INNER_LOOP = frozenset(_inner_loop)


class Learner(fastai_learner.Learner):
    """fastai's ``Learner``, with less host work per batch (on a GPU the step waits for it when the
    model is fast; ``bench/train_step.py`` measures it). fastai sends each of a batch's nine events
    to every callback (about fifteen in a run, 135 calls a batch, each looking the event up and
    asking the Learner, through fastcore's attribute forwarding, whether it is training), re-sorting
    the callbacks by order for every event; it moves every batch to the device again although the
    loader already did, and ``CastToTensor`` then turns fastai's tensor types back into plain
    tensors through fastcore's generic ``cast``.

    Here each event goes, in fastai's order, only to the callbacks that handle it (worked out once
    per set of callbacks), with ``Callback.__call__``'s rules (``run``, ``run_train``, ``run_valid``,
    the wording of an error) applied in this one loop; a batch already on the model's device is only
    made of plain tensors, in place of ``CastToTensor``; and the recorder and the iteration counter
    are ``HostRecorder`` and ``HostTrainEval``.
    Everything else is fastai's."""

    _handlers: dict = {}
    _handlers_of: tuple = ()
    _handler_ids: tuple = ()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.remove_cbs(self.cbs.filter(lambda cb: isinstance(cb, fastai_learner.CastToTensor)))
        self.remove_cbs(self.cbs.filter(lambda cb: type(cb) is TrainEvalCallback))
        self.add_cb(HostTrainEval())
        recorder = self.recorder
        self.remove_cb(recorder)
        self.add_cb(HostRecorder(add_time=recorder.add_time, train_metrics=recorder.train_metrics,
                                 valid_metrics=recorder.valid_metrics, beta=recorder.smooth_loss.beta))

    def __getstate__(self):
        # the callbacks of the last fit stay out of an export: they may hold a console or a thread
        return {k: v for k, v in super().__getstate__().items() if k not in ("_handlers", "_handlers_of", "_handler_ids")}

    def __call__(self, event_name):
        if not isinstance(event_name, str):
            for name in event_name:
                self(name)
            return
        ids = tuple(map(id, self.cbs.items))
        if ids != self._handler_ids:  # callbacks added or removed (each fit adds its own)
            # the callbacks are kept with their ids, so that no id is reused while it is remembered
            self._handlers, self._handlers_of, self._handler_ids = {}, tuple(self.cbs.items), ids
        handlers = self._handlers.get(event_name)
        if handlers is None:
            handlers = self._handlers[event_name] = self._find_handlers(event_name)
        inner = event_name in _INNER_LOOP
        for cb, own_call in handlers:  # most of a batch's nine events have none
            if own_call:
                cb(event_name)
                continue
            training = getattr(self, "training", None)  # read for each callback, as fastai's Callback does
            if cb.run and (not inner or (cb.run_train and (training is None or training))
                           or (cb.run_valid and not training)):
                try:
                    getattr(cb, event_name, noop)()
                except _CANCELS:
                    raise
                except Exception as e:
                    raise modify_exception(e, f"Exception occured in `{cb.__class__.__name__}` when calling event "
                                              f"`{event_name}`:\n\t{e.args[0]}", replace=True)
            if event_name == "after_fit":
                cb.run = True

    def _find_handlers(self, event_name) -> list:
        """The callbacks ``event_name`` goes to, in order, each with whether it has its own ``__call__``
        (which gets every event, as fastai sends it)."""
        if not hasattr(fastai_learner.event, event_name):
            raise Exception(f"missing {event_name}")
        found = []
        for cb in self.cbs.sorted("order"):
            own_call = type(cb).__call__ is not Callback.__call__
            # every callback sees after_fit: fastai's Callback resets its ``run`` flag there
            if own_call or event_name == "after_fit" or hasattr(type(cb), event_name) or event_name in vars(cb):
                found.append((cb, own_call))
        return found

    def _set_device(self, b):
        b = tuple(D.plain_tensor(t) for t in b)  # first: reading a fastai tensor's device dispatches in Python
        device = D.model_device(self.model)
        if not all(t.device == device for t in b if isinstance(t, torch.Tensor)):
            b = super()._set_device(b)  # moving plain tensors gives plain tensors
        return b


class HostTrainEval(TrainEvalCallback):
    """fastai's ``TrainEvalCallback`` (training mode, the iteration counters), counting a training batch
    on the Learner's own attributes: fastai's reads two of them (``n_iter``, ``n_epoch``) through
    fastcore's attribute forwarding every batch."""

    name = "train_eval"

    def after_batch(self):
        learn = self.learn
        learn.pct_train += 1.0 / (learn.n_iter * learn.n_epoch)
        learn.train_iter += 1


class HostRecorder(fastai_learner.Recorder):
    """fastai's ``Recorder`` with its running losses on the device (``metrics.DeviceAvgSmoothLoss``,
    ``DeviceAvgLoss``: read once an epoch) and a shorter path for a training batch: the same values
    recorded, without rebuilding its list of metrics and computing the smoothed loss twice. The
    smoothed loss of every batch (``losses``, what ``plot_loss`` draws) is copied to the host in one
    piece when the epoch's training ends, or the fit."""

    name = "recorder"  # learn.recorder, where fastai and its callbacks look for it

    def __init__(self, *args, beta: float = 0.98, **kwargs):
        super().__init__(*args, beta=beta, **kwargs)
        self.loss, self.smooth_loss = M.DeviceAvgLoss(), M.DeviceAvgSmoothLoss(beta=beta)

    def after_batch(self):
        learn = self.learn
        if not (learn.training and len(learn.yb)) or self.train_metrics or vars(self).get("cancel_train"):
            return super().after_batch()
        self.smooth_loss.accumulate(learn)
        self.lrs.append(last_hyper(learn.opt, "lr"))
        value = self.smooth_loss.value
        self.losses.append(value)
        learn.smooth_loss = value

    def after_train(self):
        super().after_train()
        self._losses_to_host()

    def after_fit(self):
        self._losses_to_host()  # a fit cancelled in an epoch's training (lr_find) skips after_train

    def _losses_to_host(self):
        first = len(self.losses)
        while first and self.losses[first - 1].device.type != "cpu":
            first -= 1
        if first < len(self.losses):
            self.losses[first:] = list(torch.stack(self.losses[first:]).cpu().unbind())


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def training_dls(ts: TrainingSet, device: torch.device | None = None, augment: bool = True,
                 oversample: bool | None = None):
    """The DataLoaders of ``ts``: its split (random, or fold ``--fold`` of ``--n-folds``), batches of
    ``--bs``, oversampling as ``--oversample`` says (or ``oversample``), checked to leave images on
    both sides."""
    cfg = ts.cfg
    oversample = cfg.oversample if oversample is None else oversample
    split = make_splitter(ts.items, len(ts.vocab), cfg.valid_pct, cfg.seed, cfg.n_folds, cfg.fold)
    dls = make_dls(ts.items, ts.vocab, cfg.channels, cfg.size, ts.mean, ts.std, split, bs=cfg.bs,
                   workers=cfg.workers, seed=cfg.seed, device=device or default_device(), augment=augment,
                   oversample_cap=cfg.oversample_cap if oversample else None)
    if len(dls.train) == 0:
        raise HPAError(f"--bs {cfg.bs} is larger than the {len(dls.train_ds)} training images; lower --bs")
    if len(dls.valid_ds) == 0:  # training would crash after its first epoch, with nothing to score
        raise HPAError(f"--valid-pct {cfg.valid_pct} leaves none of the {len(ts.items)} images for validation; "
                       "raise --valid-pct")
    return dls


def create_learner(dls, ts: TrainingSet, cfg: TrainConfig, device: torch.device | None = None,
                   **learner_kwargs) -> tuple[Learner, LearnerSetup]:
    """A Learner on ``dls`` for ``ts``'s stains and classes with ``cfg``'s model, loss, weight decay,
    threshold, precision, memory format and compile options; ``learner_kwargs`` go to fastai's ``Learner``
    (``path``, ``model_dir``, ``cbs``...)."""
    device = device or default_device()
    set_seed(cfg.seed, reproducible=True)
    model, start = start_model(cfg.arch, len(cfg.channels), ts.names, cfg.pretrained, cfg.weights)
    model.to(device)  # before the optimizer sees the parameters: fused AdamW wants them on their device
    learner_kwargs.setdefault("wd", cfg.wd)  # fastai sets it on the optimizer at every fit
    learn = Learner(dls, model, loss_func=loss_from(cfg), opt_func=adamw,
                    metrics=[M.f1_metric("macro", cfg.threshold), M.f1_metric("samples", cfg.threshold)],
                    splitter=splitter, **learner_kwargs)
    precision = D.training_precision(cfg.precision, device)
    D.set_precision(learn, precision)
    if precision == "bf16" and device.type == "cpu":
        logger.info("note: bf16 on a CPU is fast only with bfloat16 instructions (AMX, AVX512-BF16); other CPUs "
                    "emulate it, many times slower than fp32")
    channels_last = D.use_channels_last(cfg.memory_format, device)
    if channels_last:
        D.set_channels_last(learn)
    D.tune_backend(device)  # after set_seed, which turns cuDNN's autotuner off
    if cfg.compile:
        learn.model = D.compile_model(learn.model)
    return learn, LearnerSetup(precision, start, channels_last, cfg.compile)


def run_learner(ts: TrainingSet, run_dir: Path | None = None, device: torch.device | None = None,
                cbs=()) -> tuple[Learner, LearnerSetup]:
    """The Learner of a run: ``create_learner`` on the run's DataLoaders, writing into ``run_dir``, with
    the run's history (``learn.run_history``, kept in history.csv; without ``run_dir``, in memory and
    the current folder as the Learner's path) and ``cbs``, and without fastai's
    progress bars (they print carriage returns into logs; whoever runs the training shows the
    progress it wants through its own callbacks)."""
    from fastai.callback.progress import ProgressCallback

    device = device or default_device()
    history = RunHistory(None if run_dir is None else Path(run_dir) / HISTORY)
    learn, setup = create_learner(training_dls(ts, device), ts, ts.cfg, device, path=Path(run_dir or "."),
                                  model_dir=".", cbs=[history, *cbs])
    learn.remove_cbs(learn.cbs.filter(lambda c: isinstance(c, ProgressCallback)))
    learn.logger = lambda *_: None  # the Recorder's print of each epoch's values
    return learn, setup
