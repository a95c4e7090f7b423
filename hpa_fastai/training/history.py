"""The run's history: one row per trained epoch, kept current in ``history.csv``.

It prints nothing: whoever runs the training shows the rows as they come (the command line's
``cli.progress.EpochProgress`` reads them from ``learn.run_history``; a notebook keeps fastai's own
progress display).
"""
from __future__ import annotations

import time

import pandas as pd
from fastai.callback.core import Callback
from fastai.learner import Recorder

from ..atomic import write_csv
from .callbacks import Stateful, run_phase


class RunHistory(Stateful, Callback):
    """Epochs are numbered across fits, so the frozen and unfrozen phases of a pretrained model form
    one history; each row has the phase, the recorder's losses and metrics, the learning rate at the
    end of the epoch and its seconds. ``lr_find`` and ``get_preds`` send epoch events too: only
    epochs that trained are kept."""

    order = Recorder.order + 1

    def __init__(self, path=None):
        self.path = path
        self.rows: list[dict] = []

    def state_dict(self) -> dict:
        return {"history": list(self.rows)}

    def load_state_dict(self, state: dict) -> None:
        self.rows = list(state["history"])

    def before_train(self):
        self.trained = not hasattr(self.learn, "lr_finder")

    def after_epoch(self):
        trained, self.trained = getattr(self, "trained", False), False
        if not trained:
            return
        names = self.recorder.metric_names[1:-1]
        row = {"epoch": len(self.rows) + 1, "phase": run_phase(self.learn).phase}
        row.update({n: float(v) if v is not None else float("nan") for n, v in zip(names, self.recorder.log[1:-1])})
        row["lr"] = float(self.opt.hypers[-1]["lr"])
        row["seconds"] = round(time.time() - self.recorder.start_epoch, 2)
        self.rows.append(row)
        if self.path is not None:
            write_csv(self.path, pd.DataFrame(self.rows))
