"""Memory: peak resident memory (RSS) of a short training run and of predict, each a fresh
``run.py`` process, and of the DataLoader alone reading the same number of batches from a data
set and from one four times its size (a loader that streams from disk needs no more memory for more images).

Peak RSS comes from ``resource.getrusage(RUSAGE_CHILDREN)`` in a small wrapper process per
command, so each number covers that command and its DataLoader workers alone.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import _common as C

# Runs the command it is given and prints, last, the peak RSS (KiB on Linux) of its process tree.
WRAPPER = ("import resource, subprocess, sys\n"
           "rc = subprocess.run(sys.argv[1:]).returncode\n"
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, rc)\n")


def measure(cmd: list, env: dict) -> tuple[float, str]:
    """Peak RSS in MiB of ``python CMD`` in a fresh process, and what it printed."""
    out = subprocess.run([sys.executable, "-c", WRAPPER, sys.executable, *map(str, cmd)], cwd=C.REPO,
                         capture_output=True, text=True, check=True, env={**os.environ, **env})
    *printed, last = out.stdout.splitlines()
    kib, rc = last.split()
    if rc != "0":
        raise SystemExit(f"{' '.join(map(str, cmd))} exited {rc}:\n{out.stderr[-2000:]}")
    return round(int(kib) / 1024, 1), "\n".join(printed)


def loader_child(data: str, size: int, bs: int, batches: int) -> None:
    """Child: ``batches`` training batches (as many epochs as that takes), no model; prints the
    median of its RSS sampled after each batch, steadier than the peak."""
    import statistics

    from hpa_fastai.config import TrainConfig
    from hpa_fastai.training.learner import run_learner
    from hpa_fastai.training.run import prepare

    prep = prepare(TrainConfig(data=data, size=size, bs=bs, workers=0, channels="rgby", arch="cnn", pretrained=False))
    train = run_learner(prep)[0].dls.train
    page = os.sysconf("SC_PAGE_SIZE")
    samples = []
    while len(samples) < batches:
        for _ in train:
            with open("/proc/self/statm") as f:
                samples.append(int(f.read().split()[1]) * page / 2**20)
            if len(samples) == batches:
                break
    print(f"median RSS MiB {statistics.median(samples):.1f}")


def main(argv=None) -> dict:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet34")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--bs", type=int, default=32)
    p.add_argument("--n", type=int, default=64, help="images of the training set (512px PNGs)")
    p.add_argument("--loader-batches", type=int, default=12, help="batches of bs 16 the loader-only runs read")
    p.add_argument("--loader-child", help=argparse.SUPPRESS)
    args = C.parse(p, argv)
    if args.loader_child:
        return loader_child(args.loader_child, args.size, 16, args.loader_batches)

    small = C.synth_set("hpa2018", n=args.n, size=512)
    large = C.synth_set("hpa2018", n=4 * args.n, size=512)
    env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    out = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    train_cmd = ["run.py", "--data", small, "--arch", args.arch, "--bs", args.bs, "--size", args.size, "--epochs", 1,
                 "--no-pretrained", "--lr", "1e-3", "--workers", 0, "--out", out / "runs"]
    predict_cmd = ["run.py", "predict", "--learner", out / "runs" / "latest", "--data", small / "train",
                   "--out", out / "predictions.csv", "--bs", args.bs]
    rows = [{"process": "python importing hpa_fastai (torch, fastai)",
             "peak RSS MiB": measure(["-c", "import hpa_fastai.training, hpa_fastai.inference.loading"], env)[0], "median RSS MiB": ""}]
    train = measure(train_cmd, env)[0]
    rows.append({"process": f"train: {args.arch}, bs {args.bs}, {args.size}px, 1 epoch, {args.n} images",
                 "peak RSS MiB": train, "median RSS MiB": ""})
    predict = measure(predict_cmd, env)[0]
    rows.append({"process": f"predict: {args.n} images, bs {args.bs}", "peak RSS MiB": predict, "median RSS MiB": ""})
    shutil.rmtree(out, ignore_errors=True)
    loading = {}
    for data in (small, large):
        n = len(open(data / "train.csv").read().splitlines()) - 1
        peak, printed = measure([Path(__file__).resolve(), "--loader-child", data, "--size", args.size,
                                 "--loader-batches", args.loader_batches], env)
        loading[n] = float(printed.rsplit(" ", 1)[-1])
        rows.append({"process": f"DataLoader alone, {args.loader_batches} batches of 16 from a {n}-image set",
                     "peak RSS MiB": peak, "median RSS MiB": loading[n]})
    (n1, m1), (n2, m2) = sorted(loading.items())
    decoded = (n2 - n1) * 4 * size_mib(args.size)  # the extra images held decoded at the training size
    notes = [f"the same number of batches from a set with {n2 - n1} more images: {m2 - m1:+.1f} MiB of median RSS "
             f"while loading, where holding those images decoded at {args.size}px would take {decoded:.0f} MiB "
             f"({4 * decoded:.0f} MiB at 512px): "
             + ("the loader streams from disk" if m2 - m1 < decoded / 2 else "CHECK: memory grows with the data set"),
             "peak RSS moves by tens of MiB between runs with the allocator's high-water mark; "
             "about 700 MiB of every process is importing torch",
             "GPU memory: not measured: no GPU on this machine"]
    C.record("Memory: peak RSS of training, predict and the DataLoader alone", rows,
             {"arch": args.arch, "bs": args.bs, "size": args.size, "source": "512px RGBY PNGs (synthetic)",
              "workers": 0, "threads": args.threads or "default"},
             notes, record=not args.no_record)
    return {"train_mib": train, "predict_mib": predict}


def size_mib(side: int) -> float:
    """One channel of one image at ``side`` px, in MiB."""
    return side * side / 2**20


if __name__ == "__main__":
    main()
