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
