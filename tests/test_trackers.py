"""``--log mlflow`` and ``--log wandb`` record a run offline (MLflow's SQLite store beside the run
folders, W&B's offline mode): the config, every epoch's metrics, the lr_find plot, the final scores
and the report; ``--log`` takes any combination; ``--callback`` adds a user's fastai callback."""
from __future__ import annotations

import struct

import pytest

from hpa_fastai.config import TrainConfig

from .helpers import cli_in_process, read_json, train

EPOCHS = 2


def tiny(data, out, **kwargs) -> TrainConfig:
    return TrainConfig(data=str(data), arch="cnn", pretrained=False, size=16, bs=8, epochs=EPOCHS, workers=0,
                       lr_find_iters=8, out=str(out), **kwargs)


@pytest.mark.slow
def test_log_mlflow_records_config_epochs_plots_scores_and_report(make_z2g, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    run_dir = train(tiny(make_z2g(n=16), tmp_path / "runs", log=["mlflow"]))
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("hpa_fastai")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == read_json(run_dir / "trackers.json")["mlflow"]
    assert run.info.status == "FINISHED" and run.info.run_name == run_dir.name
    assert run.data.params["arch"] == "cnn" and float(run.data.params["lr_used"]) > 0
    history = client.get_metric_history(run.info.run_id, "f1_macro")
    assert [m.step for m in history] == list(range(1, EPOCHS + 1))
    assert {"train_loss", "valid_loss", "lr", "final/f1_macro_tuned"} <= set(run.data.metrics)
    metrics = read_json(run_dir / "metrics.json")
    assert run.data.metrics["final/f1_macro"] == pytest.approx(metrics["f1_macro"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "metrics.json", "lr_find.png", "curves.png", "history.csv", "report.html"} <= artifacts
    # the artifacts live beside the store, in the folder of the runs
    assert (tmp_path / "runs" / "mlartifacts").is_dir()


def wandb_records(path) -> list:
    """The records of an offline W&B run file: LevelDB's log format (32 KiB blocks of chunks, each
    with a 7-byte header: CRC, length, type) after W&B's own 7-byte header, each a protobuf Record."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, records, pending = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        if length == 0 and kind == 0:  # a block's zero padding
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


@pytest.mark.slow
def test_log_wandb_records_offline_into_the_run_folder(make_z2g, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    import json

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    run_dir = train(tiny(make_z2g(n=16), tmp_path / "runs", log=["wandb", "tensorboard"]))
    run_id = read_json(run_dir / "trackers.json")["wandb"]
    offline = sorted((run_dir / "wandb" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline) == 2  # the training, and the report added to the same run afterwards
    records = [r for folder in offline for r in wandb_records(folder / f"run-{run_id}.wandb")]
    updates = [r.config.update if r.HasField("config") else r.run.config.update for r in records
               if r.HasField("config") or r.HasField("run")]  # wandb.init's config comes in the run record
    config = {item.key: json.loads(item.value_json) for update in updates for item in update}
    assert config["arch"] == "cnn" and config["epochs"] == EPOCHS
    epochs = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
              for r in records if r.HasField("history")]
    f1 = [row["f1_macro"] for row in epochs if "f1_macro" in row]
    assert len(f1) == EPOCHS  # fastai's WandbCallback: one row of metrics per epoch
    assert any(key.startswith("lr_find/") for row in epochs for key in row)  # the plot, as a W&B image
    summary = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for r in records
               if r.HasField("summary") for item in r.summary.update}
    assert summary["final/f1_macro"] == pytest.approx(read_json(run_dir / "metrics.json")["f1_macro"])
    saved = {p.name for folder in offline for p in (folder / "files").iterdir()}
    assert {"config.json", "metrics.json", "lr_find.png", "curves.png", "report.html"} <= saved
    assert (run_dir / "tensorboard").is_dir()  # with tensorboard in the same --log


def test_log_takes_a_combination_and_refuses_unknown_names(capsys, make_z2g):
    from hpa_fastai.config import validate

    validate(TrainConfig(log=["tensorboard", "mlflow", "wandb"]))
    validate(TrainConfig(log="tensorboard"))  # config.json of a run from before trackers could be combined
    data = make_z2g(n=4)
    for args, message in ((["--log", "comet"], "--log must be none or any of tensorboard, mlflow, wandb"),
                          (["--log", "none", "mlflow"], "--log none cannot be combined"),
                          (["--callback", "nocolon"], "--callback must be module:Class")):
        code, out, err = cli_in_process(capsys, "--data", data, *args)
        assert code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err


CALLBACK = '''
from fastai.callback.core import Callback

class CountEpochs(Callback):
    epochs = []

    def after_epoch(self):
        CountEpochs.epochs.append((self.epoch, self.learn.run_phase.phase))
        with open(OUT, "a") as f:
            f.write(f"{self.epoch}\\n")
'''


def test_callback_flag_adds_the_users_callback_to_every_fit(make_z2g, tmp_path, capsys, monkeypatch):
    module = tmp_path / "user_cbs.py"
    module.write_text(f"OUT = {str(tmp_path / 'epochs.txt')!r}\n" + CALLBACK)
    data = make_z2g(n=8)
    base = ["--data", data, "--arch", "cnn", "--no-pretrained", "--size", "16", "--bs", "4", "--epochs", "2",
            "--lr", "1e-3", "--workers", "0", "--out", tmp_path / "runs"]
    code, out, err = cli_in_process(capsys, *base, "--callback", f"{module}:CountEpochs")
    assert code == 0, err
    assert (tmp_path / "epochs.txt").read_text().split() == ["0", "1"]
    monkeypatch.syspath_prepend(str(tmp_path))  # module:Class imports an installed or importable module
    code, out, err = cli_in_process(capsys, *base, "--callback", "user_cbs:CountEpochs")
    assert code == 0, err
    import user_cbs

    assert [phase for _, phase in user_cbs.CountEpochs.epochs] == ["train", "train"]
    assert read_json(tmp_path / "runs" / "latest" / "config.json")["callback"] == ["user_cbs:CountEpochs"]


@pytest.mark.parametrize("spec, message", [
    ("missing_file.py:Cb", "missing_file.py not found"),
    ("json:JSONDecoder", "json has no fastai Callback class named JSONDecoder"),
    ("no_such_module_here:Cb", "importing no_such_module_here failed (ModuleNotFoundError"),
])
def test_a_bad_callback_is_one_line_naming_it_and_leaves_no_run_folder(make_z2g, tmp_path, capsys, spec, message):
    code, out, err = cli_in_process(capsys, "--data", make_z2g(n=4), "--arch", "cnn", "--no-pretrained", "--size",
                                    "16", "--out", tmp_path / "runs", "--callback", spec)
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: --callback {spec}: ") and message in err
    assert not (tmp_path / "runs").exists()


def interrupt_after_first_epoch():
    """A callback that presses Ctrl-C right after the first epoch's checkpoint."""
    from fastai.callback.core import Callback

    class Interrupt(Callback):
        order = 100  # after the epoch's checkpoint

        def after_epoch(self):
            raise KeyboardInterrupt

    return Interrupt()


@pytest.mark.slow
def test_a_resumed_run_goes_on_in_the_same_mlflow_run(make_z2g, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from hpa_fastai.training import train as train_door

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    cfg = tiny(make_z2g(n=16), tmp_path / "runs", log=["mlflow"], lr="1e-3")
    cfg.epochs = 3
    with pytest.raises(KeyboardInterrupt):
        train_door(cfg, cbs=[interrupt_after_first_epoch()])
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if (p / "status.json").is_file()]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    run_id = read_json(run_dir / "trackers.json")["mlflow"]
    assert client.get_run(run_id).info.status == "KILLED"
    train(TrainConfig(resume=str(run_dir)))
    (run,) = client.search_runs([client.get_experiment_by_name("hpa_fastai").experiment_id])
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "f1_macro")] == [1, 2, 3]  # each epoch once
