"""Training policies as small functions: fastai's learning-rate finder with its suggestions and the
rule ``--lr auto`` picks by, the learning rate a run uses, the one-cycle phases of a run (for a
pretrained model, a fit with the body frozen, then one of everything with discriminative learning
rates: the two fits of fastai's ``fine_tune``, with its rates and one-cycle settings, each a phase
that ``--resume`` can continue), and the one-cycle fit itself (fastai's, its schedules computed in
plain numbers)."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from fastai.callback.core import Callback
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
# --lr auto when lr_find's curve says nothing (too few points, no fall in the loss): fastai's own
# default rate for fit_one_cycle, which trained every synthetic set of bench/quality.py
FALLBACK_LR = 1e-3
MIN_POINTS = 8  # fewer finite points than this are too few to read a curve from
# Fewer lr_find iterations than this (a data set of fewer than 10 batches: the bundled sample has 4)
# make a curve too noisy to read: bench/quality.py measured min/10 of such curves choosing 1e-2 or
# 6e-4 by chance, and 1e-3 training better on both sample-sized sets
MIN_ITERS = 50
# the smoothed loss must fall by this share of its starting value before its minimum means anything:
# a flat curve's minimum is noise
MIN_DROP = 0.03


class RawLosses(Callback):
    """The loss of each batch lr_find trains on, as it is: fastai's recorder keeps an average
    smoothed over about 50 batches (beta 0.98), which on a short run lags the real loss by much of
    the range tried and puts its valley too low."""

    def __init__(self):
        self.losses: list[float] = []

    def after_loss(self):
        if self.training:
            self.losses.append(float(self.loss.detach()))


@dataclass
class LrChoice:
    """The learning rate ``--lr auto`` takes from an lr_find curve, the rule that gave it, and,
    when the curve could not be read (too few points, flat), why the fallback was used."""
    lr: float
    rule: str
    problem: str | None = None


def smooth(losses: np.ndarray, window: int) -> np.ndarray:
    """A centred moving average of ``window`` points (odd), the ends padded with their own values."""
    half = window // 2
    padded = np.r_[np.full(half, losses[0]), losses, np.full(half, losses[-1])]
    return np.convolve(padded, np.ones(window) / window, mode="valid")


def smoothing_window(n_points: int) -> int:
    return max(3, n_points // 10) | 1


def auto_lr(lrs, raw_losses, iters: int | None = None) -> LrChoice:
    """``--lr auto``: a tenth of the learning rate at the minimum of the loss, smoothed over a tenth
    of the points (the rule fastai's ``minimum`` suggestion states, on a curve that does not lag);
    ``FALLBACK_LR`` when lr_find ran fewer than ``MIN_ITERS`` iterations, the curve has fewer than
    ``MIN_POINTS`` finite points or its smoothed loss never falls by ``MIN_DROP`` of where it started."""
    if iters is not None and iters < MIN_ITERS:
        return LrChoice(FALLBACK_LR, "fallback", f"lr_find ran {iters} iterations (a small data set), fewer than "
                                                 f"the {MIN_ITERS} its curve needs to be read")
    lrs, losses = np.asarray(lrs, float), np.asarray(raw_losses, float)
    n = min(len(lrs), len(losses))
    finite = np.isfinite(losses[:n])
    n = int(np.argmin(finite)) if not finite.all() else n  # up to the first loss that is not finite
    if n < MIN_POINTS:
        return LrChoice(FALLBACK_LR, "fallback", f"lr_find gave {n} usable point(s), fewer than {MIN_POINTS}")
    curve = smooth(losses[:n], smoothing_window(n))
    start = float(np.median(curve[: max(2, n // 8)]))
    low = int(np.argmin(curve))
    drop = (start - curve[low]) / max(abs(start), 1e-12)
    if drop < MIN_DROP:
        return LrChoice(FALLBACK_LR, "fallback", f"the loss fell by {max(drop, 0):.1%} over the range tried, "
                                                 f"less than {MIN_DROP:.0%}: the curve is flat")
    return LrChoice(float(lrs[low]) / 10, "minimum / 10")


def find_lr(learn, run_dir: Path, iters: int) -> dict:
    """Run fastai's LR finder, save its plot and table (``lr_find.json``: fastai's four suggestions,
    ``null`` where one found nothing, and the ``auto`` rule's choice), and return the suggestions,
    ``auto`` among them."""
    raw = RawLosses()
    with learn.no_logging(), learn.added_cbs([raw]):
        learn.lr_find(num_it=iters, show_plot=False, suggest_funcs=None)
    lrs = [float(x) for x in learn.recorder.lrs]
    losses = [float(x) for x in learn.recorder.losses]  # fastai's smoothed ones
    raw_losses = raw.losses[: len(lrs)]
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
    choice = auto_lr(lrs, raw_losses, iters)
    suggestions["auto"] = choice.lr
    # the whole range tried: every batch's loss, and the curve the auto rule read (up to the first
    # loss that is not finite)
    finite = np.isfinite(raw_losses)
    n_finite = len(raw_losses) if finite.all() else int(np.argmin(finite))
    curve = smooth(np.asarray(raw_losses[:n_finite]), smoothing_window(n_finite)) if n_finite else np.array([])
    plot = run_dir / LR_FIND_PLOT
    plots.lr_find_plot(plot, lrs[: len(raw_losses)], raw_losses, [float(x) for x in curve],
                       {k: v for k, v in suggestions.items() if math.isfinite(v)}, chosen=choice.lr)
    # losses: fastai's smoothed ones, which its four suggestions read; raw_losses: each batch's own
    write_json(run_dir / LR_FIND, {"suggestions": suggestions, "auto_rule": choice.rule, "auto_problem": choice.problem,
                                   "iterations": iters, "lrs": lrs, "losses": losses, "raw_losses": raw_losses})
    found = [f"{k} {v:.2e}" for k, v in suggestions.items() if math.isfinite(v) and k != "auto"]
    missing = [k for k, v in suggestions.items() if not math.isfinite(v)]
    logger.info("lr_find suggestions: " + ", ".join(found)
                + (f" ({', '.join(missing)}: none found on {len(lrs)} points)" if missing else ""))
    if choice.problem:
        logger.warning(f"--lr auto: {choice.problem}; using {FALLBACK_LR:g} (see {plot}, or pass --lr, or "
                       f"--lr-find-iters)")
    return suggestions


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
    """The run's learning rate: a resumed run's own, ``--lr``, or lr_find's: ``auto`` (see ``auto_lr``)
    or ``valley``, fastai's valley suggestion."""
    if saved_config is not None:
        return saved_config["lr_used"]
    if cfg.lr not in ("auto", "valley"):
        return float(cfg.lr)
    # rank 0 alone, before the processes are joined; the others wait for its answer
    lr = distributed.share(find_lr(learn, run_dir, cfg.lr_find_iters or auto_lr_find_iters(learn))[cfg.lr]
                           if distributed.is_main() else None)
    if not (math.isfinite(lr) and lr > 0):
        raise HPAError(f"lr_find found no {cfg.lr} suggestion (the loss never decreased); pass --lr")
    logger.info(f"learning rate {lr:.3e} (lr_find {cfg.lr})")
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
    """fastai's ``ParamScheduler``, reading the Learner's attributes directly (fastai's go through
    fastcore's attribute forwarding, a few times a batch) and recording the values it set from the
    optimizer's last layer group directly (fastai's builds every group's hyper-parameters for each)."""

    def before_batch(self):
        learn = self.learn
        for name, sched in self.scheds.items():
            learn.opt.set_hyper(name, sched(learn.pct_train))

    def after_batch(self):
        opt = self.learn.opt
        for name in self.scheds:
            self.hps[name].append(last_hyper(opt, name))
