"""The GPU path, exercised on the CPU: bf16 autocast end to end, channels-last batches, TTA batched
in the model's precision, the CUDA generators in checkpoints, ``--compile``, non-blocking copies and
the DataLoader's worker processes across epochs."""
from __future__ import annotations

import json
import multiprocessing
import os
import random
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from fastai.data.core import TfmdDL
from fastai.data.transforms import IndexSplitter

from hpa_fastai import device as D
from hpa_fastai import load_predictor
from hpa_fastai import modelfile
from hpa_fastai.config import TrainConfig
from hpa_fastai.data.layouts import read_items
from hpa_fastai.data.pipeline import NonBlockingDL, augmentations, close_workers, make_dls
from hpa_fastai.data.vocab import class_names, vocab_for
from hpa_fastai.errors import HPAError
from hpa_fastai.inference.predictor import dihedral
from hpa_fastai.models import create_model
from hpa_fastai.synth import make_dataset
from .helpers import build_learner
from hpa_fastai.training.resume import rng_state, set_rng_state
from hpa_fastai.training.run import prepare
from .helpers import train

from .helpers import cli_in_process, read_json


# --- mixed precision and memory format in training ----------------------------------------------

def test_bf16_and_channels_last_reach_the_model_in_training_and_validation(make_z2g):
    data = make_z2g(n=16, size=16)
    cfg = TrainConfig(data=str(data), arch="cnn", pretrained=False, bs=4, lr="1e-3", seed=0, workers=0,
                      precision="bf16", memory_format="channels-last")
    learn, setup = build_learner(prepare(cfg))
    assert (setup.precision, setup.channels_last) == ("bf16", True)
    first_conv = learn.model[0][0]
    seen = []
    first_conv.register_forward_hook(lambda m, args, out: seen.append(
        (m.training, args[0].is_contiguous(memory_format=torch.channels_last), out.dtype)))
    learn.fit(1, 1e-3)
    assert {s for s in seen if s[0]} == {(True, True, torch.bfloat16)}  # training batches
    assert {s for s in seen if not s[0]} == {(False, True, torch.bfloat16)}  # the epoch's validation
    assert first_conv.weight.dtype == torch.float32  # autocast: the weights stay float32
    assert first_conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_auto_precision_and_memory_format_stay_fp32_and_contiguous_on_cpu(make_z2g):
    cfg = TrainConfig(data=str(make_z2g(n=8, size=16)), arch="cnn", pretrained=False, bs=4, lr="1e-3", workers=0)
    learn, setup = build_learner(prepare(cfg), device=torch.device("cpu"))
    assert (setup.precision, setup.channels_last, setup.compiled) == ("fp32", False, False)
    assert not [cb for cb in learn.cbs if isinstance(cb, (D.MixedPrecision, D.ChannelsLast))]


# The probabilities of one model in bf16 against the same model in fp32, measured on this test's
# data and model (cnn trained 1 epoch at 16 px on 24 synthetic HPA images; data seeds 3-5 with
# training seeds 0-2, each at 1 and 2 torch threads, 2-core Xeon): max abs difference 7.4e-5 to
# 9.9e-5 over 2 test images x 28 classes, with and without TTA (the same at both thread counts).
# 5e-3 is 50 times that: room for CPUs whose bfloat16 kernels round differently.
BF16_TOLERANCE = 5e-3


@pytest.fixture(scope="module")
def bf16_data(tmp_path_factory):
    # tiny: on a CPU without bfloat16 instructions bf16 convolutions are emulated, ~100x slower than fp32
    return make_dataset(tmp_path_factory.mktemp("hpa"), "hpa2018", n_train=24, n_test=2, size=16, seed=3, easy=True)


@pytest.mark.slow
def test_bf16_on_cpu_trains_tunes_predicts_evaluates_and_exports(bf16_data, tmp_path, capsys):
    data = bf16_data
    run_dir = train(TrainConfig(data=str(data), out=str(tmp_path / "runs"), arch="cnn", epochs=1, bs=8,
                                pretrained=False, lr="2e-3", seed=0, precision="bf16"))
    config, meta, metrics = (read_json(run_dir / f) for f in ("config.json", "model.json", "metrics.json"))
    assert config["precision_used"] == "bf16" and meta["precision"] == "bf16"
    assert len(meta["thresholds"]) == 28 and metrics["f1_macro_tuned"] >= metrics["f1_macro"]
    history = pd.read_csv(run_dir / "history.csv")
    assert np.isfinite(history[["train_loss", "valid_loss", "f1_macro"]].to_numpy()).all()
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(run_dir / "model.safetensors").values()} == {torch.float32}

    items = read_items(data, split="test", labelled=False)
    p = load_predictor(run_dir)
    assert p.precision == "fp32"  # auto: fp32 on a CPU, as for training
    fp32 = {tta: p.probabilities(items, tta=tta) for tta in (None, "mean")}
    assert p.set_precision("bf16") == "bf16"
    bf16 = {tta: p.probabilities(items, tta=tta) for tta in (None, "mean")}
    for tta in bf16:
        diff = np.abs(bf16[tta] - fp32[tta]).max()
        assert 0 < diff < BF16_TOLERANCE, (tta, diff)  # autocast ran, and stayed close to float32

    code, out, err = cli_in_process(capsys, "predict", "--learner", run_dir, "--data", data, "--tta",
                                    "--precision", "bf16", "--out", tmp_path / "sub.csv")
    assert code == 0, err
    assert len(pd.read_csv(tmp_path / "sub.csv")) == 2
    code, _, err = cli_in_process(capsys, "evaluate", "--learner", run_dir, "--data", data, "--precision", "bf16",
                                  "--out", tmp_path / "eval")
    assert code == 0, err
    assert read_json(tmp_path / "eval" / "summary.json")["images"] == 24
    pytest.importorskip("onnxruntime")
    code, out, err = cli_in_process(capsys, "export", "--learner", run_dir, "--onnx")
    assert code == 0, err
    import onnxruntime as ort

    from hpa_fastai.data.images import read_image
    from hpa_fastai.data.layouts import CHANNEL_SETS

    images = np.stack([read_image(k, CHANNEL_SETS["rgby"], 16).transpose(2, 0, 1) for k in items["key"]])
    onnx_probs = ort.InferenceSession(str(run_dir / "model.onnx")).run(
        None, {"image": images.astype(np.float32) / 255})[0]
    np.testing.assert_allclose(onnx_probs, fp32[None], atol=1e-4)  # the exported graph is the float32 model
    assert np.abs(onnx_probs - bf16[None]).max() < BF16_TOLERANCE


# --- TTA ----------------------------------------------------------------------------------------

def write_model(folder, size: int = 16):
    """An untrained cnn's safe export: random weights, so every orientation gives other outputs."""
    torch.manual_seed(0)
    model, _ = create_model("cnn", 3, 10, pretrained=False)
    vocab = vocab_for("z2g")
    modelfile.save(model.state_dict(), {"arch": "cnn", "format": "z2g", "channels": "rgb", "n_in": 3, "size": size,
                                        "mean": [0.5] * 3, "std": [0.25] * 3, "vocab": vocab,
                                        "names": class_names("z2g"), "thresholds": [0.5] * 10}, folder)
    return folder


def view_by_view(p, items, bs, mode):
    """TTA as it was computed before batching: one forward pass per orientation."""
    out = []
    with torch.no_grad():
        for (xb,) in p.dataloader(items, bs):
            xb = xb.as_subclass(torch.Tensor)
            ps = torch.stack([torch.sigmoid(p.learn.model(dihedral(xb, k)).float()) for k in range(8)])
            out.append(ps.mean(0) if mode == "mean" else ps.max(0).values)
    return torch.cat(out).numpy()


@pytest.fixture
def tta_case(make_z2g, tmp_path):
    data = make_z2g(n=10, size=16, seed=4)
    p = load_predictor(write_model(tmp_path / "model"), cpu=True)
    return p, read_items(data, split="train")


@pytest.mark.parametrize("mode", ["mean", "max"])
def test_tta_in_one_pass_per_batch_gives_todays_results(tta_case, mode):
    p, items = tta_case
    want = view_by_view(p, items, 4, mode)
    # on a CPU: one orientation of a batch per pass, the same passes as before
    np.testing.assert_array_equal(p.probabilities(items, tta=mode, bs=4), want)
    # as on a GPU: all 8 views of a batch of 4 in one pass of 32
    calls = []
    hook = p.learn.model.register_forward_pre_hook(lambda m, args: calls.append(len(args[0])))
    p.views_per_pass = 32
    got = p.probabilities(items, tta=mode, bs=4)
    hook.remove()
    assert calls == [32, 32, 16]  # 10 images in batches of 4, 4 and 2
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)  # float32 rounding of another batch size


class OutOfMemoryAbove(torch.nn.Module):
    """The model, failing as a full GPU does when a pass holds more than ``limit`` images."""

    def __init__(self, model, limit):
        super().__init__()
        self.model, self.limit, self.calls = model, limit, []

    def forward(self, x):
        self.calls.append(len(x))
        if len(x) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.model(x)


def test_tta_halves_the_views_per_pass_when_memory_runs_out(tta_case):
    p, items = tta_case
    want = view_by_view(p, items, 4, "mean")
    p.learn.model = OutOfMemoryAbove(p.learn.model, limit=12)
    p.views_per_pass = 32
    got = p.probabilities(items, tta="mean", bs=4)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert p.views_per_pass == 8  # 32 and 16 failed; kept for the batches after the first
    assert p.learn.model.calls[:3] == [32, 16, 8] and set(p.learn.model.calls[3:]) <= {8, 4}


def test_prediction_runs_in_the_trained_precision_on_cuda_and_fp32_on_cpu(tmp_path):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for trained in ("fp32", "bf16", "fp16"):
        assert D.inference_precision(trained, "auto", cpu) == "fp32"
        assert D.inference_precision(trained, "bf16", cpu) == "bf16"
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        assert [D.inference_precision(t, "auto", cuda) for t in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]
    folder = write_model(tmp_path / "model")
    meta = json.loads((folder / "model.json").read_text())
    (folder / "model.json").write_text(json.dumps({**meta, "precision": "bf16"}))
    p = load_predictor(folder, cpu=True)
    assert p.precision == "fp32" and p.set_precision("bf16") == "bf16" and p.set_precision("auto") == "fp32"
    (folder / "model.json").write_text(json.dumps({**meta, "precision": "fp8"}))
    with pytest.raises(HPAError, match="'precision' must be one of fp32, bf16, fp16"):
        load_predictor(folder, cpu=True)


# --- checkpoints: the CUDA generators -----------------------------------------------------------

def fake_learner():
    return SimpleNamespace(dls=SimpleNamespace(train=SimpleNamespace(rng=random.Random(0))))


def test_checkpoint_keeps_and_restores_every_cuda_generator(monkeypatch, tmp_path):
    states = [torch.arange(16, dtype=torch.uint8), torch.arange(16, 32, dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in states])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda got: restored.extend(got))
    torch.save({"rng": rng_state(fake_learner())}, tmp_path / "checkpoint.pth")
    saved = torch.load(tmp_path / "checkpoint.pth", weights_only=True)["rng"]
    set_rng_state(fake_learner(), saved)
    assert len(restored) == 2 and all(torch.equal(a, b) for a, b in zip(restored, states))


def test_cuda_generators_are_skipped_cleanly_on_cpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    state = rng_state(fake_learner())
    assert state["cuda"] == []
    set_rng_state(fake_learner(), state)  # a CPU run's checkpoint
    set_rng_state(fake_learner(), {k: v for k, v in state.items() if k != "cuda"})  # an earlier version's
    called = []
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda got: called.append(got))
    set_rng_state(fake_learner(), {**state, "cuda": [torch.zeros(16, dtype=torch.uint8)]})  # a GPU run's, on a CPU
    assert not called and "CUDA generators" in capsys.readouterr().out


# --- --compile -----------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:load_learner:UserWarning")  # export.pkl of this test's own run
def test_compile_trains_the_compiled_model_and_exports_the_plain_one(make_z2g, tmp_path, monkeypatch, capsys):
    import torch._dynamo

    monkeypatch.setattr(D, "COMPILE_BACKEND", "aot_eager")  # see COMPILE_BACKEND: inductor's first build is minutes
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    data = make_z2g(n=24, size=16)
    run_dir = train(TrainConfig(data=str(data), out=str(tmp_path / "runs"), arch="cnn", epochs=2, bs=8,
                                pretrained=False, lr="1e-3", seed=0, compile=True, keep_checkpoint=True))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the forward passes went through dynamo
    assert "compiled" in capsys.readouterr().out
    plain = set(create_model("cnn", 3, 10, pretrained=False)[0].state_dict())
    from safetensors.torch import load_file

    assert set(load_file(run_dir / "model.safetensors")) == plain
    assert set(torch.load(run_dir / "checkpoint.pth", weights_only=True)["model"]) == plain
    assert set(torch.load(run_dir / "best.pth", weights_only=True)) == plain
    pickled = load_predictor(run_dir / "export.pkl", trust=True, cpu=True)
    assert not hasattr(pickled.learn.model, "_orig_mod")
    items = read_items(data, split="train").iloc[:4]
    np.testing.assert_allclose(pickled.probabilities(items), load_predictor(run_dir).probabilities(items), atol=1e-6)
    torch._dynamo.reset()


# --- the DataLoader ------------------------------------------------------------------------------

def dls_for(data, workers=0, bs=4, augment=True):
    items = read_items(data, split="train")
    return make_dls(items, vocab_for("z2g"), "rgb", 16, [0.5] * 3, [0.25] * 3, IndexSplitter(range(4)), bs=bs,
                    workers=workers, seed=0, device=torch.device("cpu"), augment=augment)


def test_non_blocking_loader_gives_fastais_batches(make_z2g):
    dls = dls_for(make_z2g(n=12, size=16))
    for dl in (dls.train, dls.valid):
        assert isinstance(dl, NonBlockingDL)
        rng = dl.rng.getstate()
        torch.manual_seed(1)
        ours = list(dl)
        dl.rng.setstate(rng)
        torch.manual_seed(1)
        fastais = list(TfmdDL.__iter__(dl))  # fastai's own DataLoader.__iter__ on the same loader
        assert len(ours) == len(fastais) > 0
        for a, b in zip(ours, fastais):
            assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.slow
def test_training_loader_workers_draw_a_new_order_every_epoch(make_z2g):
    """The worker processes live across epochs (fastai's own loader starts them afresh each epoch,
    handing them that epoch's index list); each epoch still gets its own order, drawn in the main
    process, as without workers."""
    dls = dls_for(make_z2g(n=24, size=16), workers=2, bs=2, augment=False)
    dl = dls.train
    try:
        orders = [[round(float(x.sum()), 3) for xb, _ in dl for x in xb] for _ in range(2)]  # each image's pixel sum
        assert sorted(orders[0]) == sorted(orders[1]) and len(set(orders[0])) == len(orders[0])
        assert orders[0] != orders[1]
        # the order the same loader gives without worker processes, from the same random state
        dl.rng.setstate(rng := dl.rng.getstate())
        with dl.fake_l.no_multiproc():
            single = [round(float(x.sum()), 3) for xb, _ in dl for x in xb]
        dl.rng.setstate(rng)
        assert [round(float(x.sum()), 3) for xb, _ in dl for x in xb] == single
    finally:
        close_workers(dls)


@pytest.mark.slow
def test_training_and_validation_workers_are_started_once_per_run(make_z2g, tmp_path, monkeypatch):
    """Each image is read by a worker process; over three epochs the same processes read them all."""
    from hpa_fastai.data import pipeline

    log, real = tmp_path / "readers.txt", pipeline.ReadImage.__call__

    def read_and_log(self, key):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        return real(self, key)

    monkeypatch.setattr(pipeline.ReadImage, "__call__", read_and_log)
    data = make_z2g(n=24, size=16)
    run_dir = train(TrainConfig(data=str(data), out=str(tmp_path / "runs"), arch="cnn", epochs=3, bs=4,
                                pretrained=False, lr="1e-3", seed=0, workers=2))
    readers = [int(pid) for pid in log.read_text().split()]
    workers = [pid for pid in readers if pid != os.getpid()]  # this process reads a sample while setting up
    assert len(workers) >= 3 * 24  # each epoch's training and validation images
    # 2 workers per loader (the one validation batch keeps one of them busy); started afresh each
    # epoch they would be 3 processes an epoch, 9 over the 3 epochs
    assert 2 <= len(set(workers)) <= 2 * 2, sorted(set(workers))
    assert (run_dir / "model.safetensors").is_file()
    assert not multiprocessing.active_children()  # the run ended its workers: a loop of runs keeps none


@pytest.mark.parametrize("size", [None, 12])  # the run's size, and progressive resizing's smaller one
def test_batch_augmentation_gives_fastais_pixels_from_the_same_draws(size):
    """The augmentation that reads nothing back from the device resamples exactly as fastai's own
    affine transform does (its lookup tables and its shrink-first rule reworked, not its draws)."""
    from fastai.vision.augment import aug_transforms
    from fasttransform import Pipeline

    from hpa_fastai.data.pipeline import SyncFreeAffine, TensorRGBY

    ours = augmentations(32)
    fastais = aug_transforms(do_flip=True, flip_vert=True, max_rotate=10.0, max_zoom=1.0, max_lighting=0.1,
                             max_warp=0.0, pad_mode="reflection", size=None)
    assert isinstance(ours[0], SyncFreeAffine) and not isinstance(fastais[0], SyncFreeAffine)
    for tfm in fastais:
        tfm.split_idx = 0
    ours[0].size = fastais[0].size = size
    for seed in range(4):
        x = TensorRGBY(torch.rand(8, 4, 32, 32))
        out = []
        for tfms in (ours, fastais):
            torch.manual_seed(seed)
            random.seed(seed)
            out.append(Pipeline(tfms, split_idx=0)(x.clone()))
        assert torch.equal(*out) and type(out[0]) is TensorRGBY
        assert out[0].shape[-1] == (size or 32)
