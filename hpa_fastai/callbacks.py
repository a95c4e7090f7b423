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
    """SaveModelCallback that writes the best weights under a temporary name first, so a run
    killed while saving never leaves a truncated ``best.pth``, and that prints nothing (its
    print() would break the one-line-per-epoch log)."""

    def before_validate(self):
        self._preds, self._targs = [], []

    def after_batch(self):
        if not self.training:
            self._preds.append(self.learn.to_detach(self.pred))
            self._targs.append(self.learn.to_detach(self.y))

    def after_epoch(self):
        if not self._trained:
            return
        TrackerCallback.after_epoch(self)
        if self.new_best:
            self._save(self.fname)
            # what get_preds on the validation set would give once the best weights are loaded
            # back: kept, so that the run need not predict its validation images once more
            activation = getattr(self.loss_func, "activation", torch.sigmoid)
            self.best_preds = (activation(torch.cat(self._preds)), torch.cat(self._targs))

    best_preds = None  # (probabilities, targets) of the best epoch trained in this process

    def _save(self, name):
        final = self.learn.path / self.learn.model_dir / f"{name}.pth"
        with atomic_path(final, durable=True) as tmp:
            torch.save(bare_model(self.learn).state_dict(), tmp)
        self.last_saved_path = final

    def after_fit(self, **kwargs):
        # a fit cancelled (NaN, Ctrl-C) before its first epoch ended has no best weights to load;
        # a resumed run does, from before the restart
        if (Path(self.learn.path) / self.learn.model_dir / f"{self.fname}.pth").is_file():
            super().after_fit(**kwargs)


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

    The last epoch of the final phase is not saved: the run exports its model right after it and
    then removes the checkpoint, so writing it would only cost time (a run killed while exporting
    resumes from the epoch before)."""

    order = TrackerCallback.order + 5

    def __init__(self, path, phase: str = "train", final_phase: bool = True):
        self.path, self.phase, self.final_phase, self.restore = path, phase, final_phase, None

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
            save.best = state["save_best"]
        if (stop := self._cb(WarmupEarlyStopping)) is not None:
            stop.best, stop.wait, stop.stop = state["stop_best"], state["stop_wait"], state["stop_stop"]

    def after_epoch(self):
        if not self._trained or (self.final_phase and self.epoch + 1 == self.n_epoch):
            return
        from .console import EpochLogger

        save, stop, logger = self._cb(AtomicSaveModel), self._cb(WarmupEarlyStopping), self._cb(EpochLogger)
        state = {
            "model": bare_model(self.learn).state_dict(),
            "opt": plain_opt_state(self.learn.opt.state_dict()),
            "phase": self.phase,
            "epochs_done": self.epoch + 1,
            "rng": rng_state(self.learn),
            "smooth_loss": (int(self.learn.recorder.smooth_loss.count), float(self.learn.recorder.smooth_loss.val)),
            "history": logger.rows if logger else [],
            "save_best": float(save.best) if save else None,
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
