"""The command line's view of a training run, as a fastai callback that the training door takes
among its extra callbacks: a live bar over each epoch's batches in a terminal, and one line per
trained epoch (the row the run's history just kept) in a terminal and in a log alike: its losses,
scores, learning rate and seconds, and its phase only where the phase changes (``frozen``, then
``unfrozen`` for a pretrained model; a run of one phase never names it)."""
from __future__ import annotations

from fastai.callback.core import Callback
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..console import console, fmt

SPECS = {"lr": ".2e", "seconds": ".1f"}


def epoch_line(row: dict, previous: dict | None) -> str:
    """``epoch 3  train_loss 0.6910  valid_loss ...  lr 1.00e-03  4.2s``, with ``(unfrozen)`` after the
    number on the first epoch of a phase that follows another."""
    phase = row.get("phase")
    first_of_phase = phase not in (None, "train") and (previous is None or previous.get("phase") != phase)
    head = f"epoch {row['epoch']}" + (f" ({phase})" if first_of_phase else "")
    values = [f"{k} {fmt(v, SPECS.get(k, '.4f'))}" for k, v in row.items() if k not in ("epoch", "phase", "seconds")]
    seconds = f"{fmt(row['seconds'], '.1f')}s" if "seconds" in row else ""
    return "  ".join([head, *values, seconds]).rstrip()


class EpochProgress(Callback):
    """Reads ``learn.run_history`` (the training stage's ``RunHistory``), after it has kept the epoch."""

    order = 100

    def __init__(self, out=console):
        self.out, self.bar = out, None

    def before_epoch(self):
        self.rows_before = len(self.learn.run_history.rows)

    def before_train(self):
        if not self.out.is_terminal or hasattr(self.learn, "lr_finder"):
            return
        self.bar = Progress(TextColumn(f"epoch {self.rows_before + 1}"), BarColumn(), MofNCompleteColumn(),
                            TimeRemainingColumn(), console=self.out, transient=True)
        self.bar.start()
        self.task = self.bar.add_task("", total=len(self.dls.train) + len(self.dls.valid))

    def after_batch(self):
        if self.bar is not None:
            self.bar.advance(self.task)

    def after_epoch(self):
        self._stop_bar()
        rows = self.learn.run_history.rows
        if len(rows) > getattr(self, "rows_before", len(rows)):
            self.out.print(epoch_line(rows[-1], rows[-2] if len(rows) > 1 else None), markup=False, highlight=False)

    def after_fit(self):
        self._stop_bar()

    def _stop_bar(self):
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
