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
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert f"python run.py --resume {run_dir}" in out + err
    status = read_json(run_dir / "status.json")
    assert status["status"] == "interrupted" and status["epochs_done"] >= 1
    ckpt = torch.load(run_dir / "checkpoint.pth", weights_only=True)
    assert ckpt["epochs_done"] == status["epochs_done"]
    assert len(pd.read_csv(run_dir / "history.csv")) == status["epochs_done"]


@pytest.mark.parametrize("epoch, batch", [(1, 1), (2, 3)])  # before and after the first best weights
def test_nan_loss_stops_the_run_naming_epoch_and_batch(epoch, batch, data, tmp_path, monkeypatch):
    from hpa_fastai.training import learner

    real = learner.loss_from

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
    monkeypatch.setattr(learner, "loss_from", poisoned)
    cfg = TrainConfig(data=str(data), out=str(tmp_path), arch="cnn", epochs=3, bs=8, lr="1e-3", pretrained=False)
    with pytest.raises(HPAError, match=rf"loss became nan at epoch {epoch}, batch {batch}") as exc:
        train(cfg)
    assert "checkpoint.pth" in str(exc.value)
    run_dir = next(p for p in tmp_path.iterdir() if p.is_dir())
    assert not (run_dir / "export.pkl").exists() and not (run_dir / "model.json").exists()
    assert read_json(run_dir / "status.json")["status"] == "failed"
    assert not (tmp_path / "latest").exists()


def test_unwritable_output_fails_before_training(data, tmp_path, capsys, monkeypatch):
    from hpa_fastai.training import run

    def no_learner(*args, **kwargs):
        raise AssertionError("a Learner was built before the output folder was checked")

    monkeypatch.setattr(run, "run_learner", no_learner)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code, _, err = cli_in_process(capsys, "--data", data, "--arch", "cnn", "--no-pretrained", "--epochs", "1",
                                  "--out", blocker / "runs")
    assert code == 2 and "--out" in err and "not writable" in err


def test_data_folder_vanishing_mid_run_gives_a_clear_error(tmp_path):
    data = make_dataset(tmp_path / "data", "z2g", n_train=48, n_test=0, size=32, seed=12, easy=True)
    proc, run_dir = _start_and_wait(_args(data, tmp_path / "runs", epochs=40), tmp_path / "runs", 1)
    shutil.rmtree(data)
    out, err = proc.communicate(timeout=300)
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


# --- what --resume reads is checked; one process per run folder; cv continues; a full disk -------

@pytest.fixture(scope="module")
def resumable(data, tmp_path_factory):
    """A run folder that keeps its checkpoint (2 epochs), as a template that tests copy and edit."""
    out = tmp_path_factory.mktemp("resumable")
    return train(TrainConfig(data=str(data), out=str(out), arch="cnn", epochs=2, bs=8, lr="1e-3", pretrained=False,
                             keep_checkpoint=True))


def _copy_run(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / run_dir.name
    shutil.copytree(run_dir, copy)
    return copy


def _edit_json(path: Path, **changes) -> None:
    import json

    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("changes, message", [
    ({"lr_used": -0.5}, "'lr_used' must be a positive number"),
    ({"lr_used": "fast"}, "'lr_used' must be a positive number"),
    ({"mean": [0.5, 0.5]}, "'mean' must be a list of 3 numbers"),
    ({"std": [0.0, 0.2, 0.2]}, "'std' must be a list of 3 numbers in 0.001..1"),
    ({"pretrained_used": "yes"}, "'pretrained_used' must be true or false"),
    ({"channels": "rgbx"}, "--channels must be one of"),
    ({"precision_used": "fp8"}, "'precision_used' must be one of"),
    ({"epochs": -1}, "--epochs"),
])
def test_resume_checks_the_config_it_reads_as_strictly_as_flags(resumable, tmp_path, capsys, changes, message):
    run = _copy_run(resumable, tmp_path)
    _edit_json(run / "config.json", **changes)
    code, _, err = cli_in_process(capsys, "--resume", run)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(epochs_done="two"), "'epochs_done' must be a number of epochs"),
    (lambda c: c.update(phase="frozen"), "phase 'frozen' is not a phase of this run"),
    (lambda c: c.update(smooth_loss=(1, float("nan"))), "'smooth_loss' must be a count and a finite number"),
    (lambda c: c["model"][next(iter(c["model"]))].fill_(float("nan")), "is not finite"),
    (lambda c: c.update(epochs_done=7), "7 epochs done in phase train, which has 2"),
])
def test_resume_checks_the_checkpoint_it_reads(resumable, tmp_path, capsys, edit, message):
    run = _copy_run(resumable, tmp_path)
    ckpt = torch.load(run / "checkpoint.pth", weights_only=True)
    edit(ckpt)
    torch.save(ckpt, run / "checkpoint.pth")
    code, _, err = cli_in_process(capsys, "--resume", run)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert read_json(run / "status.json")["status"] != "running"


def test_a_run_that_is_training_cannot_be_resumed_by_a_second_process(data, tmp_path, capsys):
    proc, run_dir = _start_and_wait(_args(data, tmp_path / "runs", epochs=40), tmp_path / "runs", 1)
    try:
        code, _, err = cli_in_process(capsys, "--resume", run_dir)
        assert code == 2 and "another process is training this run" in err, err
        assert read_json(run_dir / "status.json")["status"] == "running"  # the refused process wrote nothing
    finally:
        proc.kill()
        proc.communicate(timeout=300)
    # the lock goes with the process: the killed run can be continued at once
    from hpa_fastai.runs.folder import run_lock

    with run_lock(run_dir):
        pass


def test_an_interrupted_cross_validation_continues_where_it_stopped(data, tmp_path, capsys):
    args = [sys.executable, str(REPO / "run.py"), "cv", "--data", str(data), "--arch", "cnn", "--epochs", "3",
            "--bs", "8", "--lr", "2e-3", "--no-pretrained", "--n-folds", "2", "--out", str(tmp_path / "runs")]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.time() + 600
    while time.time() < deadline:  # fold1 has checkpointed an epoch: fold0 is finished
        hist = list((tmp_path / "runs").glob("*-cv-cnn/fold1/history.csv"))
        if hist and len(pd.read_csv(hist[0])) >= 1 and (hist[0].parent / "checkpoint.pth").is_file():
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    cv_dir = hist[0].parent.parent
    fold0 = read_json(cv_dir / "fold0" / "metrics.json")
    assert read_json(cv_dir / "cv.json")["status"] == "running"
    code, _, err = cli_in_process(capsys, "predict", "--learner", cv_dir, "--data", data, "--out", tmp_path / "s.csv")
    assert code == 2 and "has not finished" in err and f"cv --resume {cv_dir}" in err

    code, out, err = cli_in_process(capsys, "cv", "--resume", cv_dir)
    assert code == 0, err
    assert "fold0 (1 of 2): finished before, kept" in out and "fold1 (2 of 2): continuing" in out
    assert read_json(cv_dir / "fold0" / "metrics.json") == fold0  # the finished fold was not trained again
    assert list(pd.read_csv(cv_dir / "fold1" / "history.csv")["epoch"]) == [1, 2, 3]
    cv = read_json(cv_dir / "cv.json")
    assert cv["status"] == "finished" and cv["runs"] == ["fold0", "fold1"]
    oof = pd.read_csv(cv_dir / "oof_predictions.csv", dtype=str)
    assert sorted(oof["id"]) == sorted(pd.read_csv(data / "train.csv", dtype=str)["Image"])
    code, _, err = cli_in_process(capsys, "predict", "--learner", cv_dir, "--data", data, "--out", tmp_path / "s.csv")
    assert code == 0, err


def test_status_is_recorded_in_place_when_the_disk_has_no_room_for_a_new_file(tmp_path, monkeypatch):
    from hpa_fastai.runs import folder

    folder.write_status(tmp_path, "running", started="now")
    monkeypatch.setattr(folder, "write_json", lambda *a, **k: (_ for _ in ()).throw(
        HPAError(f"cannot write {tmp_path / 'status.json'}: No space left on device")))
    folder.write_status(tmp_path, "failed", reason="cannot write checkpoint.pth: No space left on device")
    assert read_json(tmp_path / "status.json") == {"status": "failed",
                                                   "reason": "cannot write checkpoint.pth: No space left on device"}


def _small_disk(path: Path, megabytes: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)],
                         capture_output=True, text=True)
    return res.returncode == 0


def test_a_full_disk_during_training_names_the_file_and_the_cause(data, tmp_path):
    disk = tmp_path / "disk"
    if not _small_disk(disk, 30):
        pytest.skip("cannot mount a 30 MB tmpfs here (needs root and the mount capability); the in-place "
                    "status write is tested on its own above")
    try:
        # the plain CNN's checkpoint (weights and AdamW's two moments) is about 56 MB: the first one cannot fit
        res = subprocess.run(_args(data, disk / "runs", epochs=3), capture_output=True, text=True, timeout=600,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
        assert res.returncode == 2, res.stderr
        # the checkpoint, written while the next epoch trains, fills the disk; whichever write fails first
        # (the checkpoint, history.csv) is named, with the cause, and never the status it records
        last = res.stderr.strip().splitlines()[-1]
        assert last.startswith("error: cannot write ") and "No space left on device" in last, last
        assert "status.json" not in last and "Traceback" not in res.stderr
        run_dir = next(p for p in (disk / "runs").iterdir() if p.is_dir())
        status = read_json(run_dir / "status.json")
        assert status["status"] == "failed" and "No space left on device" in status["reason"]
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
