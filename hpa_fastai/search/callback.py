"""The fastai callback that connects a fit to an Optuna trial: after every trained epoch it reports the
epoch's validation score and stops the fit when the study's pruner says the trial is clearly worse
than the others at the same epoch.

It works on any fastai Learner, a run of the training door or a notebook's::

    learn = hpa_learner(dls, "resnet18", pretrained=False)
    learn.fit_one_cycle(5, lr, cbs=OptunaPruning(trial, "f1_macro"))   # raises optuna.TrialPruned

(Optuna's own fastai callback lives in a separate package that pins an old fastcore.)
"""
from __future__ import annotations

import math
from pathlib import Path

import optuna
from fastai.callback.core import Callback
from fastai.learner import Recorder


class OptunaPruning(Callback):
    """Reports ``monitor`` (a metric's name as the Recorder shows it, e.g. ``f1_macro`` or
    ``valid_loss``) to ``trial`` after each trained epoch, numbered across the fits of a run (a
    pretrained model's frozen and unfrozen phases), and raises ``optuna.TrialPruned`` when the
    pruner says so. Epochs sent by ``lr_find`` and ``get_preds`` are not counted.

    ``pruned_at`` (the epoch) and ``run_dir`` (the Learner's path) say where it stopped."""

    order = Recorder.order + 2  # after the Recorder and the run's history have the epoch's values

    def __init__(self, trial: "optuna.trial.Trial", monitor: str = "f1_macro"):
        self.trial, self.monitor = trial, monitor
        self.reported, self.pruned_at, self.run_dir, self.last_value = 0, None, None, None

    def before_fit(self):
        self.run_dir = Path(self.learn.path)
        self._trained = False

    def before_epoch(self):
        self._trained = False

    def before_train(self):
        self._trained = not hasattr(self.learn, "lr_finder")

    def after_epoch(self):
        if not self._trained:
            return
        names = self.recorder.metric_names[1:-1]  # epoch ... time: the values the Recorder logged
        if self.monitor not in names:
            raise ValueError(f"OptunaPruning: no {self.monitor!r} among the recorded values ({', '.join(names)})")
        value = self.recorder.log[1:-1][names.index(self.monitor)]
        self.reported += 1
        value = float(value) if value is not None else float("nan")
        self.last_value = value
        if math.isfinite(value):  # a NaN loss is the NaN guard's to report, not a score
            self.trial.report(value, self.reported)
        if self.trial.should_prune():
            self.pruned_at = self.reported
            # fastai rewrites the message of an exception from a callback; the attributes carry it
            raise optuna.TrialPruned(f"pruned after epoch {self.reported}: {self.monitor} {value:.4f}")
