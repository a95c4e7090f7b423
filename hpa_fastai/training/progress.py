"""Per-epoch progress that stays readable in logs, and the run's history.

fastai's own progress bars print carriage returns when stdout is not a terminal; ``EpochLogger``
replaces them: a live bar in a terminal, one plain line per epoch elsewhere.
"""
from __future__ import annotations

import time

import pandas as pd
from fastai.callback.core import Callback
from fastai.learner import Recorder
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..atomic import write_csv
from ..console import console, fmt
from .callbacks import Stateful


SPECS = {"lr": ".2e", "seconds": ".1f"}


class EpochLogger(Stateful, Callback):
    """Prints one line per epoch (or a live bar in a terminal) and keeps ``history.csv`` current.

    Epochs are numbered across fits, so the frozen and unfrozen phases of a pretrained model
    form one history.
    """

    order = Recorder.order + 1

    def __init__(self, history_path=None, out=console, quiet: bool = False):
        self.history_path, self.out, self.quiet = history_path, out, quiet
        self.rows: list[dict] = []
        self.progress = None
        self.phase = "train"

    def state_dict(self) -> dict:
        return {"history": list(self.rows)}

    def load_state_dict(self, state: dict) -> None:
        self.rows = list(state["history"])

    @property
    def _active(self) -> bool:
        # get_preds and lr_find send epoch events too; only epochs that trained are logged
        return not self.quiet and not hasattr(self.learn, "lr_finder")

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
