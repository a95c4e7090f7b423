"""What ``--resume`` needs: ``checkpoint.pth`` written after every trained epoch (model, optimizer,
phase and epoch, every random stream (the CUDA generators too, where there are any), the running
loss average and each stateful callback's state), read back with ``weights_only=True``, and put
back into a new Learner."""
from __future__ import annotations

import logging
import math
import random
import threading
from pathlib import Path

import numpy as np
import torch
from fastai.callback.core import Callback
from fastai.callback.tracker import TrackerCallback

from ..atomic import atomic_path
from ..errors import HPAError
from ..runs.files import read_config
from ..runs.folder import CHECKPOINT, CONFIG
from .callbacks import Stateful, _TrainedEpochsOnly, bare_model, run_phase

logger = logging.getLogger(__name__)

CHECKPOINT_KEYS = {"model", "opt", "phase", "epochs_done", "rng", "smooth_loss", "history"}


def train_loader(learn):
    """The training DataLoader (under several processes, the one that DistributedDL wraps)."""
    return getattr(learn.dls.train, "dl", learn.dls.train)


def rng_state(learn) -> dict:
    """Every random stream training draws from, the training DataLoader's own shuffling RNG included,
    and on a GPU each CUDA device's generator (augmentation on the batch and dropout draw from it)."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "loader": train_loader(learn).rng.getstate(),
            "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2]),
            "numpy_gauss": (int(np_state[3]), float(np_state[4])),
            "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else []}


def set_rng_state(learn, state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    train_loader(learn).rng.setstate(_tuples(state["loader"]))
    has_gauss, gauss = state["numpy_gauss"]
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         has_gauss, gauss))
    _set_cuda_rng_state(state.get("cuda") or [])  # none in a CPU run's checkpoint, or in an earlier version's


def _set_cuda_rng_state(states: list) -> None:
    if not states:
        return
    if not torch.cuda.is_available():
        logger.info("note: the checkpoint holds the CUDA generators' state of a GPU run; on this CPU it is not needed, "
            "and augmentation draws from the CPU's generator instead")
        return
    if len(states) != torch.cuda.device_count():
        logger.info(f"note: the checkpoint holds {len(states)} CUDA generator(s) and this machine has "
            f"{torch.cuda.device_count()} GPU(s); they are not restored, so random augmentation differs from the "
            "uninterrupted run")
        return
    torch.cuda.set_rng_state_all(states)


class Checkpoint(_TrainedEpochsOnly, Callback):
    """Writes ``checkpoint.pth`` atomically after every trained epoch: model, optimizer, the
    phase and epoch reached, RNG states, history and the trackers' state: all that
    ``--resume`` needs to continue the same one-cycle schedule.

    The state is copied to the CPU at the end of the epoch and written to disk by a background
    thread while the next epoch trains (serialising and flushing three times the model's size
    would otherwise hold up training); ``wait()`` returns once the last write is on disk and
    raises its error, if any, and the fit's end waits for it.

    With ``skip_last``, the last epoch of the final phase is not saved: the run exports its model
    right after it and then removes the checkpoint, so writing it would only cost time (a run
    killed while exporting resumes from the epoch before). ``restore``: a resumed run's checkpoint,
    whose callback states are put back when its first fit starts."""

    order = TrackerCallback.order + 5

    def __init__(self, path, skip_last: bool = True, restore: dict | None = None):
        self.path, self.skip_last, self.restore = path, skip_last, restore
        self._writer, self._error = None, None

    def _stateful(self) -> list:
        return [cb for cb in self.learn.cbs if isinstance(cb, Stateful)]

    def before_fit(self):
        # runs after the trackers' before_fit, which would otherwise reset what was restored
        if self.restore is None:
            return
        state, self.restore = self.restore, None
        # the train_loss column is a running average over the whole fit: carry it across the restart
        count, val = state["smooth_loss"]
        self.learn.recorder.smooth_loss.count, self.learn.recorder.smooth_loss.val = count, torch.tensor(val)
        for cb in self._stateful():
            cb.load_state_dict(state)

    def after_epoch(self):
        phase = run_phase(self.learn)
        if not self._trained or (self.skip_last and phase.final and self.epoch + 1 == self.n_epoch):
            return
        best = getattr(self.learn, "keep_best_model", None)
        if best is not None:  # --resume must find the best weights: in this checkpoint, or in best.pth
            best.persist()
        state = {
            "model": _plain(bare_model(self.learn).state_dict()),
            "opt": plain_opt_state(self.learn.opt.state_dict()),
            "phase": phase.phase,
            "epochs_done": self.epoch + 1,
            "rng": rng_state(self.learn),
            "smooth_loss": (int(self.learn.recorder.smooth_loss.count), float(self.learn.recorder.smooth_loss.val)),
        }
        for cb in self._stateful():
            state.update(cb.state_dict())
        self.wait()
        self._writer = threading.Thread(target=self._write, args=(state,), name="checkpoint-writer")
        self._writer.start()

    def _write(self, state: dict) -> None:
        try:
            with atomic_path(self.path, durable=True) as tmp:
                try:
                    torch.save(state, tmp)
                except RuntimeError as e:  # torch reports a failed write (a full disk) as a RuntimeError
                    raise OSError(_write_error(e)) from None
        except BaseException as e:  # handed to the training thread by wait()
            self._error = e

    def wait(self) -> None:
        """Block until the last checkpoint is written; raise what writing it raised."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def after_fit(self):
        self.wait()


def _plain(obj):
    """Tensors and plain Python values only: fastcore's ``L`` and numpy scalars become lists and
    floats, so the checkpoint loads with ``torch.load(weights_only=True)``, which refuses them.
    Tensors are copied to the CPU: training goes on changing the originals in place."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) or type(obj).__name__ == "L":
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def plain_opt_state(sd: dict) -> dict:
    """torch's optimizer state dict: the per-parameter state as CPU tensors, the param groups'
    numbers and flags as plain Python values (fastai's scheduler sets numpy floats), ``betas``
    still a tuple, as torch's AdamW keeps it."""
    def plain_group(group: dict) -> dict:
        return {k: tuple(_plain(v)) if isinstance(v, tuple) else _plain(v) for k, v in group.items()}

    return {"state": _plain(sd["state"]), "param_groups": [plain_group(g) for g in sd["param_groups"]]}


def load_opt_state(opt, sd: dict) -> None:
    opt.load_state_dict({"state": dict(sd["state"]), "param_groups": [dict(g) for g in sd["param_groups"]]})


def _tuples(obj):
    """random.setstate wants the tuples that the checkpoint stored as lists."""
    return tuple(_tuples(v) for v in obj) if isinstance(obj, (list, tuple)) else obj


def _write_error(e: RuntimeError) -> str:
    """What a failed ``torch.save`` says went wrong (its message names the C++ writer first)."""
    text = str(e)
    for cause in ("No space left on device", "Disk quota exceeded", "Read-only file system", "Input/output error"):
        if cause in text:
            return cause
    return (text.splitlines() or [type(e).__name__])[0][:150]


def load_checkpoint(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def read_resume(run_dir: Path) -> tuple[dict, dict]:
    """The saved config and the checkpoint of the run in ``run_dir``, both checked as strictly as a
    new run's flags: a hand-edited or damaged file is one error here, not a run that trains on it."""
    ckpt_path = run_dir / CHECKPOINT
    if not (run_dir / CONFIG).is_file():
        raise HPAError(f"--resume {run_dir}: not a run folder (no config.json)")
    if not ckpt_path.is_file():
        raise HPAError(f"--resume {run_dir}: no checkpoint.pth (the run ended before its first epoch); start it again")
    saved = read_config(run_dir)
    if not {"lr_used", "pretrained_used"} <= set(saved):
        raise HPAError(f"{run_dir / CONFIG}: not the config of a run that trained an epoch "
                       "(no lr_used, pretrained_used); start it again")
    try:
        ckpt = load_checkpoint(ckpt_path)
    except Exception as e:  # torch.load raises many types for a damaged file, some with no message
        reason = (str(e).splitlines() or [type(e).__name__])[0][:150]
        raise HPAError(f"{ckpt_path}: unreadable checkpoint ({reason})") from None
    missing = CHECKPOINT_KEYS - set(ckpt) if isinstance(ckpt, dict) else CHECKPOINT_KEYS
    if missing:
        raise HPAError(f"{ckpt_path}: not a checkpoint of this project (missing {', '.join(sorted(missing))})")
    opt = ckpt["opt"]
    if isinstance(opt, dict) and "hypers" in opt:
        raise HPAError(f"{ckpt_path}: written by an earlier version, whose optimizer (fastai's Adam) kept its state "
                       "in another form; this version trains with torch's AdamW and cannot continue it: start the "
                       "run again")
    check_checkpoint(ckpt, ckpt_path)
    return saved, ckpt


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_resumed_values(saved: dict, where: Path) -> None:
    """What a resumed run takes from its config.json beyond the flags (which ``validate`` checks):
    the stains it was resolved to, the learning rate it trained with, whether it started from
    ImageNet weights, the precision and the normalisation; the bounds are those a new run can
    produce and model.json's."""
    from ..data.layouts import CHANNEL_SETS
    from ..device import PRECISIONS

    channels = saved.get("channels")
    if not (isinstance(channels, str) and channels in CHANNEL_SETS):
        raise HPAError(f"{where}: 'channels' must be one of {', '.join(CHANNEL_SETS)} (got {channels!r:.40})")
    n_in = len(CHANNEL_SETS[channels])

    def numbers(values, ok) -> bool:
        return isinstance(values, list) and len(values) == n_in and all(_number(x) and ok(x) for x in values)

    checks = [
        ("lr_used", _number(saved.get("lr_used")) and 0 < saved["lr_used"] < 1e3, "a positive number below 1000"),
        ("pretrained_used", isinstance(saved.get("pretrained_used"), bool), "true or false"),
        ("precision_used", saved.get("precision_used", "fp32") in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
        ("mean", "mean" not in saved or numbers(saved["mean"], lambda m: 0 <= m <= 1), f"a list of {n_in} numbers in 0..1"),
        ("std", "std" not in saved or numbers(saved["std"], lambda s: 1e-3 <= s <= 1),
         f"a list of {n_in} numbers in 0.001..1"),
    ]
    for key, ok, want in checks:
        if not ok:
            raise HPAError(f"{where}: {key!r} must be {want} (got {saved.get(key)!r:.60})")


def check_checkpoint(ckpt: dict, where: Path) -> None:
    """The checkpoint's plain values and its weights: a number of epochs, a history of numbers, a
    running loss, finite weights (a NaN weight would train to nothing and stop with a NaN loss)."""
    def bad(key: str, want: str):
        raise HPAError(f"{where}: {key!r} must be {want} (got {ckpt.get(key)!r:.60})")

    done = ckpt["epochs_done"]
    if not (isinstance(done, int) and not isinstance(done, bool) and 1 <= done <= 100_000):
        bad("epochs_done", "a number of epochs, 1 or more")
    if not isinstance(ckpt["phase"], str):
        bad("phase", "the name of a phase")
    history = ckpt["history"]
    if not (isinstance(history, list) and all(isinstance(r, dict) and all(isinstance(k, str) for k in r) for r in history)):
        bad("history", "a list of epoch rows")
    smooth = ckpt["smooth_loss"]
    if not (isinstance(smooth, (list, tuple)) and len(smooth) == 2 and isinstance(smooth[0], int)
            and _number(smooth[1])):
        bad("smooth_loss", "a count and a finite number")
    model = ckpt["model"]
    if not isinstance(model, dict) or not all(isinstance(v, torch.Tensor) for v in model.values()):
        bad("model", "a state dict of tensors")
    for name, tensor in model.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise HPAError(f"{where}: weight {name!r:.80} is not finite (NaN or infinity); the run cannot continue "
                           "from it: start it again")


def restore(learn, ckpt: dict) -> int:
    """Put model, optimizer and RNG back as they were after the checkpoint's epoch; the callbacks'
    state follows when the fit starts (``Checkpoint(restore=ckpt)``). Returns the epochs done in the
    checkpoint's phase."""
    try:
        bare_model(learn).load_state_dict(ckpt["model"])
        if learn.opt is None:
            learn.create_opt()
        load_opt_state(learn.opt, ckpt["opt"])
    except (RuntimeError, AssertionError, KeyError, ValueError, TypeError) as e:
        raise HPAError(f"checkpoint.pth does not fit this run's model ({str(e).splitlines()[0][:150]})") from None
    try:
        set_rng_state(learn, ckpt["rng"])
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
        raise HPAError(f"checkpoint.pth: its random state is damaged ({type(e).__name__}: {str(e)[:100]}); "
                       "start the run again") from None
    return ckpt["epochs_done"]
