"""fastai callbacks of a training run: early stopping, best weights, per-epoch checkpoints, NaN guard.

Each tracker only acts on epochs that trained: a resumed run skips its finished epochs with
fastai's ``SkipToEpoch``, which still sends ``after_epoch`` for them.
"""
from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.tracker import EarlyStoppingCallback, SaveModelCallback, TerminateOnNaNCallback, TrackerCallback

from ._io import atomic_path


def bare_model(learn):
    """The model without the DistributedDataParallel wrapper, so saved weights load anywhere."""
    return getattr(learn.model, "module", learn.model)


def train_loader(learn):
    """The training DataLoader (under several processes, the one that DistributedDL wraps)."""
    return getattr(learn.dls.train, "dl", learn.dls.train)


class _TrainedEpochsOnly:
    def before_epoch(self):
        self._trained = False

    def before_train(self):
        self._trained = True


class WarmupEarlyStopping(_TrainedEpochsOnly, EarlyStoppingCallback):
    """Early stopping that ignores the one-cycle warm-up, when a rising learning rate makes the
    metric worse on purpose. It stops at the start of the next epoch rather than at the end of
    this one, so the checkpoint of the epoch that decided it is written first."""

    def __init__(self, warmup_pct: float = 0.25, **kwargs):
        super().__init__(**kwargs)
        self.warmup_pct, self.stop = warmup_pct, False

    def before_fit(self):
        super().before_fit()
        self.stop = False

    def before_epoch(self):
        super().before_epoch()
        if self.stop:
            raise CancelFitException()

    def after_epoch(self):
        if not self._trained:
            return
        TrackerCallback.after_epoch(self)
        if self.epoch + 1 <= math.ceil(self.warmup_pct * self.n_epoch):
            self.wait = 0
            return
        self.wait = 0 if self.new_best else self.wait + 1
        self.stop = self.wait >= self.patience


class AtomicSaveModel(_TrainedEpochsOnly, SaveModelCallback):
    """fastai's SaveModelCallback (the best epoch's weights are the ones the fit ends with), keeping
    the best weights in memory and writing ``best.pth`` only when ``--resume`` could need it: when a
    checkpoint is saved after an epoch that is not the best (``persist``), since otherwise the
    checkpoint holds the same weights. A one-cycle fit usually improves every epoch, so ``best.pth``
    is rarely written. The file is written atomically and read with ``weights_only=True``; nothing
    is printed (SaveModelCallback's print() would break the one-line-per-epoch log).

    It also keeps the best epoch's validation predictions: what ``get_preds`` on the validation set
    gives once the best weights are back, so the run need not predict those images once more."""

    best_preds = None  # (probabilities, targets) of the best epoch trained in this process

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
        if not self.training and getattr(self, "_collecting", False):
            self._preds.append(self.learn.to_detach(self.pred))
            self._targs.append(self.learn.to_detach(self.y))

    def after_validate(self):
        self._collecting = False

    def after_epoch(self):
        if not self._trained:
            return
        TrackerCallback.after_epoch(self)
        self.trained_epochs += 1
        if self.new_best:
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in bare_model(self.learn).state_dict().items()}
            self.best_epoch, self.on_disk = self.trained_epochs, False
            activation = getattr(self.loss_func, "activation", torch.sigmoid)
            self.best_preds = (activation(torch.cat(self._preds)), torch.cat(self._targs))

    def persist(self) -> bool:
        """Before a checkpoint of this epoch: write ``best.pth`` if the best weights are an earlier
        epoch's. Returns whether the checkpoint's own weights are the best ones."""
        current = self.best_state is not None and self.best_epoch == self.trained_epochs
        if not current:
            self.write()
        return current

    def write(self) -> None:
        """``best.pth``, unless it is there already or there are no best weights yet."""
        if self.best_state is not None and not self.on_disk:
            with atomic_path(self.best_file, durable=True) as tmp:
                torch.save(self.best_state, tmp)
            self.on_disk = True

    def state_dict(self) -> dict:
        return {"save_best": float(self.best)}

    def load_state_dict(self, state: dict, model_state: dict, best_is_current: bool) -> None:
        """After a restart: the tracked value, and the best weights: those of the checkpoint, or
        ``best.pth`` (read when the fit ends)."""
        self.best = state["save_best"]
        self.best_state = dict(model_state) if best_is_current else None
        self.best_epoch, self.on_disk = None, not best_is_current

    def after_fit(self, **kwargs):
        if self.best_state is not None:
            bare_model(self.learn).load_state_dict(self.best_state)
        elif self.best_file.is_file():  # the best epoch came before a --resume
            bare_model(self.learn).load_state_dict(torch.load(self.best_file, map_location="cpu", weights_only=True))
        # else: a fit cancelled (NaN, Ctrl-C) before its first epoch ended has no best weights


class NaNGuard(TerminateOnNaNCallback):
    """fastai's TerminateOnNaNCallback, remembering where the loss went bad so the run can say so."""

    def after_batch(self):
        if not torch.isfinite(self.loss):
            self.learn.hpa_nan = {"loss": float(self.loss), "epoch": self.epoch, "batch": self.iter}
        super().after_batch()


def rng_state(learn) -> dict:
    """Every random stream training draws from, the training DataLoader's own shuffling RNG included."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "loader": train_loader(learn).rng.getstate(),
            "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2]),
            "numpy_gauss": (int(np_state[3]), float(np_state[4]))}


def set_rng_state(learn, state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    train_loader(learn).rng.setstate(_tuples(state["loader"]))
    has_gauss, gauss = state["numpy_gauss"]
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         has_gauss, gauss))


class Checkpoint(_TrainedEpochsOnly, Callback):
    """Writes ``checkpoint.pth`` atomically after every trained epoch: model, optimizer, the
    phase and epoch reached, RNG states, history and the trackers' state: all that
    ``--resume`` needs to continue the same one-cycle schedule.

    With ``skip_last``, the last epoch of the final phase is not saved: the run exports its model
    right after it and then removes the checkpoint, so writing it would only cost time (a run
    killed while exporting resumes from the epoch before)."""

    order = TrackerCallback.order + 5

    def __init__(self, path, phase: str = "train", final_phase: bool = True, skip_last: bool = True):
        self.path, self.phase, self.final_phase, self.skip_last, self.restore = path, phase, final_phase, skip_last, None

    def _cb(self, cls):
        found = [c for c in self.learn.cbs if isinstance(c, cls)]
        return found[0] if found else None

    def before_fit(self):
        # runs after the trackers' before_fit, which would otherwise reset what was restored
        if self.restore is None:
            return
        state, self.restore = self.restore, None
        # the train_loss column is a running average over the whole fit: carry it across the restart
        count, val = state["smooth_loss"]
        self.learn.recorder.smooth_loss.count, self.learn.recorder.smooth_loss.val = count, torch.tensor(val)
        if (save := self._cb(AtomicSaveModel)) is not None:
            # a checkpoint without the flag comes from a run that wrote best.pth at every new best
            save.load_state_dict(state, state["model"], state.get("best_is_current", False))
        if (stop := self._cb(WarmupEarlyStopping)) is not None:
            stop.best, stop.wait, stop.stop = state["stop_best"], state["stop_wait"], state["stop_stop"]

    def after_epoch(self):
        if not self._trained or (self.skip_last and self.final_phase and self.epoch + 1 == self.n_epoch):
            return
        from .console import EpochLogger

        save, stop, logger = self._cb(AtomicSaveModel), self._cb(WarmupEarlyStopping), self._cb(EpochLogger)
        best_is_current = save.persist() if save else False
        state = {
            "best_is_current": best_is_current,
            "model": bare_model(self.learn).state_dict(),
            "opt": plain_opt_state(self.learn.opt.state_dict()),
            "phase": self.phase,
            "epochs_done": self.epoch + 1,
            "rng": rng_state(self.learn),
            "smooth_loss": (int(self.learn.recorder.smooth_loss.count), float(self.learn.recorder.smooth_loss.val)),
            "history": logger.rows if logger else [],
            **(save.state_dict() if save else {"save_best": None}),
            "stop_best": float(stop.best) if stop else None,
            "stop_wait": int(stop.wait) if stop else 0,
            "stop_stop": bool(stop.stop) if stop else False,
        }
        with atomic_path(self.path, durable=True) as tmp:
            torch.save(state, tmp)


def _plain(obj):
    """Tensors and plain Python values only: fastcore's ``L`` and numpy scalars become lists and
    floats, so the checkpoint loads with ``torch.load(weights_only=True)``, which refuses them."""
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) or type(obj).__name__ == "L":
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def plain_opt_state(sd: dict) -> dict:
    return {"state": _plain(sd["state"]), "hypers": _plain(sd["hypers"])}


def load_opt_state(opt, sd: dict) -> None:
    from fastcore.foundation import L

    opt.load_state_dict({"state": list(sd["state"]), "hypers": L(sd["hypers"])})


def _tuples(obj):
    """random.setstate wants the tuples that the checkpoint stored as lists."""
    return tuple(_tuples(v) for v in obj) if isinstance(obj, (list, tuple)) else obj


def load_checkpoint(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


class StopOnSignal(Callback):
    """Ctrl-C or SIGTERM (kill, a scheduler's time limit) asks training to stop; this stops it at the
    end of the current batch, or after the epoch's checkpoint when the signal came while saving.
    A second signal stops at once."""

    order = Checkpoint.order + 5

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
