"""Which epoch a run exports and when early stopping stops it, with the one-cycle warm-up: an epoch
scored while the learning rate still rises is the best only until the first epoch after it."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from fastai.callback.core import CancelFitException
from fastai.callback.tracker import TrackerCallback

from hpa_fastai.training.callbacks import (KeepBestModel, RunPhase, WarmupEarlyStopping, best_epoch_index,
                                          warmup_length)

# epochs 1-8: the validation losses of a random-init resnet34 on the bundled sample (BatchNorm
# statistics of a tiny set make them spike while the learning rate rises); 9-10: the run going on
LOSSES = [0.907, 1.443, 2.802, 6.636, 4.831, 2.197, 1.243, 0.939, 0.851, 0.802]


def replay(tracker, losses, pct_start=0.25) -> list[int]:
    """Feed ``losses`` to ``tracker`` as a fit's epochs would (10 epochs: 3 warm up); returns the
    epochs (from 1) after which it held a new best, and stops where early stopping stops the fit."""
    learn = SimpleNamespace(recorder=SimpleNamespace(values=[], metric_names=["epoch", "train_loss", "valid_loss"]),
                            n_epoch=len(losses), epoch=0, run_phase=RunPhase(pct_start=pct_start))
    tracker.learn = learn
    TrackerCallback.before_fit(tracker)
    bests = []
    for i, loss in enumerate(losses):
        learn.epoch = i
        try:
            tracker.before_epoch()
        except CancelFitException:
            break
        tracker.before_train()
        learn.recorder.values.append([1.0, loss])
        tracker.after_epoch() if isinstance(tracker, WarmupEarlyStopping) else tracker._track_epoch()
        if tracker.new_best:
            bests.append(i + 1)
    return bests


def test_early_stopping_waits_for_the_run_to_beat_its_own_epochs_after_the_warm_up():
    stopper = WarmupEarlyStopping(monitor="valid_loss", patience=5)
    replay(stopper, LOSSES)
    assert not stopper.stop and stopper.learn.epoch == 9  # all 10 epochs: epochs 4-8 are measured against epoch 4,
    # not against epoch 1 (which, the mark before, stopped this run after epoch 8 with its loss still falling)
    stopper = WarmupEarlyStopping(monitor="valid_loss", patience=2)
    replay(stopper, [0.9, 0.8, 0.7, 0.75, 0.76, 0.5])
    assert stopper.stop and stopper.learn.epoch == 5  # epochs 4 and 5 did not beat epoch 3: no 6th epoch


@pytest.mark.parametrize("losses, best", [
    (LOSSES, 10),
    ([0.5, 0.9, 0.8, 0.85, 0.9, 0.95], 3),  # the first epoch after the warm-up (2 epochs), however it scores
    ([0.7], 1),                            # a fit that is all warm-up keeps its best
])
def test_the_exported_epoch_is_the_best_after_the_warm_up(losses, best):
    assert replay(KeepBestModel(monitor="valid_loss"), losses)[-1] == best


@pytest.mark.parametrize("losses", [LOSSES, [0.5, 0.9, 0.8, 0.85, 0.9, 0.95], [0.7], [0.9, 0.8, 0.7, 0.7, 0.6]])
def test_metrics_json_names_the_epoch_the_model_was_kept_from(losses):
    """metrics.json's best epoch is read from the history by the rule the callback follows."""
    kept = replay(KeepBestModel(monitor="valid_loss"), losses)[-1]
    warmup = warmup_length(len(losses), 0.25)
    assert best_epoch_index(losses, list(range(len(losses))), [warmup] * len(losses), higher=False) + 1 == kept
