"""bench/gpu.py, the one-shot GPU measurement, run tiny on the CPU (``--smoke``) so that it cannot
rot between the sessions that have a GPU to run it on."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .helpers import REPO


@pytest.mark.slow
def test_gpu_bench_smoke_run_measures_every_part(tmp_path):
    results = REPO / "bench" / "results.md"
    before = results.read_bytes() if results.exists() else None
    out = tmp_path / "gpu.json"
    res = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--smoke", "--no-record", "--json", str(out),
                          "--data-root", str(tmp_path / "data")], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    got = json.loads(out.read_text())
    variants = [r["variant"] for r in got["training"]]
    assert variants == ["fp32", "bf16", "bf16 + channels-last", "bf16 + channels-last + compile",
                        "bf16 + channels-last + compile, CUDA graphs"]
    for row in got["training"]:
        assert row["Learner images/s"] > 0 and row["plain AMP loop images/s"] > 0, row
    # two epochs from the cache and the same steps on batches already on the device
    assert [r["pass"].split(" (")[0] for r in got["epoch"]] == ["epoch 1 from the cache", "epoch 2 from the cache",
                                                                "the same steps, batches on the device"], got["epoch"]
    assert all(r["seconds"] > 0 for r in got["epoch"])
    assert any("the Learner with compile / without" in n for n in got["notes"])
    sources = {(r["source"].split()[0], r["workers"]) for r in got["data"]}
    assert {("PNG", 0), ("preprocess", 0)} <= sources
    for row in got["data"]:
        assert "note" in row or (row["loader images/s"] > 0 and 0 < row["GPU busy share"] <= 1), row
    assert [r["command"] for r in got["end_to_end"]] == ["train", "predict --tta", "evaluate", "export --onnx"]
    assert all(r["exit code"] == 0 for r in got["end_to_end"]), got["end_to_end"]
    assert got["end_to_end"][0]["last line"].startswith("precision bf16")
    # the smoke run's CPU numbers are not results: bench/results.md is left alone
    assert (results.read_bytes() if results.exists() else None) == before
    # the synthetic set's preprocess cache is removed again, so the next run measures the PNGs first
    assert not list((tmp_path / "data").glob("*/cache/*"))


@pytest.mark.slow
def test_gpu_bench_parts_measure_only_what_is_asked(tmp_path):
    out = tmp_path / "gpu.json"
    res = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--smoke", "--no-record", "--json", str(out),
                          "--data-root", str(tmp_path / "data"), "--parts", "training"], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    got = json.loads(out.read_text())
    assert [r["variant"] for r in got["training"]] == ["fp32", "bf16", "bf16 + channels-last"]  # no compile row
    assert got["data"] == [] and got["epoch"] == [] and got["end_to_end"] == []
