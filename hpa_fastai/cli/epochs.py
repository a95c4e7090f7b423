"""The command line's view of a training run, as a fastai callback that the training door takes
among its extra callbacks: a live bar over each epoch's batches in a terminal, and one line per
trained epoch (the row the run's history just kept) in a terminal and in a log alike."""
from __future__ import annotations

from fastai.callback.core import Callback
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..console import console, fmt

SPECS = {"lr": ".2e", "seconds": ".1f"}


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
            self.out.print("  ".join(f"{k} {fmt(v, SPECS.get(k, '.4f'))}" for k, v in rows[-1].items()),
                           markup=False, highlight=False)

    def after_fit(self):
        self._stop_bar()

    def _stop_bar(self):
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
