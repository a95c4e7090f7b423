"""Console output: rich tables, and per-epoch progress that stays readable in logs.

fastai's own progress bars print carriage returns when stdout is not a terminal; they are
replaced here by ``EpochLogger``: a live bar in a terminal, one plain line per epoch elsewhere.
"""
from __future__ import annotations

import math
import time

import pandas as pd
from fastai.callback.core import Callback
from fastai.learner import Recorder
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from ._io import write_csv

console = Console(highlight=False)
if not console.is_terminal:
    # a log file has no width; rich's 80-column default would fold tables and epoch lines
    console = Console(highlight=False, width=160)


def plain(text) -> str:
    """``text`` as it may reach a terminal: control characters (escape sequences that retitle the
    window or clear the screen, carriage returns, bidirectional overrides) written as repr() escapes.
    File names, ids and values read from files pass through here before they are printed."""
    text = str(text)
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def log(msg: str = "") -> None:
    console.print(plain(msg), markup=False, soft_wrap=True)


def table(title: str, df: pd.DataFrame, floats: str = "{:.4f}") -> Table:
    """A rich table of ``df``; title, headers and cells are plain text (no rich markup, no control characters)."""
    t = Table(title=Text(plain(title)), title_justify="left")
    for col in df.columns:
        t.add_column(escape(plain(col)), justify="right" if df[col].dtype.kind in "iuf" else "left")
    for row in df.itertuples(index=False):
        t.add_row(*[Text(plain(floats.format(v) if isinstance(v, float) else v)) for v in row])
    return t


def fmt(v, spec: str = ".4f") -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else format(v, spec)
    return str(v)


SPECS = {"lr": ".2e", "seconds": ".1f"}


class EpochLogger(Callback):
    """Prints one line per epoch (or a live bar in a terminal) and keeps ``history.csv`` current.

    Epochs are numbered across fits, so the frozen and unfrozen phases of a pretrained model
    form one history.
    """

    order = Recorder.order + 1

    def __init__(self, history_path=None, out=console):
        self.history_path, self.out = history_path, out
        self.rows: list[dict] = []
        self.progress = None
        self.phase = "train"

    @property
    def _active(self) -> bool:
        # get_preds and lr_find send epoch events too; only epochs that trained are logged
        return not hasattr(self.learn, "lr_finder") and not getattr(self.learn, "_hpa_quiet", False)

    def before_train(self):
        self.trained = True
        if not self._active or not self.out.is_terminal:
            return
        self.progress = Progress(TextColumn(f"epoch {len(self.rows) + 1}"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), console=self.out, transient=True)
        self.progress.start()
        self.task = self.progress.add_task("", total=len(self.dls.train) + len(self.dls.valid))

    def after_batch(self):
        if self.progress is not None:
            self.progress.advance(self.task)

    def after_epoch(self):
        trained, self.trained = getattr(self, "trained", False), False
        if not self._active or not trained:
            return
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        names = self.recorder.metric_names[1:-1]
        row = {"epoch": len(self.rows) + 1, "phase": self.phase}
        row.update({n: float(v) if v is not None else float("nan") for n, v in zip(names, self.recorder.log[1:-1])})
        row["lr"] = float(self.opt.hypers[-1]["lr"])
        row["seconds"] = round(time.time() - self.recorder.start_epoch, 2)
        self.rows.append(row)
        self.out.print("  ".join(f"{k} {fmt(v, SPECS.get(k, '.4f'))}" for k, v in row.items()), markup=False, highlight=False)
        if self.history_path is not None:
            write_csv(self.history_path, pd.DataFrame(self.rows))
