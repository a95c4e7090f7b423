"""The training tricks: --ema and --swa validate and export averaged weights, --accumulate steps once per
N batches, --mixup and --cutmix mix multi-label targets as probabilities; and a run that uses them,
started from an earlier run (frozen, then unfrozen), resumes after Ctrl-C to the same result."""
from __future__ import annotations

import signal

import numpy as np
import pandas as pd
import pytest
import torch
from fastai.callback.core import Callback
from safetensors.torch import load_file

from hpa_fastai.config import TrainConfig
from hpa_fastai.synth import make_dataset
from hpa_fastai.training import callbacks

from .helpers import build_learner, read_json, train

COLS = ["train_loss", "valid_loss", "f1_macro", "f1_samples"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("z2g"), "z2g", n_train=48, n_test=0, size=32, seed=21, easy=True)


def _cfg(data, out, **kw) -> TrainConfig:
    base = dict(data=str(data), out=str(out), arch="cnn", epochs=3, bs=8, lr="2e-3", pretrained=False, seed=0,
                patience=10, size=32)
    return TrainConfig(**{**base, **kw})


class _Spy(Callback):
    """What each epoch validated with, and what the averaging callback held then."""

    order = 100

    def __init__(self):
        self.validated, self.averaged, self.trained = [], [], []

    def after_validate(self):
        if self.learn.dl is self.dls.valid:
            self.validated.append({k: v.clone() for k, v in self.learn.model.state_dict().items()})

    def after_epoch(self):
        average = next(cb for cb in self.learn.cbs if isinstance(cb, callbacks.AveragedWeights))
        self.averaged.append({k: v.clone() for k, v in average.averaged_module().state_dict().items()})
        self.trained.append(average.trained_state and {k: v.clone() for k, v in average.trained_state.items()})


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_ema_weights_are_what_every_epoch_validates_and_what_is_exported(data, tmp_path):
    spy = _Spy()
    run_dir = train(_cfg(data, tmp_path, ema=True), cbs=[spy])
    assert len(spy.validated) == 3
    for validated, averaged, trained in zip(spy.validated, spy.averaged, spy.trained):
        assert _same(validated, averaged) and not _same(validated, trained)  # the average, not the trained weights
    best = read_json(run_dir / "metrics.json")["best_epoch"]
    exported = load_file(run_dir / "model.safetensors")
    assert _same(exported, spy.validated[best - 1])
    assert "EMA of the weights" in (run_dir / "report.html").read_text()


@pytest.mark.slow
def test_swa_averages_the_last_epochs_with_recomputed_batchnorm_and_exports_the_average(data, tmp_path):
    spy = _Spy()
    run_dir = train(_cfg(data, tmp_path, arch="resnet18", epochs=4, swa=True, swa_epochs=2), cbs=[spy])
    assert [t is None for t in spy.trained] == [True, True, False, False]  # the first two epochs validate as trained
    for validated, averaged in zip(spy.validated[2:], spy.averaged[2:]):
        assert _same(validated, averaged)
    bn = "0.1.running_mean"  # update_bn's pass over the training images, not the trained model's running average
    assert not torch.equal(spy.validated[3][bn], spy.trained[3][bn])
    best = read_json(run_dir / "metrics.json")["best_epoch"]
    assert _same(load_file(run_dir / "model.safetensors"), spy.validated[best - 1])


def test_accumulate_takes_one_optimizer_step_per_n_batches_and_one_at_each_epochs_end(data):
    from hpa_fastai.training.run import prepare

    ts = prepare(_cfg(data, "unused", bs=4))
    learn, _ = build_learner(ts)
    steps = []

    class CountSteps(Callback):
        def after_step(self):
            steps.append((self.epoch, self.iter))

    learn.fit(2, 1e-3, cbs=[callbacks.AccumulateGradients(4, 4), CountSteps()])
    n_iter = len(learn.dls.train)  # 38 training images in full batches of 4: 9
    per_epoch = [i for i in range(n_iter) if (i + 1) % 4 == 0 or i == n_iter - 1]
    assert steps == [(e, i) for e in range(2) for i in per_epoch]


@pytest.mark.parametrize("trick", ["mixup", "cutmix"])
def test_mixup_and_cutmix_mix_multi_label_targets_as_probabilities(data, trick):
    from fastai.callback.mixup import CutMix, MixUp

    from hpa_fastai.training.run import prepare

    ts = prepare(_cfg(data, "unused", bs=8))
    learn, _ = build_learner(ts)
    seen = []

    class Targets(Callback):
        order = -5  # before the mixing: the batch as drawn

        def before_batch(self):
            if self.training:
                seen.append(self.y.clone())

    class Mixed(Callback):
        order = 5  # after it: what the loss sees

        def after_pred(self):
            if self.training:
                mix = next(cb for cb in self.learn.cbs if isinstance(cb, (MixUp, CutMix)))
                seen.append((self.learn.yb[0].clone(), mix.lam, mix.yb1[0].clone()))

    learn.fit(1, 1e-3, cbs=[MixUp() if trick == "mixup" else CutMix(), Targets(), Mixed()])
    assert len(seen) % 2 == 0 and seen
    fractional = 0
    for original, (mixed, lam, other) in zip(seen[::2], seen[1::2]):
        assert mixed.dtype.is_floating_point and ((mixed >= 0) & (mixed <= 1)).all()
        lam = torch.as_tensor(lam).reshape(-1, 1)
        torch.testing.assert_close(mixed, lam * original + (1 - lam) * other)  # probabilities in the images' shares
        assert sorted(map(tuple, other.tolist())) == sorted(map(tuple, original.tolist()))  # partners from the batch
        fractional += int(((mixed > 0) & (mixed < 1)).any())
    assert fractional > 0


@pytest.fixture(scope="module")
def start_run(tmp_path_factory):
    """An earlier run on the other layout (RGBY, 28 classes), to start the resumed runs from."""
    root = tmp_path_factory.mktemp("start")
    hpa = make_dataset(root / "hpa", "hpa2018", n_train=24, n_test=0, size=32, seed=22, easy=True)
    return train(_cfg(hpa, root / "runs", epochs=1))


TRICKS = {"ema, accumulate 2, mixup": dict(ema=True, accumulate=2, mixup=True),
          "swa over 2 epochs, cutmix": dict(swa=True, swa_epochs=2, cutmix=True)}


@pytest.mark.slow
@pytest.mark.learning
@pytest.mark.parametrize("stop_after", [1, 2])  # after the frozen phase, and inside the unfrozen one
@pytest.mark.parametrize("tricks", list(TRICKS))
def test_a_fine_tuned_run_with_tricks_resumes_to_the_same_result(data, start_run, tmp_path, monkeypatch, tricks,
                                                                 stop_after):
    cfg = dict(weights=str(start_run), pretrained=True, **TRICKS[tricks])
    reference = train(_cfg(data, tmp_path / "ref", **cfg))
    real_after_epoch = callbacks.StopOnSignal.after_epoch

    def ctrl_c_after(self):
        if len(self.learn.run_history.rows) == stop_after and not self.requested:
            self.handle(signal.SIGINT, None)  # as Ctrl-C during that epoch
        real_after_epoch(self)

    monkeypatch.setattr(callbacks.StopOnSignal, "after_epoch", ctrl_c_after)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(data, tmp_path / "cut", **cfg))
    monkeypatch.setattr(callbacks.StopOnSignal, "after_epoch", real_after_epoch)
    (run_dir,) = [p for p in (tmp_path / "cut").iterdir() if p.is_dir()]
    assert len(pd.read_csv(run_dir / "history.csv")) == stop_after
    train(TrainConfig(resume=str(run_dir)))
    a, b = pd.read_csv(reference / "history.csv"), pd.read_csv(run_dir / "history.csv")
    assert list(b["phase"]) == ["frozen", "unfrozen", "unfrozen", "unfrozen"]
    # same seed and threads, every random stream and the averaged weights restored: the epochs after the
    # restart match the uninterrupted run to float rounding
    np.testing.assert_allclose(a[COLS].to_numpy(), b[COLS].to_numpy(), rtol=1e-5, atol=1e-6)
    wa, wb = load_file(reference / "model.safetensors"), load_file(run_dir / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("edit", [lambda c: c.pop("averaged_trained_weights"),
                                  lambda c: c["averaged_trained_weights"].popitem(),
                                  lambda c: next(iter(c["averaged_trained_weights"].values())).fill_(float("nan"))])
def test_a_damaged_average_in_the_checkpoint_is_one_line_on_resume(data, tmp_path, monkeypatch, edit):
    from hpa_fastai.errors import HPAError

    real_after_epoch = callbacks.StopOnSignal.after_epoch

    def ctrl_c_after_first(self):
        if len(self.learn.run_history.rows) == 1 and not self.requested:
            self.handle(signal.SIGINT, None)
        real_after_epoch(self)

    monkeypatch.setattr(callbacks.StopOnSignal, "after_epoch", ctrl_c_after_first)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(data, tmp_path, ema=True))
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    checkpoint = torch.load(run_dir / "checkpoint.pth", weights_only=True)
    edit(checkpoint)
    torch.save(checkpoint, run_dir / "checkpoint.pth")
    with pytest.raises(HPAError, match="checkpoint.pth: the averaged weights' state is missing or does not fit"):
        train(TrainConfig(resume=str(run_dir)))
    assert read_json(run_dir / "status.json")["status"] == "failed"
