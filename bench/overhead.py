"""Fixed cost of a run, in two tables.

1. The project's CLI against the plain PyTorch script of ``plain_train.py``, both as whole processes
   (start-up, imports, data checks, training, exports), alternated. The default case: 200 synthetic
   Zero-to-GANs images at 64 px, resnet18 from random initialisation, batch size 32, 3 epochs, 2
   DataLoader workers, a given learning rate (the plain script has no learning-rate finder). Each
   round runs both commands once, in alternating order. Target: at most 1.10x.
2. Start-up on a full-size HPA 2018 layout (``_common.full_size_layout``: the real ``train.csv``'s
   31,072 ids over 124,288 real stain PNGs, by hard links): seconds from starting the process to the
   model line and to the first training batch, for a first run on the data (nothing remembered:
   every image checked, the statistics measured) and for runs after it on the unchanged data.
   Target: at most 10 s to the first batch when the data has not changed. Needs ../shared/hpa_real.
"""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import _common as C

# The training door with the console's log lines, stopped at the first training batch
FIRST_BATCH = """
import os, sys
from fastai.callback.core import Callback
from hpa_fastai.config import TrainConfig
from hpa_fastai.console import attach_logging
from hpa_fastai.training import train

class FirstBatch(Callback):
    def before_batch(self):
        print("first batch", flush=True)
        os._exit(0)

print("imported", flush=True)
attach_logging()
data, arch, out = sys.argv[1:4]
train(TrainConfig(data=data, arch=arch, epochs=1, lr="1e-3", pretrained=False, out=out), cbs=[FirstBatch()])
"""


def startup(args) -> dict | None:
    """Seconds to the model line and to the first batch on the full-size layout, cold then warm."""
    try:
        data = C.full_size_layout()
    except SystemExit as e:
        print(f"start-up table skipped: {e}")
        return None
    cache = C.DATA_ROOT / "user-cache"  # where start-up remembers what it checked: emptied for the cold run
    env = {**os.environ, "PYTHONPATH": str(C.REPO), "PYTHONWARNINGS": "ignore", "XDG_CACHE_HOME": str(cache)}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)

    def one(out) -> dict:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", FIRST_BATCH, str(data), args.startup_arch, out],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        seen = {}
        for line in proc.stdout:  # the console's lines, in the order a run prints them
            for key, start in (("imports", "imported"), ("data", "data "), ("model", "model "),
                               ("first batch", "first batch")):
                if line.startswith(start) and key not in seen:
                    seen[key] = time.perf_counter() - t0
        err = proc.stderr.read()
        if proc.wait() != 0 or "first batch" not in seen:
            raise RuntimeError(f"start-up run failed:\n{err[-2000:]}")
        return seen

    runs = []
    with tempfile.TemporaryDirectory() as out:
        shutil.rmtree(cache, ignore_errors=True)
        runs.append(("first run on the data (every image checked)", one(out)))
        for _ in range(args.startup_rounds):
            runs.append(("data unchanged since the last run", one(out)))
    warm = [r["first batch"] for name, r in runs[1:]]
    # where the time goes: Python and the libraries imported; the data read and checked (the CSV, the
    # remembered checks, the statistics); the model and the loaders built; the first batch loaded
    parts = (("imports s", None, "imports"), ("data checks s", "imports", "data"), ("model s", "data", "model"),
             ("first batch s", "model", "first batch"))

    def row(name, r):
        out = {"run": name, "to the model line s": r["model"], "to the first batch s": r["first batch"]}
        out.update({label: r[end] - (r[begin] if begin else 0.0) for label, begin, end in parts})
        return out

    rows = [row(name, r) for name, r in runs]
    rows.append({"run": "unchanged data, median", **{k: statistics.median(row(n, r)[k] for n, r in runs[1:])
                                                    for k in rows[0] if k != "run"}})
    C.record("Start-up on a full-size HPA 2018 layout: to the model line and the first batch", rows,
             {"images": 31072, "stain files": 124288, "arch": args.startup_arch, "size": "auto (256)", "bs": 32,
              "workers": "default (0 on a CPU)", "warm rounds": args.startup_rounds},
             [f"target: at most 10 s to the first batch on unchanged data; measured {statistics.median(warm):.1f} s "
              f"(median of {len(warm)})",
              "the layout hard-links the 65 real four-stain images of ../shared/hpa_real under every id of the real "
              "train.csv: 124,288 paths over 260 files, all in the page cache; a first run on 124,288 distinct "
              "files reads each one's header and end from disk"],
             record=not args.no_record)
    return {"warm": statistics.median(warm), "cold": runs[0][1]["first batch"]}


def main(argv=None) -> dict:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200, help="training images (before the 20%% validation split)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--bs", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--startup-rounds", type=int, default=3, help="runs on unchanged data after the first")
    p.add_argument("--startup-arch", default="resnet34")
    p.add_argument("--parts", nargs="+", choices=("whole", "startup"), default=["whole", "startup"])
    p.set_defaults(rounds=4)
    args = C.parse(p, argv)
    result = {}
    if "startup" in args.parts:
        result["startup"] = startup(args)
    if "whole" in args.parts:
        result.update(whole_run(args))
    return result


def whole_run(args) -> dict:
    data = C.synth_set("z2g", n=args.n, size=args.size)
    env = {**os.environ, "PYTHONPATH": str(C.REPO), "PYTHONWARNINGS": "ignore",
           "XDG_CACHE_HOME": str(C.DATA_ROOT / "user-cache")}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    common = ["--data", str(data), "--size", str(args.size), "--bs", str(args.bs), "--epochs", str(args.epochs),
              "--workers", str(args.workers), "--lr", "1e-3"]
    with tempfile.TemporaryDirectory() as tmp:
        commands = {
            "hpa_fastai CLI": [sys.executable, str(C.REPO / "run.py"), *common, "--arch", args.arch,
                               "--no-pretrained", "--out", f"{tmp}/runs"],
            "plain PyTorch": [sys.executable, str(C.REPO / "bench" / "plain_train.py"), *common,
                              "--out", f"{tmp}/plain.pth"],
        }

        def side(cmd):
            def run():
                t0 = time.perf_counter()
                res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp)
                if res.returncode != 0:
                    raise RuntimeError(f"{cmd[1]} failed:\n{res.stderr[-2000:]}")
                return time.perf_counter() - t0
            return run

        times = C.interleaved({name: side(cmd) for name, cmd in commands.items()}, args.rounds, warmup=True)
        run_dirs = [d for d in os.listdir(f"{tmp}/runs") if d != "latest"]
        size_mb = sum(os.path.getsize(os.path.join(f"{tmp}/runs", d, f))
                      for d in run_dirs[:1] for f in os.listdir(os.path.join(f"{tmp}/runs", d))) / 2**20
    r = C.ratio(times, "plain PyTorch", "hpa_fastai CLI")
    # ratio() gives baseline / side; the overhead factor is the CLI's seconds over the plain script's
    per_round = [a / b for a, b in zip(times["hpa_fastai CLI"], times["plain PyTorch"])]
    factor = statistics.median(per_round)
    rows = [{"command": name, "median s": statistics.median(t), "best s": min(t),
             "rounds": " ".join(f"{x:.1f}" for x in t)} for name, t in times.items()]
    rows.append({"command": "CLI / plain (median of rounds)", "median s": factor,
                 "best s": min(times["hpa_fastai CLI"]) / min(times["plain PyTorch"]),
                 "rounds": f"range {min(per_round):.2f}-{max(per_round):.2f}"})
    C.record("Overhead: whole CLI run / plain PyTorch script", rows,
             {"images": args.n, "size": args.size, "arch": args.arch, "bs": args.bs, "epochs": args.epochs,
              "workers": args.workers, "rounds": args.rounds},
             [f"target: at most 1.10x; measured {factor:.2f}x (median of per-round ratios)",
              f"one finished run folder: {size_mb:.1f} MiB"],
             record=not args.no_record)
    return {"factor": factor, "best": r["ratio (best rounds)"]}


if __name__ == "__main__":
    main()
