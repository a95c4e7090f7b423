"""``run.py tune``: a study of training runs drawn by Optuna. Its folder and what reads it, the flags
held fixed, reproducible draws, pruning, a failing trial, the study's space guarded, Ctrl-C and
kill -9 (one worker and several), the fastai callback in a notebook's fit, PostgreSQL with two
tune commands at once, and optuna-dashboard on the study file.

Every study trains the plain CNN on a few dozen 16 px images for one to three epochs."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import optuna
import pandas as pd
import pytest

from hpa_fastai.config import TuneConfig
from hpa_fastai.search import OptunaPruning, tune
from hpa_fastai.search import study as study_module
from hpa_fastai.search import trials as trials_module
from hpa_fastai.search import workers as workers_module

from .helpers import REPO, cli_in_process, read_json

pytestmark = pytest.mark.slow
TINY = ["--arch", "cnn", "--no-pretrained", "--size", "16", "--bs", "8"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from hpa_fastai.synth import make_dataset

    return make_dataset(tmp_path_factory.mktemp("z2g"), "z2g", n_train=32, n_test=2, size=16, seed=5, easy=True)


def tune_args(data, out, *extra):
    return ["tune", "--data", data, "--out", out, *TINY, *extra]


def trials_csv(folder) -> pd.DataFrame:
    return pd.read_csv(Path(folder) / "trials.csv")


@pytest.fixture(scope="module")
def finished_study(data, tmp_path_factory):
    """A study of three trials and a confirmation with one new seed, run as the command line runs it."""
    out = tmp_path_factory.mktemp("runs")
    from hpa_fastai.cli import main

    code = main([str(a) for a in tune_args(data, out, "--epochs", "2", "--n-trials", "3", "--confirm", "1",
                                           "--pruner", "none")])
    assert code == 0
    return out, out / "tune-default"


def test_a_study_writes_its_folder_and_points_at_the_best_confirmed_run(finished_study, capsys):
    out, folder = finished_study
    trials = trials_csv(folder)
    assert list(trials["number"]) == [0, 1, 2] and set(trials["state"]) == {"complete"}
    assert list(trials["run"]) == ["trial-0000", "trial-0001", "trial-0002"]
    settings = read_json(folder / "tune.json")
    assert settings["status"] == "finished" and settings["objective"] == "f1_macro_tuned_oos"
    # the flags given are held fixed: neither arch nor size is drawn, and every trial trained with them
    assert "arch" not in settings["space"] and "size" not in settings["space"] and "lr" in settings["space"]
    assert settings["fixed"] == {"arch": "cnn", "pretrained": False, "size": 16, "bs": 8, "epochs": 2}
    for run in trials["run"]:
        config = read_json(folder / run / "config.json")
        assert (config["arch"], config["size"], config["epochs"]) == ("cnn", 16, 2)
    best = settings["best"]
    assert best["value"] == pytest.approx(trials["value"].max())
    # each trial's config is the best one's draw: the learning rate drawn is the one it trained with
    row = trials.loc[trials["number"] == best["number"]].iloc[0]
    assert float(read_json(folder / row["run"] / "config.json")["lr"]) == pytest.approx(row["param_lr"])
    confirmation = settings["confirmation"]
    assert [r["seed"] for r in confirmation["runs"]] == [43] and confirmation["trial"] == best["number"]
    confirmed = folder / confirmation["runs"][0]["run"]
    assert read_json(confirmed / "config.json")["seed"] == 43
    assert (folder / "best").resolve() == confirmed.resolve() == (out / "latest").resolve()
    page = (folder / "tune.html").read_text()
    for section in ("Optimisation history", "Parameter importances", "Score against each parameter",
                    "Confirmation: the winner", "trial-0002"):
        assert section in page
    assert "http://" not in page and "https://" not in page  # self-contained


def test_runs_report_and_predict_read_a_trial_folder_as_any_run(finished_study, data, tmp_path, capsys):
    _, folder = finished_study
    code, stdout, err = cli_in_process(capsys, "runs", folder)
    assert code == 0, err
    assert "trial-0000" in stdout and "trial-0002" in stdout and "confirm-t" in stdout
    copy = shutil.copytree(folder / "trial-0001", tmp_path / "trial-0001")
    code, _, err = cli_in_process(capsys, "report", copy)
    assert code == 0, err
    code, _, err = cli_in_process(capsys, "predict", "--learner", folder / "best", "--data", data,
                                  "--out", tmp_path / "sub.csv")
    assert code == 0, err
    assert len(pd.read_csv(tmp_path / "sub.csv")) == 2


def test_the_same_command_continues_a_finished_study_without_new_trials(finished_study, data, capsys):
    out, folder = finished_study
    code, stdout, err = cli_in_process(capsys, *tune_args(data, out, "--epochs", "2", "--n-trials", "3",
                                                          "--confirm", "1", "--pruner", "none"))
    assert code == 0, err
    assert len(trials_csv(folder)) == 3  # --n-trials counts the finished trials the study holds
    assert not [line for line in stdout.splitlines() if line.startswith("[")]  # no trial ran
    assert "finished before, kept" in stdout  # nor the confirmation


def test_another_space_on_the_same_study_is_refused_and_nothing_changes(finished_study, data, tmp_path, capsys):
    out, folder = finished_study
    before = (folder / "tune.json").read_text(), (folder / "study.journal").read_bytes()
    space = tmp_path / "space.toml"
    space.write_text('lr = { low = 1e-3, high = 1e-1, log = true }\n')
    code, _, err = cli_in_process(capsys, *tune_args(data, out, "--epochs", "2", "--n-trials", "4", "--space", space))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "searches another space" in err and "lr" in err and "--study" in err
    # a flag given that the first command drew from the space is another space too
    code, _, err = cli_in_process(capsys, *tune_args(data, out, "--epochs", "2", "--n-trials", "4", "--lr", "1e-3"))
    assert code == 2 and "searches another space" in err
    assert ((folder / "tune.json").read_text(), (folder / "study.journal").read_bytes()) == before


def test_one_worker_with_the_same_seed_draws_the_same_configurations(data, tmp_path):
    def draws(out, seed):
        cfg = TuneConfig(data=str(data), out=str(out), arch="cnn", pretrained=False, size=16, bs=8, epochs=1,
                         n_trials=3, confirm=0, seed=seed, pruner="none")
        trials = tune(cfg, fixed=("arch", "pretrained", "size", "bs", "epochs")).trials
        # a parameter a trial did not draw (another loss's) is NaN: compared as JSON, where NaN equals NaN
        return [json.dumps(r, sort_keys=True) for r in trials.filter(like="param_").to_dict("records")]

    first = draws(tmp_path / "a", 7)
    assert draws(tmp_path / "b", 7) == first
    assert draws(tmp_path / "c", 8) != first
    assert len(set(first)) == 3  # trials of one study differ


def test_a_failing_trial_is_recorded_with_its_reason_and_the_study_goes_on(data, tmp_path, capsys):
    space = tmp_path / "space.toml"
    space.write_text('size = { choices = [8, 16] }\nlr = { low = 1e-3, high = 1e-2, log = true }\n')
    args = ["tune", "--data", data, "--out", tmp_path, "--arch", "cnn", "--no-pretrained", "--bs", "8",
            "--epochs", "1", "--n-trials", "2", "--confirm", "0", "--space", space, "--seed", "3"]
    code, stdout, err = cli_in_process(capsys, *args)
    assert code == 0, err
    trials = trials_csv(tmp_path / "tune-default")
    failed = trials[trials["state"] == "failed"]
    assert len(failed) >= 1, trials  # seed 3 draws 8 px at least once
    assert (trials["state"] == "complete").sum() == 2  # the study went on to its two finished trials
    assert set(failed["param_size"]) == {8} and set(trials.loc[trials["state"] == "complete", "param_size"]) == {16}
    assert all("below the 16 pixels cnn takes" in reason for reason in failed["reason"])
    assert "trial 0 failed" in stdout or "trial 1 failed" in stdout
    assert "16 pixels cnn takes" in stdout and "[W " not in stdout + err  # our line, not Optuna's warning


def test_pruned_trials_keep_no_weights_and_say_so(data, tmp_path, monkeypatch):
    # a pruner that stops every trial at its first epoch, to see what a pruned trial leaves
    monkeypatch.setattr(study_module, "make_pruner", lambda kind, epochs: optuna.pruners.ThresholdPruner(lower=2.0))
    cfg = TuneConfig(data=str(data), out=str(tmp_path), arch="cnn", pretrained=False, size=16, bs=8, epochs=3,
                     n_trials=2, confirm=1)
    result = tune(cfg, fixed=("arch", "pretrained", "size", "bs", "epochs"))
    trials = result.trials
    assert list(trials["state"]) == ["pruned", "pruned"] and list(trials["epochs_run"]) == [1, 1]
    for run in trials["run"]:
        run_dir = tmp_path / "tune-default" / run
        status = read_json(run_dir / "status.json")
        assert status["status"] == "pruned" and "pruned after epoch 1" in status["reason"]
        assert len(pd.read_csv(run_dir / "history.csv")) == 1
        for weights in ("checkpoint.pth", "best.pth", "model.safetensors", "export.pkl"):
            assert not (run_dir / weights).exists()
    # no trial completed: nothing to confirm or point at
    assert result.best is None and result.confirmation is None and not (tmp_path / "tune-default" / "best").exists()


def test_the_callback_reports_each_epoch_and_prunes_a_notebook_fit(data):
    from hpa_fastai import hpa_dls, hpa_learner

    dls = hpa_dls(data, size=16, bs=8)
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.NopPruner())
    trial = study.ask()
    learn = hpa_learner(dls, "cnn", pretrained=False)
    learn.fit_one_cycle(2, 1e-3, cbs=OptunaPruning(trial, "f1_macro"))
    f1 = [row[learn.recorder.metric_names.index("f1_macro") - 1] for row in learn.recorder.values]
    assert study.trials[-1].intermediate_values == {1: pytest.approx(f1[0]), 2: pytest.approx(f1[1])}
    study.pruner = optuna.pruners.ThresholdPruner(lower=2.0)
    trial = study.ask()
    with pytest.raises(optuna.TrialPruned):
        hpa_learner(dls, "cnn", pretrained=False).fit_one_cycle(3, 1e-3, cbs=OptunaPruning(trial, "f1_macro"))
    assert list(study.trials[-1].intermediate_values) == [1]


# --- Ctrl-C and kill -9 ----------------------------------------------------------------------------

def _env():
    return {**os.environ, "PYTHONPATH": str(REPO)}


def _start(args, **kwargs):
    return subprocess.Popen([sys.executable, str(REPO / "run.py"), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(), **kwargs)


def _wait_for(predicate, proc, what: str, seconds: float = 300):
    deadline = time.time() + seconds
    while time.time() < deadline:
        found = predicate()
        if found:
            return found
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"ended before {what}: {proc.stdout.read()} {proc.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError(f"no {what} after {seconds} s")


def _training(folder: Path, epochs: int = 1):
    """A trial folder whose history has ``epochs`` rows and that is still training."""
    for history in sorted(folder.glob("trial-*/history.csv")):
        status = json.loads((history.parent / "status.json").read_text())
        try:
            rows = len(pd.read_csv(history))
        except (pd.errors.EmptyDataError, OSError):
            continue
        if status.get("status") == "running" and rows >= epochs:
            return history.parent
    return None


def test_ctrl_c_ends_the_current_trial_and_the_same_command_continues_the_study(data, tmp_path):
    args = tune_args(data, tmp_path, "--epochs", "6", "--n-trials", "2", "--confirm", "0", "--pruner", "none")
    folder = tmp_path / "tune-default"
    proc = _start(args)
    run_dir = _wait_for(lambda: _training(folder), proc, "a trial with an epoch")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "the same command continues it" in out
    assert read_json(run_dir / "status.json")["status"] == "interrupted"
    trials = trials_csv(folder)
    assert trials.iloc[-1]["state"] == "failed" and "interrupted" in trials.iloc[-1]["reason"]
    assert read_json(folder / "tune.json")["status"] == "interrupted" and (folder / "tune.html").is_file()
    done = subprocess.run([sys.executable, str(REPO / "run.py"), *map(str, args)], capture_output=True, text=True,
                          env=_env(), timeout=600)
    assert done.returncode == 0, done.stderr
    trials = trials_csv(folder)
    assert (trials["state"] == "complete").sum() == 2  # two finished trials, the interrupted one not counted
    assert read_json(folder / "tune.json")["status"] == "finished"


def test_a_tune_killed_mid_trial_leaves_a_trial_the_next_tune_marks_failed(data, tmp_path):
    args = tune_args(data, tmp_path, "--epochs", "6", "--n-trials", "1", "--confirm", "0", "--pruner", "none")
    folder = tmp_path / "tune-default"
    proc = _start(args)
    run_dir = _wait_for(lambda: _training(folder), proc, "a trial with an epoch")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert read_json(run_dir / "status.json")["status"] == "running"
    done = subprocess.run([sys.executable, str(REPO / "run.py"), *map(str, args)], capture_output=True, text=True,
                          env=_env(), timeout=600)
    assert done.returncode == 0, done.stderr
    trials = trials_csv(folder)
    killed = trials[trials["run"] == run_dir.name].iloc[0]
    assert killed["state"] == "failed" and "ended without finishing it (killed?)" in killed["reason"]
    assert "marked failed" in done.stdout
    assert read_json(run_dir / "status.json")["status"] == "interrupted"
    assert (trials["state"] == "complete").sum() == 1


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc to find the worker processes")
def test_with_two_workers_a_worker_killed_mid_trial_is_noticed_and_the_study_finishes(data, tmp_path):
    args = tune_args(data, tmp_path, "--epochs", "4", "--n-trials", "4", "--confirm", "0", "--pruner", "none",
                     "--jobs", "2")
    folder = tmp_path / "tune-default"
    proc = _start(args)
    run_dir = _wait_for(lambda: _training(folder), proc, "a trial with an epoch")
    # the worker training it: its pid is in the lock it holds, which the trial records
    workers = _wait_for(lambda: len(_children(proc.pid)) == 2 and _children(proc.pid), proc, "two workers")
    trial_number = int(run_dir.name.split("-")[1])
    storage = study_module.open_storage(None, folder)
    token = optuna.load_study(study_name="default", storage=storage).trials[trial_number].user_attrs["worker"]
    victim = int(trials_module.TOKEN.fullmatch(token)["pid"])
    assert victim in workers
    os.kill(victim, signal.SIGKILL)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    trials = trials_csv(folder)
    killed = trials[trials["number"] == trial_number].iloc[0]
    assert killed["state"] == "failed" and "ended without finishing it" in killed["reason"]
    assert (trials["state"] == "complete").sum() == 4  # the other worker went on to the study's four
    assert trials.loc[trials["state"] == "complete", "worker"].nunique() >= 1
    assert "database is locked" not in out + err
    assert "ended with exit code -9" in out


# --- PostgreSQL ------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(candidates[-1]) if candidates else None


@pytest.fixture(scope="module")
def postgres_url(tmp_path_factory):
    """A PostgreSQL server: HPA_POSTGRES_URL (what .ci/run starts), else a throwaway cluster started
    here; a skip with the reason where neither is possible, a failure where HPA_REQUIRE_POSTGRES=1."""
    pytest.importorskip("psycopg", reason="the postgres extra (psycopg) is not installed")
    required = os.environ.get("HPA_REQUIRE_POSTGRES") == "1"
    if os.environ.get("HPA_POSTGRES_URL"):
        yield os.environ["HPA_POSTGRES_URL"]
        return
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    problem = None if initdb and pg_ctl else "no initdb/pg_ctl (apt-get install postgresql)"
    root = os.geteuid() == 0
    run_as = []
    if problem is None and root:
        runuser = shutil.which("runuser")
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            problem = "running as root and there is no postgres user to run the server as"
        if runuser is None:
            problem = problem or "running as root without runuser"
        run_as = [runuser, "-u", "postgres", "--"]
    if problem is not None:
        if required:
            pytest.fail(f"HPA_REQUIRE_POSTGRES=1 but no PostgreSQL server can be started: {problem}")
        pytest.skip(f"no PostgreSQL server: {problem}; set HPA_POSTGRES_URL to use one")
    # not under pytest's folder: its parent is private to this user, and the server runs as postgres
    folder = Path(tempfile.mkdtemp(prefix="hpa-pg-"))
    data_dir = folder / "data"
    if root:
        shutil.chown(folder, "postgres")
    port = _free_port()
    subprocess.run([*run_as, initdb, "-D", str(data_dir), "-U", "hpa", "--auth=trust", "-E", "UTF8"], check=True,
                   capture_output=True, timeout=120)
    start = subprocess.run([*run_as, pg_ctl, "-D", str(data_dir), "-l", str(folder / "log"), "-w", "-o",
                            f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start"],
                           capture_output=True, text=True, timeout=120)
    if start.returncode != 0:
        message = f"the throwaway PostgreSQL server did not start: {start.stderr.strip()[:300]}"
        if required:
            pytest.fail(message)
        pytest.skip(message)
    try:
        import psycopg

        with psycopg.connect(f"postgresql://hpa@127.0.0.1:{port}/postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE optuna_test")
        yield f"postgresql://hpa:unused@127.0.0.1:{port}/optuna_test"
    finally:
        subprocess.run([*run_as, pg_ctl, "-D", str(data_dir), "-m", "immediate", "stop"], capture_output=True,
                       timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


def test_two_tune_commands_share_one_postgresql_study(data, tmp_path, postgres_url):
    study = f"pg{os.getpid()}"
    procs = [_start(tune_args(data, tmp_path / f"machine{k}", "--epochs", "1", "--n-trials", "6", "--confirm", "0",
                              "--storage", postgres_url, "--study", study))
             for k in (0, 1)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err
        assert "unused" not in out + err  # the URL's password is never shown
    loaded = optuna.load_study(study_name=study, storage=study_module._sqlalchemy_url(postgres_url))
    finished = [t for t in loaded.trials if t.state.is_finished() and t.state != optuna.trial.TrialState.FAIL]
    assert len(finished) >= 6
    workers = {t.user_attrs["worker"] for t in loaded.trials}
    assert len(workers) == 2  # both commands ran trials of the one study
    numbers = sorted(t.number for t in loaded.trials)
    assert numbers == list(range(len(numbers)))  # one numbering across both
    for k in (0, 1):
        settings = read_json(tmp_path / f"machine{k}" / f"tune-{study}" / "tune.json")
        assert settings["storage"].startswith("postgresql+psycopg://hpa:***@127.0.0.1")


# --- optuna-dashboard --------------------------------------------------------------------------------

def test_optuna_dashboard_serves_the_study_file(finished_study):
    pytest.importorskip("optuna_dashboard", reason="the dashboard extra is not installed")
    _, folder = finished_study
    port = _free_port()
    dashboard = Path(sys.executable).parent / "optuna-dashboard"
    if not dashboard.is_file():
        pytest.skip(f"no optuna-dashboard script beside {sys.executable}")
    proc = subprocess.Popen([str(dashboard), str(folder / "study.journal"), "--port", str(port), "--host",
                             "127.0.0.1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env())
    def get(path):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
                return json.loads(answer.read())
        except OSError:
            return None

    try:
        found = _wait_for(lambda: get("/api/studies"), proc, "the dashboard's answer", seconds=120)
        assert [s["study_name"] for s in found["study_summaries"]] == ["default"]
        study = get(f"/api/studies/{found['study_summaries'][0]['study_id']}?after=0")
        assert len(study["trials"]) == len(trials_csv(folder))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# --- without training ---------------------------------------------------------------------------------

@pytest.mark.parametrize("arch, pretrained", [("resnet18", True), ("resnet18", False), ("cnn", True)])
def test_a_parameter_is_drawn_only_with_what_it_belongs_to(arch, pretrained):
    from hpa_fastai.config import TrainConfig
    from hpa_fastai.search import default_space

    base = TrainConfig(arch=arch, pretrained=pretrained)
    space = default_space(64).without(["arch"])
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(30):
        params = space.sample(study.ask(), base)
        assert ("focal_gamma" in params) == (params["loss"] == "focal")
        assert ("asl_gamma_neg" in params) == ("asl_clip" in params) == (params["loss"] == "asl")
        assert ("freeze_epochs" in params) == (pretrained and arch != "cnn")
        assert "oversample_cap" in params  # oversampling is on by default
    assert "oversample_cap" not in space.sample(study.ask(), TrainConfig(arch=arch, oversample=False))


def test_each_worker_gets_its_share_of_the_cores_and_its_own_gpu(monkeypatch, tmp_path):
    from hpa_fastai.config import TrainConfig
    from hpa_fastai.search import default_space

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(workers_module, "_gpus", lambda: ["0", "1", "2"])
    search = study_module.Search("s", tmp_path, None, TrainConfig(), default_space(64), jobs=4)
    envs = [workers_module._worker_env(search, k) for k in range(4)]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "1", "2", "0"]
    cores = len(os.sched_getaffinity(0))
    assert {e["OMP_NUM_THREADS"] for e in envs} == {str(max(1, cores // 4))}
    assert all(str(REPO) == e["PYTHONPATH"].split(os.pathsep)[0] for e in envs)  # the workers run this package
    monkeypatch.setattr(workers_module, "_gpus", lambda: ["0"])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert "CUDA_VISIBLE_DEVICES" not in workers_module._worker_env(search, 1)  # one GPU: every worker shares it
