"""Training policies as small functions: fastai's learning-rate finder with its four suggestions,
the learning rate a run uses, the one-cycle phases of a run (for a pretrained model, a fit with
the body frozen, then one of everything with discriminative learning rates: the two steps of
fastai's ``fine_tune``, with this module's own rates and one-cycle defaults), and the one-cycle fit
itself (fastai's, its schedules computed in plain numbers)."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
from fastai.callback.schedule import ParamScheduler, minimum, slide, steep, valley

from .. import plots
from ..atomic import write_json
from ..config import TrainConfig
from ..errors import HPAError
from ..runs.folder import LR_FIND, LR_FIND_PLOT
from . import distributed
from .optimizer import last_hyper

logger = logging.getLogger(__name__)


SUGGESTIONS = {"valley": valley, "slide": slide, "minimum": minimum, "steep": steep}


def find_lr(learn, run_dir: Path, iters: int) -> dict:
    """Run fastai's LR finder, save its plot and table with the four suggestions (NaN where one
    found nothing; ``null`` in lr_find.json), and return them."""
    with learn.no_logging():
        learn.lr_find(num_it=iters, show_plot=False, suggest_funcs=None)
    lrs = [float(x) for x in learn.recorder.lrs]
    losses = [float(x) for x in learn.recorder.losses]
    # fastai's suggestion functions, on the slice lr_find itself uses; computed here one by one
    # because `slide` raises IndexError on short runs (few batches) instead of giving no answer.
    lo, hi = iters // 10, max(len(lrs) - 5, iters // 10 + 2)
    t_lrs, t_losses = torch.tensor(lrs[lo:hi]), torch.tensor(losses[lo:hi])
    finite = torch.isfinite(t_losses)
    if not finite.all():
        cut = int((~finite).nonzero()[0])
        t_lrs, t_losses = t_lrs[:cut], t_losses[:cut]
    suggestions = {}
    for name, func in SUGGESTIONS.items():
        try:
            suggestions[name] = float(func(t_lrs, t_losses, iters)[0])
        except (IndexError, RuntimeError, ValueError):
            suggestions[name] = float("nan")
    shown = {k: v for k, v in suggestions.items() if math.isfinite(v)}
    skip = 5 if len(lrs) > 10 else 0
    plots.lr_find_plot(run_dir / LR_FIND_PLOT, lrs[: len(lrs) - skip], losses[: len(losses) - skip], shown)
    # JSON has no NaN: strict parsers refuse the bare NaN that Python's json writes
    write_json(run_dir / LR_FIND, {"suggestions": {k: _finite_or_none(v) for k, v in suggestions.items()},
                                   "lrs": lrs, "losses": [_finite_or_none(x) for x in losses]})
    logger.info("lr_find suggestions: " + ", ".join(f"{k} {v:.3e}" for k, v in suggestions.items()))
    if not (math.isfinite(suggestions["valley"]) and suggestions["valley"] > 0):
        raise HPAError("lr_find found no usable learning rate (the loss never decreased); pass --lr")
    return suggestions


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def auto_lr_find_iters(learn) -> int:
    """100 iterations (fastai's default) on a real data set; on a tiny one, about five epochs' worth."""
    return int(min(100, max(20, 5 * len(learn.dls.train))))


def phases(cfg: TrainConfig, lr: float, pretrained: bool) -> list[tuple[str, int, object]]:
    """(phase, epochs, learning rate) of each one-cycle fit: a pretrained body first trains
    frozen at ``lr``, then everything with discriminative rates from ``lr/100`` to ``lr/2``."""
    if pretrained and cfg.freeze_epochs > 0:
        return [("frozen", cfg.freeze_epochs, lr), ("unfrozen", cfg.epochs, slice(lr / 100, lr / 2))]
    return [("train", cfg.epochs, lr)]


def learning_rate(cfg: TrainConfig, learn, run_dir: Path, saved_config: dict | None) -> float:
    """The run's learning rate: a resumed run's own, ``--lr``, or lr_find's valley suggestion."""
    if saved_config is not None:
        return saved_config["lr_used"]
    if cfg.lr != "auto":
        return float(cfg.lr)
    # rank 0 alone, before the processes are joined; the others wait for its answer
    lr = distributed.share(find_lr(learn, run_dir, cfg.lr_find_iters or auto_lr_find_iters(learn))["valley"]
                           if distributed.is_main() else None)
    logger.info(f"learning rate {lr:.3e} (lr_find valley)")
    return lr


def combined_cos(pct: float, start, middle, end):
    """fastai's ``combined_cos``: cosine annealing from ``start`` to ``middle`` over the first ``pct``
    of training, then to ``end`` (each a number, or one per layer group). fastai's finds the segment
    and the position in it with CPU tensor operations and ``.item()``, and anneals numpy arrays, for
    every hyper-parameter before every batch: host time that a GPU step then waits for. These are
    fastai's formulas (``sched_cos``) on plain Python numbers."""
    many = np.ndim(start) > 0
    start, middle, end = ([float(x) for x in np.atleast_1d(v)] for v in (start, middle, end))

    def cos(a: list, b: list, pos: float):
        w = (1 + math.cos(math.pi * (1 - pos))) / 2
        return [x + w * (y - x) for x, y in zip(a, b)]

    def schedule(pos: float):
        values = cos(start, middle, pos / pct) if pos < pct else cos(middle, end, (pos - pct) / (1 - pct))
        return values if many else values[0]

    return schedule


def fit_one_cycle(learn, n_epoch: int, lr_max, cbs=(), start_epoch: int = 0, div: float = 25.0,
                  div_final: float = 1e5, pct_start: float = 0.25) -> None:
    """fastai's ``Learner.fit_one_cycle`` (learning rate up from ``lr_max / div`` to ``lr_max`` over
    the first ``pct_start`` of the fit, then down to ``lr_max / div_final``; momentum the other way),
    with ``combined_cos`` above."""
    if learn.opt is None:
        learn.create_opt()
    learn.opt.set_hyper("lr", lr_max)
    lr_max = np.array([h["lr"] for h in learn.opt.hypers])
    scheds = {"lr": combined_cos(pct_start, lr_max / div, lr_max, lr_max / div_final),
              "mom": combined_cos(pct_start, *learn.moms)}
    learn.fit(n_epoch, cbs=[HostParamScheduler(scheds), *cbs], start_epoch=start_epoch)


class HostParamScheduler(ParamScheduler):
    """fastai's ``ParamScheduler``, recording the values it set from one reading of the optimizer's
    hyper-parameters per batch (fastai's reads them once per scheduled parameter)."""

    def after_batch(self):
        for name in self.scheds:
            self.hps[name].append(last_hyper(self.learn.opt, name))
