"""The fastai callbacks of a training run: the phase being fitted, early stopping after the warm-up,
the best weights, progressive resizing, a guard against a NaN loss, a clean stop on Ctrl-C or
SIGTERM, and the training tricks (averaged weights, gradient accumulation, MixUp and CutMix).

They talk to each other only through the Learner, as fastai's own do: ``RunPhase`` is added to each
one-cycle fit of a run (``learn.run_phase``) and says which phase it is; the others read it there.
Each tracker only acts on epochs that trained: a resumed run skips its finished epochs with
fastai's ``SkipToEpoch``, which still sends ``after_epoch`` for them. A callback whose state a
restart needs is ``Stateful``: it gives its state to the checkpoint and takes it back on resume.
"""
from __future__ import annotations

import math
from collections import deque
from pathlib import Path

import numpy as np
import torch
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.tracker import EarlyStoppingCallback, SaveModelCallback, TerminateOnNaNCallback, TrackerCallback
from fastai.callback.training import GradientAccumulation
from fastai.torch_core import find_bs

from .. import modelfile
from ..atomic import atomic_path
from ..errors import HPAError


def bare_model(learn):
    """The Learner's model without the DistributedDataParallel and ``torch.compile`` wrappers."""
    return modelfile.bare_model(learn.model)


class Stateful:
    """A callback with state that ``--resume`` restores: ``state_dict()`` gives plain values and
    tensors under keys of its own; ``load_state_dict(checkpoint)`` reads them back."""

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError


class RunPhase(Callback):
    """The phase a one-cycle fit of a run trains: ``phase`` (``train``, or ``frozen`` then ``unfrozen``
    for a pretrained body), whether it is the run's ``final`` one, how many of its first epochs
    train at progressive resizing's smaller size (``small_epochs``), and the share of its steps that
    warm up (``pct_start``). Added to each fit's callbacks, so the others find it as ``learn.run_phase``."""

    order = -10  # before every callback that reads it

    def __init__(self, phase: str = "train", final: bool = True, small_epochs: int = 0, pct_start: float = 0.25):
        self.phase, self.final, self.small_epochs, self.pct_start = phase, final, small_epochs, pct_start


def run_phase(learn) -> RunPhase:
    """The fit's phase, or a single final ``train`` phase where none was given (a plain ``fit``)."""
    return getattr(learn, "run_phase", None) or RunPhase()


def warmup_length(n_epochs: int, pct_start: float, small_epochs: int = 0) -> int:
    """Epochs at the start of a fit that warm up: its ``pct_start`` of its epochs, where a rising
    learning rate makes the scores worse on purpose, or progressive resizing's epochs at the smaller
    size, whichever are more."""
    return max(math.ceil(pct_start * n_epochs), small_epochs)


def warmup_epochs(learn) -> int:
    """``warmup_length`` of the current fit."""
    phase = run_phase(learn)
    return warmup_length(learn.n_epoch, phase.pct_start, phase.small_epochs)


def best_epoch_index(values, epoch_in_phase, warmups, higher: bool) -> int:
    """The row of a run's history that ``KeepBestModel`` keeps: the best by strict comparison, where
    the first epoch after a phase's warm-up replaces whatever came before it. ``epoch_in_phase``:
    each row's epoch within its phase (from 0); ``warmups``: each row's phase's warm-up epochs."""
    best, best_i = None, 0
    for i, (value, k, warmup) in enumerate(zip(values, epoch_in_phase, warmups)):
        if k == warmup:
            best = None
        if best is None or (value > best if higher else value < best):
            best, best_i = value, i
    return best_i


class _TrainedEpochsOnly:
    """A tracker whose reference restarts after the warm-up: an epoch of the warm-up is only the best
    until the first epoch after it, which replaces it whatever its score (a fit that is all warm-up
    keeps its best). Otherwise an early epoch, scored before the learning rate peaked, would stay the
    mark the rest of the run must beat, while the warm-up's rising rate makes scores worse on purpose."""

    def before_epoch(self):
        self._trained = False

    def before_train(self):
        self._trained = True

    def _track_epoch(self) -> bool:
        """The tracker's own update (``new_best``), for an epoch that trained; False for one skipped."""
        if not self._trained:
            return False
        if self.epoch == warmup_epochs(self.learn):  # the first epoch after the warm-up
            self.best = float("inf") if self.comp == np.less else -float("inf")
        TrackerCallback.after_epoch(self)
        return True


class WarmupEarlyStopping(_TrainedEpochsOnly, Stateful, EarlyStoppingCallback):
    """Early stopping that ignores the one-cycle warm-up (the phase's ``pct_start`` of its epochs),
    when a rising learning rate makes the metric worse on purpose, and the first epochs of a fit at
    progressive resizing's smaller size. It stops at the start of the next epoch rather than at the
    end of this one, so the checkpoint of the epoch that decided it is written first."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.stop = False

    def before_fit(self):
        super().before_fit()
        self.stop = False

    def before_epoch(self):
        super().before_epoch()
        if self.stop:
            raise CancelFitException()

    def after_epoch(self):
        if not self._track_epoch():
            return
        if self.epoch + 1 <= warmup_epochs(self.learn):
            self.wait = 0
            return
        self.wait = 0 if self.new_best else self.wait + 1
        self.stop = self.wait >= self.patience

    def state_dict(self) -> dict:
        return {"stop_best": float(self.best), "stop_wait": int(self.wait), "stop_stop": bool(self.stop)}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.wait, self.stop = state["stop_best"], state["stop_wait"], state["stop_stop"]


class KeepBestModel(_TrainedEpochsOnly, Stateful, SaveModelCallback):
    """fastai's SaveModelCallback (the best epoch's weights are the ones the fit ends with), keeping
    the best weights in memory and writing ``best.pth`` only when ``--resume`` could need it: when a
    checkpoint is saved after an epoch that is not the best (``persist``), since otherwise the
    checkpoint holds the same weights. A one-cycle fit usually improves every epoch, so ``best.pth``
    is rarely written. The file is written atomically and read with ``weights_only=True``; nothing
    is printed (SaveModelCallback's print() would break the one-line-per-epoch log).

    It also keeps the best epoch's validation predictions: what ``get_preds`` on the validation set
    gives once the best weights are back, so the run need not predict those images once more."""

    best_preds = None  # (probabilities, targets) of the best epoch trained in this process
    run_train = False  # its after_batch collects validation predictions only

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # epochs are counted across fits (a pretrained model's frozen and unfrozen phases)
        self.best_state, self.best_epoch, self.on_disk, self.trained_epochs = None, None, False, 0

    def before_fit(self):
        super().before_fit()
        # kept: write() may be called after the fit, when the callback has left the Learner
        self.best_file = Path(self.learn.path) / self.learn.model_dir / f"{self.fname}.pth"

    def before_validate(self):
        # the epoch's own pass over the validation set only: other callbacks run batches of their
        # own (TensorBoard's sample predictions, FetchPreds' get_preds) through the same events
        self._collecting = self.learn.dl is self.dls.valid
        self._preds, self._targs = [], []

    def after_batch(self):
        if not self.learn.training and getattr(self, "_collecting", False):
            # kept on the device: a copy to the host per batch would wait for the GPU every batch
            self._preds.append(self.learn.to_detach(self.pred, cpu=False))
            self._targs.append(self.learn.to_detach(self.y, cpu=False))

    def after_validate(self):
        self._collecting = False

    def after_epoch(self):
        if not self._track_epoch():
            return
        self.trained_epochs += 1
        if self.new_best:
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in bare_model(self.learn).state_dict().items()}
            self.best_epoch, self.on_disk = self.trained_epochs, False
            activation = getattr(self.loss_func, "activation", torch.sigmoid)
            self.best_preds = (activation(torch.cat(self._preds)).cpu(), torch.cat(self._targs).cpu())

    @property
    def best_is_current(self) -> bool:
        """Whether the model's weights now are the best ones (the epoch just trained was the best)."""
        return self.best_state is not None and self.best_epoch == self.trained_epochs

    def persist(self) -> None:
        """Write ``best.pth`` if the best weights are an earlier epoch's: called before a checkpoint
        of this epoch, whose own weights then are not the best ones."""
        if not self.best_is_current:
            self.write()

    def write(self) -> None:
        """``best.pth``, unless it is there already or there are no best weights yet."""
        if self.best_state is not None and not self.on_disk:
            with atomic_path(self.best_file, durable=True) as tmp:
                torch.save(self.best_state, tmp)
            self.on_disk = True

    def state_dict(self) -> dict:
        # the checkpoint's weights are the best ones when this epoch is the best: no best.pth then
        return {"save_best": float(self.best), "best_is_current": self.best_is_current}

    def load_state_dict(self, state: dict) -> None:
        """After a restart (the checkpoint's weights are in the model by now): the tracked value, and
        the best weights: the model's own, or ``best.pth`` (read when the fit ends). A checkpoint
        without ``best_is_current`` comes from a run that wrote best.pth at every new best."""
        self.best = state["save_best"]
        current = state.get("best_is_current", False)
        self.best_state = ({k: v.detach().to("cpu", copy=True) for k, v in bare_model(self.learn).state_dict().items()}
                           if current else None)
        self.best_epoch, self.on_disk = None, not current

    def after_fit(self, **kwargs):
        if self.best_state is not None:
            bare_model(self.learn).load_state_dict(self.best_state)
        elif self.best_file.is_file():  # the best epoch came before a --resume
            bare_model(self.learn).load_state_dict(torch.load(self.best_file, map_location="cpu", weights_only=True))
        # else: a fit cancelled (NaN, Ctrl-C) before its first epoch ended has no best weights


class ProgressiveResize(Callback):
    """Progressive resizing: the first ``small_epochs`` epochs of a fit train on images of side
    ``small``, the others at the run's size. The training batches are resampled to ``small`` by
    fastai's own batch augmentation (its affine transform's output ``size``, fastai's "presizing"),
    so one DataLoader, with one random stream and one sampler, serves both sizes. Validation stays
    at the run's size, so every epoch's score, the best epoch and the tuned thresholds belong to
    the size the exported model predicts at. The size is a function of the epoch alone: a resumed
    run needs no state for it."""

    def __init__(self, small: int):
        self.small = small

    def _augmentation(self):
        from fastai.vision.augment import AffineCoordTfm

        train = getattr(self.dls.train, "dl", self.dls.train)  # under several processes, DistributedDL's
        found = [t for t in train.after_batch.fs if isinstance(t, AffineCoordTfm)]
        if not found:
            raise RuntimeError("progressive resizing needs the training batches' affine augmentation")
        return found[0]

    def before_train(self):
        self._augmentation().size = self.small if self.epoch < run_phase(self.learn).small_epochs else None

    def before_validate(self):
        # fastai runs the same affine transform (with an identity matrix) on validation batches too
        self._augmentation().size = None

    def after_fit(self):
        self._augmentation().size = None


class NaNGuard(Callback):
    """Stops the fit at the first training batch whose loss is not finite, remembering where (``nan``),
    as fastai's ``TerminateOnNaNCallback`` does, without making the host wait for the GPU.

    fastai's callback turns every batch's loss into a Python bool: the host waits for the GPU to
    finish the step before it can queue the next one. Here each loss is copied, without blocking,
    to page-locked host memory, and looked at once the GPU has written it (a CUDA event says when:
    usually a batch or two later, by when the weights have taken those steps on a bad loss; the run
    stops without exporting them anyway). The end of the epoch waits for the last copies. On a CPU
    the copy is there at once, and the batch that went bad is the one that stops."""

    order = TerminateOnNaNCallback.order
    nan = None  # {"loss", "epoch", "batch"} of the first non-finite loss

    run_valid = False  # the loss that trains the weights

    def before_fit(self):
        self.nan, self._pending, self._free = None, deque(), []

    def after_batch(self):
        learn = self.learn
        loss = getattr(learn, "loss", None)
        if loss is None:
            return
        loss = loss.detach()
        cuda = loss.device.type == "cuda"
        host = self._free.pop() if self._free and self._free[-1].shape == loss.shape else \
            torch.empty(loss.shape, dtype=torch.float32, pin_memory=cuda)
        host.copy_(loss, non_blocking=True)
        done = None
        if cuda:
            done = torch.cuda.Event()
            done.record()
        self._pending.append((host, done, learn.epoch, learn.iter))
        self._check(wait=False)

    def after_train(self):
        self._check(wait=True)

    def _check(self, wait: bool):
        while self._pending and (wait or self._pending[0][1] is None or self._pending[0][1].query()):
            host, done, epoch, batch = self._pending.popleft()
            if done is not None and wait:
                done.synchronize()  # the epoch's last copies (query() said the others were written)
            value = host.item() if host.numel() == 1 else float(host.sum())  # reduction "none": any element
            self._free.append(host)
            if not math.isfinite(value):
                self._pending.clear()
                self.nan = {"loss": value, "epoch": epoch, "batch": batch}
                raise CancelFitException()


class StopOnSignal(Callback):
    """Ctrl-C or SIGTERM (kill, a scheduler's time limit) asks training to stop; this stops it at the
    end of the current batch, or after the epoch's checkpoint when the signal came while saving.
    A second signal stops at once."""

    order = TrackerCallback.order + 10  # after the epoch's checkpoint (resume.Checkpoint)

    def __init__(self):
        self.requested = False

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def after_batch(self):
        if self.requested:
            raise CancelFitException()

    def after_epoch(self):
        if self.requested:
            raise CancelFitException()


class AveragedWeights(Stateful, Callback):
    """Validation, and with it the best epoch, its predictions and the exported model, sees averaged
    weights in place of the trained ones (``EMA``, ``SWA``): they are put into the model before an
    epoch's validation where there is an average, and the trained ones back before the next epoch
    trains. So the checkpoint of an epoch holds the weights that were validated, and this callback's
    state holds the trained ones, which a resumed run continues from."""

    order = TrackerCallback.order - 1  # its before_fit builds the average before Checkpoint restores the state

    def __init__(self):
        self.averaged, self.trained_state, self.count = None, None, 0

    def make(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module that holds the average (``averaged_module`` is where its weights are)."""
        raise NotImplementedError

    def averaged_module(self) -> torch.nn.Module:
        return self.averaged.module

    def ready(self) -> bool:
        """Whether this epoch's validation sees the average."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Bring the average up to date before it is validated."""

    def before_fit(self):
        if self.averaged is None:
            self.averaged = self.make(bare_model(self.learn))

    def before_train(self):
        if self.trained_state is not None:
            bare_model(self.learn).load_state_dict(self.trained_state)
            self.trained_state = None

    def before_validate(self):
        if self.learn.dl is not self.dls.valid or self.trained_state is not None or not self.ready():
            return
        self.prepare()
        model = bare_model(self.learn)
        self.trained_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.averaged_module().state_dict())

    def state_dict(self) -> dict:
        trained = None if self.trained_state is None else {k: v.detach().to("cpu", copy=True)
                                                           for k, v in self.trained_state.items()}
        return {"averaged_trained_weights": trained, "averaged_count": int(self.count)}

    def load_state_dict(self, state: dict) -> None:
        """After a restart: the model holds the checkpoint's weights, the validated ones, which are the
        average's where the epoch validated one."""
        trained, count = state.get("averaged_trained_weights", ...), state.get("averaged_count")
        model = bare_model(self.learn).state_dict()
        fits = trained is None or (isinstance(trained, dict) and trained.keys() == model.keys() and all(
            isinstance(v, torch.Tensor) and v.shape == model[k].shape and (not v.is_floating_point() or
                                                                          bool(torch.isfinite(v).all()))
            for k, v in trained.items()))
        if trained is ... or not fits or not (isinstance(count, int) and not isinstance(count, bool) and count >= 0):
            raise HPAError(f"checkpoint.pth: the averaged weights' state is missing or does not fit this model "
                           f"({type(self).__name__}); start the run again")
        self.count = count
        if trained is not None:
            self.averaged_module().load_state_dict(model)
            self.trained_state = {k: v.to(model[k].device) for k, v in trained.items()}
        self.restored()

    def restored(self) -> None:
        """Anything else the average keeps, after ``load_state_dict``."""


class EMA(AveragedWeights):
    """An exponential moving average of the weights (timm's ``ModelEmaV3``), updated after every
    optimizer step. timm's default decay of 0.9998 needs tens of thousands of steps; its warm-up
    (the decay rises as 1 - (1 + step)^-3/4, timm's setting for shorter runs) lets a run of a few
    hundred steps average over its last tens of steps, and longer ones over more."""

    def make(self, model):
        from timm.utils import ModelEmaV3

        return ModelEmaV3(model, decay=0.9998, use_warmup=True, warmup_power=3 / 4)

    def ready(self) -> bool:
        return self.count > 0

    def after_step(self):
        self.count += 1
        self.averaged.update(bare_model(self.learn), step=self.count)


class SWA(AveragedWeights):
    """Stochastic weight averaging (torch's ``swa_utils``): an equal average of the weights at the end
    of each of the final phase's last ``epochs`` epochs, whose BatchNorm statistics ``update_bn``
    recomputes with a pass over the training images before it is validated."""

    def __init__(self, epochs: int):
        super().__init__()
        self.epochs = epochs

    def make(self, model):
        from torch.optim.swa_utils import AveragedModel

        return AveragedModel(model)

    def ready(self) -> bool:
        return run_phase(self.learn).final and self.epoch >= self.n_epoch - self.epochs

    def prepare(self):
        from torch.optim.swa_utils import update_bn

        self.averaged.update_parameters(bare_model(self.learn))
        self.count = int(self.averaged.n_averaged)
        update_bn(self.dls.train, self.averaged)

    def restored(self):
        self.averaged.n_averaged.fill_(self.count)


class AccumulateGradients(GradientAccumulation):
    """fastai's ``GradientAccumulation`` for ``n`` batches of ``bs`` images per optimizer step (fastai
    counts images). Each epoch's last batch also steps, with what it has, so no gradient is pending when
    the epoch's checkpoint is written and a resumed run continues exactly. The one-cycle schedule
    follows the batches: each step takes the learning rate of the batch it happens at."""

    def __init__(self, n: int, bs: int):
        super().__init__(n_acc=n * bs)

    def before_train(self):
        self.count = 0

    def before_step(self):
        if self.iter + 1 < self.n_iter:
            return super().before_step()
        self.learn.loss_grad *= self.n_acc / find_bs(self.learn.yb)
        self.count = 0


def trick_callbacks(cfg) -> list:
    """The callbacks of the training tricks ``cfg`` turns on: ``--ema``, ``--swa``, ``--accumulate``,
    ``--mixup``, ``--cutmix``. MixUp and CutMix are fastai's: with a multi-label loss (no ``y_int``)
    they mix the targets themselves, as probabilities, in the images' proportions."""
    from fastai.callback.mixup import CutMix, MixUp

    cbs = []
    if cfg.ema:
        cbs.append(EMA())
    if cfg.swa:
        cbs.append(SWA(swa_epochs(cfg)))
    if cfg.accumulate > 1:
        cbs.append(AccumulateGradients(cfg.accumulate, cfg.bs))
    if cfg.mixup:
        cbs.append(MixUp())
    if cfg.cutmix:
        cbs.append(CutMix())
    return cbs


def swa_epochs(cfg) -> int:
    return min(cfg.epochs, cfg.swa_epochs or max(2, cfg.epochs // 4))
