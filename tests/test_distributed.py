"""Data-parallel training on CPU: two processes through torchrun and fastai's distrib_ctx (gloo)."""
from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest

from hpa_fastai.synth import make_dataset

from .helpers import REPO, read_json

pytest.importorskip("accelerate")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["cnn", "resnet18"])  # resnet18: BatchNorm, which stays plain on a CPU
def test_two_cpu_processes_split_the_data_and_write_one_run_folder(tmp_path, arch):
    # 40 images: 32 train (2 batches of 8 per rank) and 8 valid, so no rank needs padding
    data = make_dataset(tmp_path / "data", "z2g", n_train=40, n_test=0, size=32, seed=4, easy=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(REPO / "tests" / "ddp_probe.py"), str(data), str(tmp_path), arch],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    seen = [pd.read_csv(tmp_path / f"seen_rank{r}.txt", sep=" ", names=["epoch", "stage", "key"]) for r in (0, 1)]
    all_keys = {str(data / "train" / f"{i}.png") for i in pd.read_csv(data / "train.csv")["Image"]}
    for epoch in (0, 1):
        for stage, per_rank in (("train", 16), ("valid", 4)):
            keys = [set(s[(s["epoch"] == epoch) & (s["stage"] == stage)]["key"]) for s in seen]
            assert len(keys[0]) == len(keys[1]) == per_rank, (epoch, stage)
            assert not keys[0] & keys[1], (epoch, stage)  # each rank its own share
            assert keys[0] | keys[1] <= all_keys
    runs = [p for p in (tmp_path / "runs").iterdir() if p.name != "latest"]
    assert len(runs) == 1
    history = pd.read_csv(runs[0] / "history.csv")
    assert list(history["epoch"]) == [1, 2]
    assert read_json(runs[0] / "status.json")["status"] == "finished"
    assert (runs[0] / "model.safetensors").is_file()
    assert res.stdout.count("run folder ") == 1  # only rank 0 logs
