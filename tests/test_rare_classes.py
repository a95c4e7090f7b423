"""Rare classes: oversampling, the asymmetric loss, out-of-sample tuned scores, progressive resizing."""
from __future__ import annotations

import json
import signal

import numpy as np
import pandas as pd
import pytest
import torch
from fastai.data.transforms import RandomSplitter

from hpa_fastai import metrics as M
from hpa_fastai.losses import create_loss
from hpa_fastai.config import TrainConfig
from hpa_fastai.data.pipeline import make_dls
from hpa_fastai.data.sampling import oversampling_weights
from hpa_fastai.synth import make_dataset
from .helpers import train

from .helpers import read_json

COLS = ["train_loss", "valid_loss", "f1_macro", "f1_samples"]


# --- oversampling -------------------------------------------------------------------------------

def test_weight_comes_from_the_rarest_label_and_is_capped():
    # class 0 in 9 of 10 images, class 1 in 2, class 2 in 1
    labels = pd.Series(["0"] * 6 + ["0 1", "1", "0 2", "0"])
    weights = oversampling_weights(labels, 3, cap=5.0)
    freq_0, freq_1 = 0.9, 0.2
    assert weights[0] == 1.0  # only the most common class
    assert weights[6] == pytest.approx(freq_0 / freq_1)  # "0 1": its rarer label decides
    assert weights[7] == pytest.approx(freq_0 / freq_1)
    assert weights[8] == 5.0  # class 2 would give 9: capped
    assert oversampling_weights(labels, 3, cap=100.0)[8] == pytest.approx(9.0)


def _oversampled_loader(data, cap, seed=0):
    from hpa_fastai.data.layouts import read_items

    items = read_items(data, split="train")
    dls = make_dls(items, [str(c) for c in range(10)], "rgb", 16, [0.5] * 3, [0.2] * 3,
                   RandomSplitter(valid_pct=0.25, seed=0), bs=8, seed=seed, oversample_cap=cap)
    return items, dls


def test_oversampled_epochs_draw_rare_images_more_often_same_length_same_seed_same_draws(make_z2g):
    # one image of class 9 among 63 of class 0
    data = make_z2g(n=64, size=16, labels=["9" if i == 5 else "0" for i in range(64)])
    items, dls = _oversampled_loader(data, cap=20.0)
    train_keys = list(dls.train_ds.items["key"])
    rare = train_keys.index(items["key"].iloc[5]) if items["key"].iloc[5] in train_keys else None
    assert rare is not None, "the split put the rare image in validation"
    epochs = [dls.train.get_idxs() for _ in range(30)]
    assert all(len(e) == len(train_keys) for e in epochs)  # an epoch is as long as without oversampling
    draws = np.mean([e.count(rare) for e in epochs])
    # weight 20 against 1 for the other 47: drawn 48 * 20 / 67, about 14 times per epoch, not once
    assert 8 < draws < 22, draws
    assert len({tuple(e) for e in epochs}) == 30  # each epoch draws anew
    _, again = _oversampled_loader(data, cap=20.0)
    assert [again.train.get_idxs() for _ in range(3)] == epochs[:3]  # the same --seed, the same draws
    _, other = _oversampled_loader(data, cap=20.0, seed=1)
    assert other.train.get_idxs() != epochs[0]
    assert list(dls.valid.get_idxs()) == list(range(len(dls.valid_ds)))  # validation is never resampled


def test_under_two_processes_each_rank_trains_its_own_share_of_the_oversampled_draws(make_z2g, monkeypatch):
    pytest.importorskip("accelerate")
    from fastai.distributed import DistributedDL

    data = make_z2g(n=64, size=16, labels=["9" if i % 16 == 0 else "0" for i in range(64)])
    _, dls = _oversampled_loader(data, cap=20.0)
    # one process plays both ranks: rank 0's draw is what the broadcast would hand to every rank
    monkeypatch.setattr(DistributedDL, "_broadcast", lambda self, t, rank: list(t))
    state = np.random.get_state()
    full = dls.train.get_idxs()
    shares = []
    for rank in (0, 1):
        np.random.set_state(state)  # every rank draws, as fastai has them do; rank 0's draw is used
        shares.append(DistributedDL(dls.train, rank=rank, world_size=2).get_idxs())
    assert shares[0] + shares[1] == full[:len(shares[0]) + len(shares[1])]
    assert len(shares[0]) == len(shares[1]) == (len(full) + 1) // 2


# --- the asymmetric loss ------------------------------------------------------------------------

def asl_reference(logits: np.ndarray, targets: np.ndarray, gamma_neg: float, gamma_pos: float, clip: float) -> float:
    """The paper's formula, element by element in float64."""
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    p_m = np.maximum(p - clip, 0)
    positive = targets * (1 - p) ** gamma_pos * np.log(p)
    negative = (1 - targets) * p_m ** gamma_neg * np.log(1 - p_m)
    return float(-(positive + negative).mean())


@pytest.mark.parametrize("gamma_neg,gamma_pos,clip", [(4, 0, 0.05), (2, 1, 0.0), (3.5, 0.5, 0.2)])
def test_asymmetric_loss_matches_the_formula(gamma_neg, gamma_pos, clip):
    rng = np.random.default_rng(0)
    logits, targets = rng.normal(0, 3, (32, 10)), (rng.random((32, 10)) < 0.2).astype(np.float64)
    loss = create_loss("asl", gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip)
    got = loss(torch.tensor(logits, dtype=torch.float32), torch.tensor(targets, dtype=torch.float32))
    assert float(got) == pytest.approx(asl_reference(logits, targets, gamma_neg, gamma_pos, clip), rel=1e-5)


def test_asymmetric_loss_without_focusing_or_margin_is_bce_and_stays_finite():
    rng = np.random.default_rng(1)
    logits = torch.tensor(rng.normal(0, 40, (16, 28)), dtype=torch.float32, requires_grad=True)
    targets = torch.tensor(rng.random((16, 28)) < 0.1, dtype=torch.float32)
    with torch.no_grad():
        plain = create_loss("asl", gamma_neg=0, gamma_pos=0, clip=0)(logits, targets)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
    assert float(plain) == pytest.approx(float(bce), rel=1e-5)
    default = create_loss("asl")(logits, targets)  # logits of +-100: saturated sigmoids
    default.backward()
    assert torch.isfinite(default) and torch.isfinite(logits.grad).all()


# --- out-of-sample tuned scores -----------------------------------------------------------------

def test_split_half_score_uses_thresholds_tuned_on_the_other_half():
    rng = np.random.default_rng(2)
    targets = rng.random((200, 6)) < 0.1
    probs = rng.random((200, 6))  # no information at all: any tuned gain is fitted noise
    in_sample = M.f1_scores(probs, targets, M.tune_thresholds(probs, targets))["macro"]
    oos = M.out_of_sample_f1(probs, targets, seed=0)
    a, b = M.split_halves(targets, seed=0)
    assert sorted(np.r_[a, b]) == list(range(200)) and abs(len(a) - len(b)) <= 1
    assert np.abs(targets[a].sum(0) - targets[b].sum(0)).max() <= 1  # each class's positives dealt evenly
    expected = np.mean([M.f1_scores(probs[s], targets[s], M.tune_thresholds(probs[t], targets[t]))["macro"]
                        for t, s in ((a, b), (b, a))])
    assert oos["macro"] == pytest.approx(expected)
    assert in_sample > oos["macro"] + 0.02, (in_sample, oos)  # the in-sample score flatters noise


# --- training runs: recorded, resumable, resized ------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("z2g"), "z2g", n_train=48, n_test=0, size=32, seed=11, easy=True)


def _cfg(data, out, **kw):
    base = dict(data=str(data), out=str(out), arch="cnn", epochs=4, bs=8, lr="2e-3", pretrained=False, seed=0,
                patience=10, size=32, oversample=True, oversample_cap=5.0, loss="asl", progressive_size=16,
                progressive_epochs=2)
    return TrainConfig(**{**base, **kw})


class _InputSizes:
    """Records the side of every batch the model sees, in training and in evaluation."""

    def __init__(self, monkeypatch):
        from hpa_fastai.training import learner

        self.train, self.eval, real = [], [], learner.start_model

        def start_model(*args, **kwargs):
            model, start = real(*args, **kwargs)
            model.register_forward_pre_hook(
                lambda module, inp: (self.train if module.training else self.eval).append(inp[0].shape[-1]))
            return model, start

        monkeypatch.setattr(learner, "start_model", start_model)


@pytest.mark.slow
def test_progressive_resizing_trains_small_then_full_and_exports_the_full_size(data, tmp_path, monkeypatch):
    sizes = _InputSizes(monkeypatch)
    run_dir = train(_cfg(data, tmp_path))
    batches = len(sizes.train) // 4  # 4 epochs of equal length
    assert sizes.train == [16] * 2 * batches + [32] * 2 * batches
    assert set(sizes.eval) == {32}  # every validation pass, and the final predictions, at the full size
    assert read_json(run_dir / "model.json")["size"] == 32
    config = read_json(run_dir / "config.json")
    assert (config["progressive_size"], config["progressive_epochs"], config["size"]) == (16, 2, 32)
    assert (config["oversample"], config["oversample_cap"], config["loss"]) == (True, 5.0, "asl")
    report = (run_dir / "report.html").read_text()
    assert "rare classes oversampled (cap 5)" in report and "loss asl" in report
    assert "the first epochs at 16 px" in report


@pytest.mark.slow
@pytest.mark.learning
# inside the small phase, and at the switch to the full size with worker processes (kept from epoch to
# epoch in the uninterrupted run, started anew by the resumed one)
@pytest.mark.parametrize("stop_after, workers", [(1, 0), (2, 2)])
def test_interrupted_oversampled_progressive_run_resumes_to_the_same_result(data, tmp_path, monkeypatch, stop_after,
                                                                             workers):
    reference = train(_cfg(data, tmp_path / "ref", workers=workers))
    from hpa_fastai.training import callbacks

    real_after_epoch = callbacks.StopOnSignal.after_epoch

    def ctrl_c_after(self):
        if self.epoch + 1 == stop_after and not self.requested:
            self.handle(signal.SIGINT, None)  # as Ctrl-C during that epoch
        real_after_epoch(self)

    monkeypatch.setattr(callbacks.StopOnSignal, "after_epoch", ctrl_c_after)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(data, tmp_path / "cut", workers=workers))
    monkeypatch.setattr(callbacks.StopOnSignal, "after_epoch", real_after_epoch)
    (run_dir,) = [p for p in (tmp_path / "cut").iterdir() if p.is_dir()]
    assert read_json(run_dir / "status.json")["status"] == "interrupted"
    assert len(pd.read_csv(run_dir / "history.csv")) == stop_after
    train(TrainConfig(resume=str(run_dir)))
    a, b = pd.read_csv(reference / "history.csv"), pd.read_csv(run_dir / "history.csv")
    assert list(b["epoch"]) == [1, 2, 3, 4]
    # same seed and thread count, the sampler's and loader's random state restored: the epochs after
    # the restart draw the same images at the same sizes as the uninterrupted run
    np.testing.assert_allclose(a[COLS].to_numpy(), b[COLS].to_numpy(), rtol=1e-5, atol=1e-6)
    ma, mb = read_json(reference / "metrics.json"), read_json(run_dir / "metrics.json")
    assert ma["f1_macro_tuned_oos"] == pytest.approx(mb["f1_macro_tuned_oos"], abs=1e-6)
    assert read_json(run_dir / "model.json")["size"] == 32


@pytest.mark.slow
def test_metrics_console_and_runs_table_label_in_sample_and_out_of_sample(data, tmp_path, capsys):
    from hpa_fastai.runs.table import collect_runs, display_frame

    run_dir = train(_cfg(data, tmp_path, epochs=1, progressive_size=None, progressive_epochs=None))
    metrics = read_json(run_dir / "metrics.json")
    for key in ("f1_macro_tuned_oos", "f1_micro_tuned_oos", "f1_samples_tuned_oos"):
        assert 0 <= metrics[key] <= 1
    out = capsys.readouterr().out
    assert "tuned, out-of-sample" in out and "tuned, in-sample" in out
    shown = display_frame(collect_runs(tmp_path)).iloc[0]
    assert shown["tuned, split-half"] == f"{metrics['f1_macro_tuned_oos']:.4f}"
    summary = (run_dir / "report.html").read_text().split('<p class="summary">')[1].split("</p>")[0]
    assert f"<b>{metrics['f1_macro_tuned_oos']:.4f}</b> out-of-sample" in summary
    assert f"{metrics['f1_macro_tuned']:.4f} in-sample" in summary
    # a run folder from before the split-half estimate still renders
    old = {k: v for k, v in metrics.items() if not k.endswith("_oos")}
    (run_dir / "metrics.json").write_text(json.dumps(old))
    from hpa_fastai.reporting import write_report

    text = write_report(run_dir).read_text()
    assert "out-of-sample" not in text.split('<p class="summary">')[1].split("</p>")[0]
    assert display_frame(collect_runs(tmp_path)).iloc[0]["tuned, split-half"] == "-"
