"""Fixed cost of a run: the project's CLI against the plain PyTorch script of ``plain_train.py``,
both as whole processes (start-up, imports, data checks, training, exports), alternated.

The default case: 200 synthetic Zero-to-GANs images at 64 px, resnet18 from random
initialisation, batch size 32, 3 epochs, 2 DataLoader workers, a given learning rate (the plain
script has no learning-rate finder). Each round runs both commands once, in alternating order.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time

import _common as C


def main(argv=None) -> dict:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200, help="training images (before the 20%% validation split)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--bs", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--arch", default="resnet18")
    p.set_defaults(rounds=4)
    args = C.parse(p, argv)
    data = C.synth_set("z2g", n=args.n, size=args.size)
    env = {**os.environ, "PYTHONPATH": str(C.REPO), "PYTHONWARNINGS": "ignore"}
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
             [f"target: at most 1.15x; measured {factor:.2f}x (median of per-round ratios)",
              f"one finished run folder: {size_mb:.1f} MiB"],
             record=not args.no_record)
    return {"factor": factor, "best": r["ratio (best rounds)"]}


if __name__ == "__main__":
    main()
