"""Training policies as small functions: fastai's learning-rate finder with its four suggestions,
the learning rate a run uses, and the one-cycle phases of a run (for a pretrained model, a fit with
the body frozen, then one of everything with discriminative learning rates: the two fits of
fastai's ``fine_tune``, with its rates and one-cycle settings, each a phase that ``--resume`` can
continue)."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from fastai.callback.schedule import minimum, slide, steep, valley

from .. import plots
from ..atomic import write_json
from ..config import TrainConfig
from ..errors import HPAError
from ..runs.folder import LR_FIND, LR_FIND_PLOT
from . import distributed

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


@dataclass(frozen=True)
class Phase:
    """One one-cycle fit of a run: its name, epochs, learning rate (a number, or a slice for
    discriminative rates from the first parameter group to the last), and the share of its steps
    that warm up (``pct_start``) from ``lr / div``."""
    name: str
    epochs: int
    lr: object
    pct_start: float = 0.25  # fastai's fit_one_cycle defaults
    div: float = 25.0

    def one_cycle(self) -> dict:
        return {"pct_start": self.pct_start, "div": self.div}


# fastai's fine_tune (fastai/callback/schedule.py), step for step: the head trains with the body
# frozen at the base rate, warming up over almost the whole phase; then everything trains at half the
# base rate for the head and 1/LR_MULT of that for the body, with a shorter warm-up from a higher start
FROZEN_PCT_START = 0.99
UNFROZEN_LR_FACTOR = 0.5
LR_MULT = 100
UNFROZEN_PCT_START = 0.3
UNFROZEN_DIV = 5.0


def phases(cfg: TrainConfig, lr: float, pretrained: bool) -> list[Phase]:
    """The one-cycle fits of a run: a pretrained body (ImageNet weights, or a run's) follows fastai's
    ``fine_tune`` with ``lr`` as its base rate: ``--freeze-epochs`` with the body frozen (none for 0),
    then ``--epochs`` of everything with discriminative rates; a model from random initialisation
    trains everything at ``lr`` with fastai's ``fit_one_cycle`` defaults."""
    if not pretrained:
        return [Phase("train", cfg.epochs, lr)]
    base = lr * UNFROZEN_LR_FACTOR
    unfrozen = Phase("unfrozen", cfg.epochs, slice(base / LR_MULT, base), pct_start=UNFROZEN_PCT_START,
                     div=UNFROZEN_DIV)
    if cfg.freeze_epochs == 0:
        return [unfrozen]
    # slice(lr): the body's BatchNorm layers, which train while the body is frozen, at lr / 10
    return [Phase("frozen", cfg.freeze_epochs, slice(lr), pct_start=FROZEN_PCT_START), unfrozen]


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
