"""The runs table: every run under a folder with its data, model, scores and status, sortable and exportable."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest

from hpa_fastai.atomic import folder_size
from hpa_fastai.config import TrainConfig
from hpa_fastai.runs.table import collect_runs
from hpa_fastai.synth import make_dataset
from .helpers import train

from .helpers import cli_in_process, read_json

SMALL_FILES = ("config.json", "status.json", "metrics.json", "history.csv")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A runs folder as a user has it after a while: a finished run, one stopped early, one killed
    (status still 'running', files an hour old), one running now, plus things that are not runs."""
    data = make_dataset(tmp_path_factory.mktemp("z2g"), "z2g", n_train=32, n_test=0, size=32, seed=0, easy=True)
    out = tmp_path_factory.mktemp("runs")
    base = dict(data=str(data), out=str(out), arch="cnn", size=16, bs=8, pretrained=False, seed=0)  # 16 px: fast on CPU
    finished = train(TrainConfig(**base, epochs=2, lr="1e-3"))
    # a learning rate too small to learn anything: valid_loss stops improving, early stopping ends it
    stopped = train(TrainConfig(**base, epochs=8, lr="1e-12", patience=1, monitor="valid_loss"))

    def copy(name, status):
        run_dir = out / name
        run_dir.mkdir()
        for f in SMALL_FILES:
            if f != "metrics.json" or status["status"] != "running":
                shutil.copy(finished / f, run_dir / f)
        (run_dir / "status.json").write_text(json.dumps(status))
        return run_dir

    killed = copy("20200101-000000-resnet34", {"status": "running", "started": "2020-01-01T00:00:00"})
    hour_ago = time.time() - 3600
    for f in killed.iterdir():
        os.utime(f, (hour_ago, hour_ago))
    running = copy("20200102-000000-resnet18", {"status": "running", "started": "2020-01-02T00:00:00"})
    (out / "lr_find-cnn-only").mkdir()  # lr-find folders have a config but no status: not training runs
    (out / "lr_find-cnn-only" / "config.json").write_text("{}")
    (out / "notes.txt").write_text("not a run")
    return {"out": out, "finished": finished, "stopped": stopped, "killed": killed, "running": running}


def test_table_lists_every_run_with_values_from_its_files(runs):
    df = collect_runs(runs["out"])
    assert set(df["run"]) == {runs[k].name for k in ("finished", "stopped", "killed", "running")}
    row = df.set_index("run").loc[runs["finished"].name]
    metrics, config = read_json(runs["finished"] / "metrics.json"), read_json(runs["finished"] / "config.json")
    assert row["f1"] == pytest.approx(metrics["f1_macro"])
    assert row["f1_tuned"] == pytest.approx(metrics["f1_macro_tuned"])
    assert row["epochs"] == metrics["epochs_run"] == 2 and row["best_epoch"] == metrics["best_epoch"]
    assert row["time"] == pytest.approx(metrics["seconds"])
    assert (row["data"], row["arch"], row["channels"], row["size"]) == (config["data"], "cnn", "rgb", 16)
    assert row["date"].startswith(runs["finished"].name[:4] + "-")
    only = collect_runs(runs["out"] / "latest")  # a run folder itself (here through the link) is a table of one
    assert list(only["run"]) == [runs["stopped"].name]


def test_statuses_finished_stopped_early_interrupted_running(runs):
    status = collect_runs(runs["out"]).set_index("run")["status"]
    assert status[runs["finished"].name] == "finished"
    assert status[runs["stopped"].name] == "stopped early"
    assert status[runs["killed"].name] == "interrupted"
    assert status[runs["running"].name] == "running"
    killed = collect_runs(runs["out"]).set_index("run").loc[runs["killed"].name]
    assert pd.isna(killed["f1"]) and killed["epochs"] == 2  # from history.csv: no metrics yet


def test_sorting(runs):
    by_date = collect_runs(runs["out"], sort="date")
    assert list(by_date["run"]) == sorted(by_date["run"])
    by_f1 = collect_runs(runs["out"], sort="f1")
    scored = by_f1["f1"].dropna()
    assert list(scored) == sorted(scored, reverse=True) and by_f1["f1"].iloc[-1:].isna().all()
    by_epochs = collect_runs(runs["out"], sort="epochs")
    assert by_epochs["run"].iloc[0] == runs["stopped"].name  # more epochs than the 2-epoch runs
    assert list(collect_runs(runs["out"], sort="status")["status"]) == sorted(by_date["status"])


def test_cli_prints_the_table_and_exports_csv(runs, tmp_path, capsys):
    csv = tmp_path / "runs.csv"
    code, out, err = cli_in_process(capsys, "runs", runs["out"], "--sort", "f1_tuned", "--csv", csv)
    assert code == 0, err
    for key in ("finished", "stopped", "killed", "running"):
        assert runs[key].name in out
    assert "stopped early" in out and "interrupted" in out and "│ latest" not in out
    table = pd.read_csv(csv)
    assert len(table) == 4
    assert {"date", "data", "arch", "channels", "size", "epochs", "best_epoch", "f1", "f1_tuned", "time",
            "status", "disk_bytes"} <= set(table.columns)
    # the size on disk: what the run folders hold, as the table shows it
    for row in table.itertuples():
        assert row.disk_bytes == folder_size(Path(row.path).resolve())
    assert "disk" in out and (" MB" in out or " KB" in out)
    assert list(table["f1_tuned"].dropna()) == sorted(table["f1_tuned"].dropna(), reverse=True)


def test_no_runs_is_a_message_not_an_error(tmp_path, capsys):
    code, out, _ = cli_in_process(capsys, "runs", tmp_path / "nothing-here")
    assert code == 0 and "no runs" in out
    (tmp_path / "empty").mkdir()
    code, out, _ = cli_in_process(capsys, "runs", tmp_path / "empty")
    assert code == 0 and "no runs" in out


def test_a_file_instead_of_a_folder_is_an_error(tmp_path, capsys):
    (tmp_path / "runs.txt").write_text("")
    code, _, err = cli_in_process(capsys, "runs", tmp_path / "runs.txt")
    assert code == 2 and "runs.txt" in err and "Traceback" not in err
