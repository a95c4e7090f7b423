"""The learning-rate finder and ``--lr auto``: the rule reads a smoothed curve of every batch's own
loss, falls back (and says so, naming the plot) when the curve has too few points or is flat; the
plot shows the whole range tried; no JSON file the tool writes holds NaN."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from hpa_fastai import plots
from hpa_fastai.atomic import write_json
from hpa_fastai.synth import make_dataset
from hpa_fastai.training import schedule
from hpa_fastai.training.schedule import FALLBACK_LR, auto_lr

from .helpers import cli_in_process


def strict_json(path):
    """JSON as a strict parser reads it: NaN and Infinity are not numbers there."""
    def refuse(name):
        raise ValueError(f"{path}: {name} is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


LRS = np.geomspace(1e-7, 10, 60)


def test_auto_takes_a_tenth_of_the_smoothed_minimum():
    rng = np.random.default_rng(0)
    # flat, falling from 1e-4 to a minimum at 1e-2, then diverging; noisy batch to batch
    curve = np.where(LRS < 1e-4, 1.0, 1.0 - 0.4 * np.clip(np.log10(LRS / 1e-4) / 2, 0, 1))
    curve = np.where(LRS > 1e-2, 0.6 + 3 * np.log10(LRS / 1e-2) ** 2, curve)
    choice = auto_lr(LRS, curve + rng.normal(0, 0.02, len(LRS)))
    assert choice.problem is None and choice.rule == "minimum / 10"
    assert 3e-4 <= choice.lr <= 3e-3


def test_auto_falls_back_on_a_flat_curve_and_on_too_few_points_or_iterations():
    flat = auto_lr(LRS, 0.7 + np.random.default_rng(1).normal(0, 0.002, len(LRS)))
    assert flat.lr == FALLBACK_LR and "flat" in flat.problem
    few = auto_lr(LRS[:5], [0.7, 0.6, 0.5, 0.4, 0.3])
    assert few.lr == FALLBACK_LR and "5 usable point(s)" in few.problem
    falling = np.linspace(1.0, 0.5, 20)
    short = auto_lr(LRS[:20], falling, iters=20)  # the bundled sample's 4 batches give lr_find 20 iterations
    assert short.lr == FALLBACK_LR and "ran 20 iterations" in short.problem
    assert auto_lr(LRS[:20], falling, iters=60).problem is None


def test_auto_reads_the_curve_only_up_to_the_first_loss_that_is_not_finite():
    losses = np.r_[np.linspace(1.0, 0.5, 30), [np.nan] * 30]  # still falling when the loss became NaN
    assert auto_lr(LRS, losses).lr == pytest.approx(LRS[29] / 10, rel=0.2)


def test_a_json_file_never_holds_nan(tmp_path):
    write_json(tmp_path / "a.json", {"x": float("nan"), "y": [1.0, float("inf")], "z": np.float32("nan"),
                                     "n": {"deep": np.float64(-np.inf)}})
    assert strict_json(tmp_path / "a.json") == {"x": None, "y": [1.0, None], "z": None, "n": {"deep": None}}


@pytest.mark.slow
def test_lr_find_plots_the_whole_range_and_writes_strict_json(tmp_path, capsys, monkeypatch):
    data = make_dataset(tmp_path / "z2g", "z2g", n_train=24, n_test=0, size=16, seed=0, easy=True)
    drawn = {}
    real_plot = plots.lr_find_plot

    def spy(path, lrs, losses, smoothed, suggestions, chosen=None):
        drawn.update(lrs=list(lrs), losses=list(losses), chosen=chosen)
        return real_plot(path, lrs, losses, smoothed, suggestions, chosen)

    monkeypatch.setattr(plots, "lr_find_plot", spy)
    code, out, err = cli_in_process(capsys, "lr-find", "--data", data, "--arch", "cnn", "--no-pretrained", "--bs",
                                    "8", "--lr-find-iters", "12", "--out", tmp_path / "runs")
    assert code == 0, err
    (folder,) = (tmp_path / "runs").iterdir()
    found = strict_json(folder / "lr_find.json")
    assert drawn["lrs"] == pytest.approx(found["lrs"])  # every learning rate tried is on the plot
    assert len(found["lrs"]) == len(found["raw_losses"]) == len(drawn["losses"])
    assert drawn["chosen"] == pytest.approx(found["suggestions"]["auto"])
    assert (folder / "lr_find.png").stat().st_size > 0
    assert "nan" not in out.lower()  # a suggestion that found nothing is named, not printed as nan
    assert math.isfinite(found["suggestions"]["auto"])


@pytest.mark.slow
def test_a_flat_lr_find_warns_and_names_the_plot(tmp_path, capsys, monkeypatch):
    from hpa_fastai.training.schedule import LrChoice

    monkeypatch.setattr(schedule, "auto_lr",
                        lambda lrs, losses, iters: LrChoice(FALLBACK_LR, "fallback", "the curve is flat"))
    data = make_dataset(tmp_path / "z2g", "z2g", n_train=24, n_test=0, size=16, seed=0, easy=True)
    code, out, err = cli_in_process(capsys, "--data", data, "--arch", "cnn", "--no-pretrained", "--bs", "8",
                                    "--epochs", "1", "--lr-find-iters", "8", "--out", tmp_path / "runs")
    assert code == 0, err
    warning = next(line for line in out.splitlines() if line.startswith("warning: --lr auto"))
    assert "the curve is flat" in warning and "lr_find.png" in warning and "1e-03" not in warning
    config = json.loads((tmp_path / "runs" / "latest" / "config.json").read_text())
    assert config["lr_used"] == FALLBACK_LR
