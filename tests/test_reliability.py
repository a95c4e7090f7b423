"""Reliability: resume after kill -9, SIGTERM, NaN loss, unwritable output, data vanishing mid-run, ONNX."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from hpa_fastai import metrics as M
from hpa_fastai.config import TrainConfig
from hpa_fastai.errors import HPAError
from hpa_fastai.synth import make_dataset
from .helpers import train

from .helpers import REPO, cli_in_process, read_json

pytestmark = pytest.mark.slow
COLS = ["train_loss", "valid_loss", "f1_macro", "f1_samples"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("z2g"), "z2g", n_train=48, n_test=4, size=32, seed=11, easy=True)


def _args(data, out, epochs=6):
    return [sys.executable, str(REPO / "run.py"), "--data", str(data), "--arch", "cnn", "--epochs", str(epochs),
            "--bs", "8", "--lr", "2e-3", "--no-pretrained", "--patience", "10", "--out", str(out)]


def _start_and_wait(args, out: Path, epochs_done: int, env=None):
    """Start a training subprocess and wait until its history has ``epochs_done`` rows."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
    deadline = time.time() + 300
    while time.time() < deadline:
        hist = list(out.glob("*/history.csv"))
        if hist and len(pd.read_csv(hist[0])) >= epochs_done:
            return proc, hist[0].parent
        if proc.poll() is not None:
            raise AssertionError(f"training ended early: {proc.stderr.read()}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("training did not reach the epoch in time")


@pytest.mark.learning
def test_killed_run_resumes_to_the_same_result(data, tmp_path):
    ref = subprocess.run(_args(data, tmp_path / "ref"), capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert ref.returncode == 0, ref.stderr
    proc, run_dir = _start_and_wait(_args(data, tmp_path / "killed"), tmp_path / "killed", 3)
    time.sleep(0.2)  # into the next epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert read_json(run_dir / "status.json")["status"] == "running"
    assert not (run_dir / "export.pkl").exists()
    res = subprocess.run([sys.executable, str(REPO / "run.py"), "--resume", str(run_dir)], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr
    assert "continuing phase train after epoch" in res.stdout
    ref_dir = (tmp_path / "ref" / "latest").resolve()
    a, b = pd.read_csv(ref_dir / "history.csv"), pd.read_csv(run_dir / "history.csv")
    assert list(b["epoch"]) == list(range(1, 7))
    # Same seed, same CPU, RNG and loader state restored: the epochs after the restart match the
    # uninterrupted run to float rounding.
    np.testing.assert_allclose(a[COLS].to_numpy(), b[COLS].to_numpy(), rtol=1e-5, atol=1e-6)
    ma, mb = read_json(ref_dir / "metrics.json"), read_json(run_dir / "metrics.json")
    assert ma["f1_macro_tuned"] == pytest.approx(mb["f1_macro_tuned"], abs=1e-6)
    for name in ("export.pkl", "model.safetensors", "model.json", "curves.png"):
        assert (run_dir / name).is_file()
    assert read_json(run_dir / "status.json")["status"] == "finished"


def test_sigterm_stops_with_a_checkpoint_and_a_resume_hint(data, tmp_path):
    proc, run_dir = _start_and_wait(_args(data, tmp_path, epochs=40), tmp_path, 1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert f"python run.py --resume {run_dir}" in out + err
    status = read_json(run_dir / "status.json")
    assert status["status"] == "interrupted" and status["epochs_done"] >= 1
    ckpt = torch.load(run_dir / "checkpoint.pth", weights_only=True)
    assert ckpt["epochs_done"] == status["epochs_done"]
    assert len(pd.read_csv(run_dir / "history.csv")) == status["epochs_done"]


@pytest.mark.parametrize("epoch, batch", [(1, 1), (2, 3)])  # before and after the first best weights
def test_nan_loss_stops_the_run_naming_epoch_and_batch(epoch, batch, data, tmp_path, monkeypatch):
    real = M.make_loss

    def poisoned(*args, **kwargs):
        loss, calls = real(*args, **kwargs), {"n": 0}

        class Poisoned(type(loss)):
            def __call__(self, inp, targ):
                calls["n"] += torch.is_grad_enabled()  # count training batches only
                out = super().__call__(inp, targ)
                return out * float("nan") if calls["n"] == n_train_batches * (epoch - 1) + batch else out

        loss.__class__ = Poisoned
        return loss

    n_train_batches = 38 // 8  # 48 images, 20% held out, full batches of 8
    monkeypatch.setattr(M, "make_loss", poisoned)
    cfg = TrainConfig(data=str(data), out=str(tmp_path), arch="cnn", epochs=3, bs=8, lr="1e-3", pretrained=False)
    with pytest.raises(HPAError, match=rf"loss became nan at epoch {epoch}, batch {batch}") as exc:
        train(cfg)
    assert "checkpoint.pth" in str(exc.value)
    run_dir = next(p for p in tmp_path.iterdir() if p.is_dir())
    assert not (run_dir / "export.pkl").exists() and not (run_dir / "model.json").exists()
    assert read_json(run_dir / "status.json")["status"] == "failed"
    assert not (tmp_path / "latest").exists()


def test_unwritable_output_fails_before_training(data, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    t0 = time.time()
    code, _, err = cli_in_process(capsys, "--data", data, "--arch", "cnn", "--no-pretrained", "--epochs", "1",
                                  "--out", blocker / "runs")
    assert code == 2 and "--out" in err and "not writable" in err
    assert time.time() - t0 < 30


def test_data_folder_vanishing_mid_run_gives_a_clear_error(tmp_path):
    data = make_dataset(tmp_path / "data", "z2g", n_train=48, n_test=0, size=32, seed=12, easy=True)
    proc, run_dir = _start_and_wait(_args(data, tmp_path / "runs", epochs=40), tmp_path / "runs", 1)
    shutil.rmtree(data)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert err.startswith("error: ") and "not found" in err and "Traceback" not in err
    assert read_json(run_dir / "status.json")["status"] == "failed"


def test_resume_of_a_folder_without_checkpoint_is_refused(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    code, _, err = cli_in_process(capsys, "--resume", tmp_path)
    assert code == 2 and "no checkpoint.pth" in err


def test_onnx_export_matches_pytorch(data, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    run_dir = train(TrainConfig(data=str(data), out=str(tmp_path), arch="cnn", epochs=1, bs=8, lr="1e-3",
                                pretrained=False))
    code, out, err = cli_in_process(capsys, "export", "--learner", run_dir, "--onnx")
    assert code == 0, err
    assert (run_dir / "model.onnx").is_file() and "max abs difference" in out
    import onnxruntime as ort

    from hpa_fastai import load_predictor
    from hpa_fastai.data.images import read_image
    from hpa_fastai.data.layouts import CHANNEL_SETS, read_items

    items = read_items(data, split="train").iloc[:4]
    p = load_predictor(run_dir)
    images = np.stack([read_image(k, CHANNEL_SETS["rgb"], p.size).transpose(2, 0, 1) for k in items["key"]])
    got = ort.InferenceSession(str(run_dir / "model.onnx")).run(None, {"image": images.astype(np.float32) / 255})[0]
    np.testing.assert_allclose(got, p.probabilities(items), atol=1e-4)
