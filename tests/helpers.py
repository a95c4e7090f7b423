"""Shared helpers for the end-to-end tests: the CLI in a subprocess and tiny trained runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args, cwd=None, timeout=600, env=None) -> subprocess.CompletedProcess:
    """``python run.py ARGS`` with stdout not a terminal, as in CI or a log file."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, str(REPO / "run.py"), *map(str, args)], cwd=cwd or REPO,
                          capture_output=True, text=True, timeout=timeout, env=full_env)


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())


def cli_in_process(capsys, *args):
    """Run the CLI in this process (no fastai start-up cost); returns (exit code, stdout, stderr)."""
    from hpa_fastai.cli import main

    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse exits on a bad flag
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def train(cfg, cbs=(), **kwargs) -> Path:
    """A training run as ``run.py`` runs it: the training door with the console's epoch lines, then
    what the command prints and the report it writes; returns the run folder."""
    from hpa_fastai.cli.commands import show_run
    from hpa_fastai.cli.epochs import EpochProgress
    from hpa_fastai.training import train as train_door

    return show_run(train_door(cfg, cbs=[EpochProgress(), *cbs], **kwargs), cfg.per_class)


def build_learner(ts, device=None):
    """A run's Learner for the training set ``ts``, outside any run folder: (learner, setup)."""
    from hpa_fastai.training.learner import create_learner, training_dls

    return create_learner(training_dls(ts, device), ts, ts.cfg, device, path=Path("."), model_dir=".")


def finishes(fn, fifos=(), seconds: float = 60):
    """``fn()``'s result, failing the test (instead of hanging it) if it is still running after
    ``seconds``: a reader blocked on one of ``fifos`` is given a writer so that its thread can end."""
    import threading

    import pytest

    done = {}

    def call():
        try:
            done["result"] = fn()
        except BaseException as e:  # handed to the test's thread
            done["error"] = e

    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        for fifo in fifos:
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        worker.join(10)
        pytest.fail(f"still running after {seconds} s (blocked on a FIFO or device?)")
    if "error" in done:
        raise done["error"]
    return done["result"]
