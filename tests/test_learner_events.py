"""The project's Learner sends fastai's events as fastai's own Learner does: the same events to the
same callbacks in the same order, the cancelling exceptions handled alike, callbacks added or
removed during a fit taken into account from the next event, and the same weights after the fit.
It looks up once which callbacks handle an event, so the traces are compared with callbacks that
handle only some events, one that runs in training only, one with its own ``__call__`` (which gets
every event), one that cancels steps and one that joins in the middle of a fit."""
from __future__ import annotations

import pytest
import torch
from fastai import learner as fastai_learner
from fastai.callback.core import Callback, CancelBatchException, CancelStepException
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from torch import nn

from hpa_fastai.training.learner import Learner
from hpa_fastai.training.optimizer import adamw


def _dls():
    g = torch.Generator().manual_seed(0)
    items = [(torch.randn(6, generator=g), (torch.rand(3, generator=g) > 0.5).float()) for _ in range(24)]
    return DataLoaders(DataLoader(items, bs=4), DataLoader(items[:8], bs=4), device=torch.device("cpu"))


class Trace(Callback):
    """Records the events it handles, with the batch they came in."""

    def __init__(self, log, events, name):
        self.log, self.tag = log, name
        for event in events:
            setattr(self, event, lambda event=event: self.log.append((self.tag, event, self.learn.iter
                                                                        if hasattr(self.learn, "iter") else None)))


class TrainingOnly(Trace):
    run_valid = False


class EveryEvent(Callback):
    """A callback with its own ``__call__``, as fastai's ``VerboseCallback``: every event reaches it."""

    def __init__(self, log):
        self.log = log

    def __call__(self, event_name):
        self.log.append(("every", event_name, None))


class CancelSomeSteps(Callback):
    """Cancels the optimizer step of every third training batch, and the whole of batch 4."""

    def before_step(self):
        if self.learn.iter % 3 == 0:
            raise CancelStepException()

    def after_pred(self):
        if self.learn.training and self.learn.iter == 4:
            raise CancelBatchException()


class JoinsLater(Callback):
    """Adds a callback handling the backward and step events from training batch 2 on."""

    def __init__(self, log):
        self.log, self.joined = log, None

    def before_batch(self):
        if self.learn.training and self.learn.iter == 2 and self.joined is None:
            self.joined = Trace(self.log, ["before_backward", "after_step", "after_cancel_step"], "late")
            self.learn.add_cb(self.joined)

    def after_fit(self):
        if self.joined is not None:
            self.learn.remove_cb(self.joined)


def _fit(cls, extra) -> tuple[list, dict]:
    torch.manual_seed(0)
    log = []
    model = nn.Linear(6, 3)
    learn = cls(_dls(), model, loss_func=nn.BCEWithLogitsLoss(), opt_func=adamw, lr=1e-2)
    learn.remove_cbs([cb for cb in learn.cbs if type(cb).__name__ in ("ProgressCallback",)])
    cbs = [Trace(log, ["before_batch", "after_batch", "after_cancel_batch", "after_loss"], "partial"),
           TrainingOnly(log, ["after_pred", "before_validate"], "training only"), JoinsLater(log),
           *[cb(log) if isinstance(cb, type) else cb for cb in extra]]
    learn.fit(2, cbs=cbs)
    return log, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("extra", [[], [CancelSomeSteps()], [EveryEvent]], ids=["plain", "cancels", "every event"])
def test_events_and_weights_match_fastais_learner(extra):
    ours_log, ours_weights = _fit(Learner, extra)
    theirs_log, theirs_weights = _fit(fastai_learner.Learner, extra)
    assert ours_log == theirs_log
    assert any(name == "late" for name, _, _ in ours_log)  # the callback that joined was called
    # run_valid False: its inner-loop events in training only, the others (before_validate) always
    seen = {(name, event) for name, event, _ in ours_log}
    assert {("training only", "after_pred"), ("training only", "before_validate")} <= seen
    assert sum(1 for name, event, _ in ours_log if (name, event) == ("training only", "after_pred")) == 2 * 6
    if extra == [EveryEvent]:
        assert ("every", "before_backward", None) in ours_log
    elif extra:
        assert ("late", "after_cancel_step", 0) in ours_log or ("late", "after_cancel_step", 3) in ours_log
        assert ("partial", "after_cancel_batch", 4) in ours_log
    for key in theirs_weights:
        torch.testing.assert_close(ours_weights[key], theirs_weights[key])
