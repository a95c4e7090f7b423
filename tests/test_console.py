"""What the console shows: one line per epoch without the columns that never change (the phase
only where it changes), the per-class table on request (report.html and per_class.csv always hold
it), no trailing spaces, and predict's table of a folder: every image up to 20, the first ten above."""
from __future__ import annotations

import contextlib
import io
import shutil

import pytest

from hpa_fastai.cli.epochs import epoch_line
from hpa_fastai.synth import make_dataset

from .helpers import cli_in_process


def row(epoch, phase, loss=0.5):
    return {"epoch": epoch, "phase": phase, "train_loss": loss, "valid_loss": loss, "f1_macro": 0.25,
            "f1_samples": 0.5, "lr": 1e-3, "seconds": 4.25}


def test_an_epoch_line_names_the_phase_only_where_it_changes():
    rows = [row(1, "frozen"), row(2, "unfrozen"), row(3, "unfrozen")]
    lines = [epoch_line(r, rows[i - 1] if i else None) for i, r in enumerate(rows)]
    assert lines[0].startswith("epoch 1 (frozen)  train_loss 0.5000")
    assert lines[1].startswith("epoch 2 (unfrozen)  ") and lines[2].startswith("epoch 3  train_loss")
    assert lines[2].endswith("lr 1.00e-03  4.2s") and "phase" not in "".join(lines)
    single = epoch_line(row(1, "train"), None)
    assert single.startswith("epoch 1  train_loss") and "train " not in single.replace("train_loss", "")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("z2g"), "z2g", n_train=24, n_test=25, size=16, seed=0, easy=True)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """(run folder, the console output of training it), trained once for the module (capsys is a
    fixture of one test)."""
    from hpa_fastai.cli import main

    out = tmp_path_factory.mktemp("runs")
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(["--data", str(data), "--arch", "cnn", "--no-pretrained", "--bs", "8", "--epochs", "2", "--lr",
                     "1e-3", "--out", str(out)])
    assert code == 0
    return (out / "latest").resolve(), buffer.getvalue()


def test_a_run_prints_one_line_per_epoch_and_no_per_class_table(trained):
    run, printed = trained
    lines = printed.splitlines()
    assert [ln.split()[:2] for ln in lines if ln.startswith("epoch ")] == [["epoch", "1"], ["epoch", "2"]]
    assert "phase" not in printed and "per class" not in printed.split("artifacts in")[0]
    assert "Nucleoplasm" not in printed  # no per-class table
    assert "--per-class" in printed
    assert all(line == line.rstrip() for line in lines), [ln for ln in lines if ln != ln.rstrip()]
    assert (run / "per_class.csv").is_file() and "Nucleoplasm" in (run / "report.html").read_text()


def test_per_class_prints_the_table(data, tmp_path, capsys):
    code, out, err = cli_in_process(capsys, "--data", data, "--arch", "cnn", "--no-pretrained", "--bs", "8",
                                    "--epochs", "1", "--lr", "1e-3", "--out", tmp_path / "runs", "--per-class")
    assert code == 0, err
    assert "validation, per class" in out and "Nucleoplasm" in out
    assert all(line == line.rstrip() for line in out.splitlines())


def test_predict_shows_every_image_up_to_20_and_the_first_ten_above(trained, data, tmp_path, capsys):
    run, _ = trained
    images = sorted((data / "test").glob("*.png"))
    assert len(images) == 25
    code, out, err = cli_in_process(capsys, "predict", "--learner", run, "--data", data / "test", "--out",
                                    tmp_path / "all.csv")
    assert code == 0, err
    assert "the first 10 of 25 images" in out and str(tmp_path / "all.csv") in out
    assert sum(image.stem in out for image in images) == 10
    few = tmp_path / "few"
    few.mkdir()
    for image in images[:20]:
        shutil.copy(image, few)
    code, out, err = cli_in_process(capsys, "predict", "--learner", run, "--data", few, "--out", tmp_path / "few.csv")
    assert code == 0, err
    assert "first" not in out and sum(image.stem in out for image in images[:20]) == 20
