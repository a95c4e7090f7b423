"""The GPU path in one run of a few minutes (under 8 on one H100): training speed, whether the data
keeps up, whether a step ever waits for the GPU, and an end-to-end run of the CLI.

1. Training images/s of resnet34 at 256 and 512 px in fp32, bf16, bf16 + channels-last, and at 512 px
   bf16 + channels-last + torch.compile, with inductor's default mode and with "reduce-overhead" (the
   step replayed as CUDA graphs): the project's Learner (``run_learner`` with the callbacks the
   training door adds, torch's fused AdamW, the one-cycle fit) against a plain PyTorch AMP loop (fused
   AdamW, autocast, BCE) on the same batches held on the device, with each side's peak GPU memory.
   The Learner's fits run under ``torch.cuda.set_sync_debug_mode("error")`` after the first batch of
   each epoch: a step that made the host wait for the GPU fails its row.
2. Whether the data keeps up: the training DataLoader (decode, batch, augmentation and
   normalisation on the GPU) over 512 px RGBY PNGs with 8 and 16 worker processes and over the
   ``preprocess`` cache, against the model's own images/s: the share of time the GPU is busy.
3. A whole epoch from the ``preprocess`` cache: two epochs of a real fit (the workers, kept from the
   first epoch to the second; augmentation on the GPU; every callback of a run), against the same
   number of steps on batches already on the device, and how many times per batch the host waited
   for the GPU (``set_sync_debug_mode("warn")``, counted).
4. An end-to-end run: a synthetic HPA 2018 set at 512 px, ``train`` 2 epochs in bf16,
   ``predict --tta``, ``evaluate``, ``export --onnx``, each a fresh process, with its exit code.

It prints four tables, appends them to bench/results.md with the machine and the GPU's name, and
writes everything to a JSON file (after each part, so a run cut short keeps what it measured).
The compile rows come last and are skipped when less than ``--compile-reserve`` seconds are left of
``--budget``. With ``--smoke`` every part runs tiny on the CPU (a plain CNN at 16 px, compile
through the aot_eager backend, the commands in this process), in about a minute: what the test
suite runs, so that the script cannot rot.

    python bench/gpu.py                            # on a CUDA machine
    python bench/gpu.py --json $OUT/gpu.json       # the JSON elsewhere (default bench/gpu.json)
    python bench/gpu.py --smoke --no-record        # on any machine
"""
from __future__ import annotations

import dataclasses
import gc
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import _common as C

VARIANTS = [  # name, precision, memory format, compile (False, True, or inductor's mode)
    ("fp32", "fp32", "contiguous", False),
    ("bf16", "bf16", "contiguous", False),
    ("bf16 + channels-last", "bf16", "channels-last", False),
    ("bf16 + channels-last + compile", "bf16", "channels-last", True),
    ("bf16 + channels-last + compile, CUDA graphs", "bf16", "channels-last", "reduce-overhead"),
]
PARTS = ("training", "data", "epoch", "e2e", "compile")
DEFAULT_VARIANT = "bf16 + channels-last"  # what --precision auto and --memory-format auto give on a GPU


def settings(args) -> dict:
    """The sizes of everything, full or smoke."""
    if args.smoke:
        return dict(arch="cnn", sizes=[16], compile_sizes=[16], bs={16: 2}, steps=1, rounds=1, data_size=32,
                    n_train=10, n_test=2, loader_size=16, loader_bs=2, loader_images=40, epoch_images=24,
                    workers=[0, 2], e2e_size=16, e2e_bs=4, parts=2)
    return dict(arch=args.arch, sizes=args.sizes, compile_sizes=args.compile_sizes, bs={256: 64, 512: 32},
                steps=args.steps, rounds=args.rounds, data_size=512, n_train=args.n, n_test=32, loader_size=512,
                loader_bs=32, loader_images=3072, epoch_images=args.epoch_images, workers=args.workers,
                e2e_size=512, e2e_bs=32, parts=min(16, os.cpu_count() or 1))


# --- data -----------------------------------------------------------------------------------------

def _make_part(job):
    from hpa_fastai.synth import make_dataset

    folder, n_train, n_test, size, seed = job
    make_dataset(folder, "hpa2018", n_train=n_train, n_test=n_test, size=size, seed=seed)
    return folder


def synthetic_set(root: Path, n_train: int, n_test: int, size: int, parts: int) -> Path:
    """A synthetic HPA 2018 set under ``root``, made once by ``parts`` processes (one
    ``make_dataset`` each, with its own seed; the image ids are random, so they do not collide) and
    merged into one competition folder."""
    out = root / f"gpu-hpa2018-{size}px-{n_train}+{n_test}"
    if (out / "train.csv").is_file():  # written last
        return out
    print(f"making {out} ({n_train + n_test} images, {parts} processes, once)...", flush=True)
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="gpu-set-", dir=root))
    parts = max(1, min(parts, n_train))
    share = lambda n, i: n // parts + (i < n % parts)  # noqa: E731
    jobs = [(scratch / f"part{i}", share(n_train, i), share(n_test, i), size, 1000 + i) for i in range(parts)]
    with ProcessPoolExecutor(parts) as pool:
        folders = list(pool.map(_make_part, jobs))
    shutil.rmtree(out, ignore_errors=True)
    for sub in ("train", "test"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    train_rows, test_rows = [], []
    for folder in folders:
        for sub in ("train", "test"):
            for f in (folder / sub).iterdir():
                os.replace(f, out / sub / f.name)
        train_rows += (folder / "train.csv").read_text().splitlines()[1:]
        test_rows += (folder / "sample_submission.csv").read_text().splitlines()[1:]
    (out / "sample_submission.csv").write_text("\n".join(["Id,Predicted", *test_rows]) + "\n")
    (out / "train.csv").write_text("\n".join(["Id,Target", *train_rows]) + "\n")
    shutil.rmtree(scratch, ignore_errors=True)
    return out


# --- 1. training ------------------------------------------------------------------------------------

def sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device):
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device) -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"[:200]


def free_memory(device):
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sync_check(device, mode):
    """Two callbacks that put CUDA in ``set_sync_debug_mode(mode)`` from the end of each epoch's first
    training batch (which may wait: the running loss moves to the device then) to the end of the
    epoch's training part; ``count`` holds the warnings of "warn" mode per epoch."""
    import torch
    from fastai.callback.core import Callback

    cuda = device.type == "cuda"

    class On(Callback):
        order = 10_000  # after every other callback's after_batch

        def after_batch(self):
            if cuda and self.learn.training and self.learn.iter == 0:
                torch.cuda.set_sync_debug_mode(mode)

    class Off(Callback):
        order = -10_000  # before every other callback's after_train (the recorder reads its losses there)

        def after_train(self):
            if cuda:
                torch.cuda.set_sync_debug_mode(0)

        def after_cancel_train(self):
            self.after_train()

        def after_fit(self):
            self.after_train()

    return [On(), Off()]


def run_callbacks() -> list:
    """The callbacks the training door adds to a fit that act during training (the checkpoint, which
    writes a file after each epoch, left out)."""
    import numpy as np

    from hpa_fastai.training.callbacks import KeepBestModel, NaNGuard, RunPhase, StopOnSignal, WarmupEarlyStopping

    return [RunPhase(), WarmupEarlyStopping(monitor="f1_macro", comp=np.greater, patience=5),
            KeepBestModel(monitor="f1_macro", comp=np.greater, fname="best", reset_on_fit=False), NaNGuard(),
            StopOnSignal()]


def training_rows(s: dict, data: Path, size: int, variants, device, args, stats=None) -> tuple[list, tuple]:
    """One row per variant: the Learner's and the plain AMP loop's images/s on the same batches."""
    import torch
    import torch._dynamo
    from fastai.callback.core import Callback
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader

    from hpa_fastai import device as D
    from hpa_fastai.config import TrainConfig
    from hpa_fastai.device import autocast
    from hpa_fastai.training.learner import run_learner
    from hpa_fastai.training.run import prepare
    from hpa_fastai.training.schedule import fit_one_cycle

    bs = s["bs"].get(size, 32)
    cfg = TrainConfig(data=str(data), arch=s["arch"], size=size, bs=bs, epochs=1, lr="1e-3", pretrained=False,
                      channels="rgby", seed=0, workers=min(8, os.cpu_count() or 1) if device.type == "cuda" else 0,
                      valid_pct=0.2)
    ts = prepare(cfg, stats)
    rows = []
    for name, precision, memory_format, compiled in variants:
        try:
            if compiled:
                torch._dynamo.reset()  # a fresh compile per size: no dynamic-shape recompile from the last size
            D.COMPILE_MODE = compiled if isinstance(compiled, str) and device.type == "cuda" else None
            variant = dataclasses.replace(ts, cfg=dataclasses.replace(ts.cfg, precision=precision,
                                                                      memory_format=memory_format,
                                                                      compile=bool(compiled)))
            learn, setup = run_learner(variant, device=device)
            D.COMPILE_MODE = None
            made = []
            for batch in learn.dls.train:
                made.append(batch)
                if len(made) == min(4, s["steps"]):
                    break
            batches = [made[i % len(made)] for i in range(s["steps"])]
            valid = [learn.dls.valid.one_batch()]
            learn.dls = DataLoaders(DataLoader(batches, bs=None, device=device),
                                    DataLoader(valid, bs=None, device=device))

            class TrainTimer(Callback):
                """Seconds and peak memory of the training part of an epoch (validation left out)."""
                order = -100

                def before_train(self):
                    sync(device)
                    reset_peak(device)
                    self.t0 = time.perf_counter()

                def after_train(self):
                    sync(device)
                    self.seconds, self.peak = time.perf_counter() - self.t0, peak_gib(device)

            peaks = {"Learner": [], "plain": []}

            def learner_side():
                timer = TrainTimer()
                fit_one_cycle(learn, 1, 1e-4, cbs=[timer, *run_callbacks(), *sync_check(device, "error")])
                peaks["Learner"].append(timer.peak)
                return timer.seconds

            model = learn.model  # the compiled module in the compile variant: the plain loop runs it too
            kernels = {"fused": True} if device.type == "cuda" else {"foreach": True}
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.99), eps=1e-5, weight_decay=0.01,
                                    **kernels)
            plain_batches = [(x.as_subclass(torch.Tensor), y.as_subclass(torch.Tensor).float())
                             for x, y in batches]
            bce = torch.nn.BCEWithLogitsLoss()
            channels_last = memory_format == "channels-last"

            def plain_side():
                model.train()
                sync(device)
                reset_peak(device)
                t0 = time.perf_counter()
                for x, y in plain_batches:
                    if channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    with autocast(precision, device):
                        loss = bce(model(x), y)
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                sync(device)
                peaks["plain"].append(peak_gib(device))
                return time.perf_counter() - t0

            t0 = time.perf_counter()
            learner_side()  # warm-up: cuDNN's autotuner, and the compile variant's compiling
            plain_side()
            warmup = time.perf_counter() - t0
            times = C.interleaved({"Learner": learner_side, "plain": plain_side}, s["rounds"], warmup=False)
            n = s["steps"] * bs
            rows.append({"size": size, "bs": bs, "variant": name, "Learner images/s": C.rate(n, times["Learner"]),
                         "plain AMP loop images/s": C.rate(n, times["plain"]),
                         "Learner / plain": statistics.median(p / lt for lt, p in zip(times["Learner"],
                                                                                        times["plain"])),
                         "peak GiB Learner": max(peaks["Learner"]), "peak GiB plain": max(peaks["plain"]),
                         "warm-up s": round(warmup, 1),
                         "host waits": "none" if device.type == "cuda" else "not checked (CPU)"})
            print(f"  {size}px {name}: Learner {rows[-1]['Learner images/s']} images/s, plain "
                  f"{rows[-1]['plain AMP loop images/s']} images/s", flush=True)
            learn = model = opt = batches = plain_batches = made = valid = None  # free before the next variant
            free_memory(device)
            if compiled:
                torch._dynamo.reset()
        except Exception as e:  # one variant failing (compiling, memory, a wait for the GPU) leaves the others
            D.COMPILE_MODE = None
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode(0)
            rows.append({"size": size, "bs": bs, "variant": name, "error": _first_line(e)})
            print(f"  {size}px {name}: {rows[-1]['error']}", flush=True)
            free_memory(device)
    return rows, (ts.mean, ts.std)


# --- 2. data ------------------------------------------------------------------------------------------

def loader_rows(s: dict, data: Path, source: str, device, model_rate, stats) -> list[dict]:
    """The training DataLoader's images/s over ``data`` (its PNGs, or its cache where one exists)
    with each worker count: after the first round of batches, when every worker is decoding."""
    import pandas as pd

    from hpa_fastai.config import TrainConfig
    from hpa_fastai.data.pipeline import close_workers
    from hpa_fastai.training.learner import run_learner
    from hpa_fastai.training.run import prepare

    size, bs = s["loader_size"], s["loader_bs"]
    rows = []
    for workers in s["workers"]:
        try:
            cfg = TrainConfig(data=str(data), arch=s["arch"], size=size, bs=bs, epochs=1, lr="1e-3",
                              pretrained=False, channels="rgby", seed=0, workers=workers, valid_pct=0.05)
            ts = prepare(cfg, stats)
            if workers > ts.cfg.workers:
                rows.append({"source": source, "workers": workers, "note": f"only {ts.cfg.workers} cores"})
                continue
            # an epoch of real length: the set's images repeated (decoding costs the same each time)
            repeat = max(1, math.ceil(s["loader_images"] / len(ts.items)))
            ts = dataclasses.replace(ts, items=pd.concat([ts.items] * repeat, ignore_index=True))
            learn, _ = run_learner(ts, device=device)
            dl = learn.dls.train
            first_round = max(1, workers)
            t0 = time.perf_counter()
            t_round, n_after, n = None, 0, 0
            for i, (xb, _) in enumerate(dl):
                n += len(xb)
                if i + 1 == first_round:
                    sync(device)
                    t_round = time.perf_counter()
                elif t_round is not None:
                    n_after += len(xb)
            sync(device)
            total = time.perf_counter() - t0
            steady = n_after / (time.perf_counter() - t_round) if n_after else float("nan")
            rows.append({"source": source, "workers": workers, "images": n, "loader images/s": round(steady, 1),
                         "first round s": round(t_round - t0, 2), "epoch s": round(total, 2),
                         "model images/s": model_rate,
                         "GPU busy share": min(1.0, steady / model_rate) if model_rate else float("nan")})
            print(f"  {source}, {workers} workers: {steady:.0f} images/s", flush=True)
            close_workers(learn.dls)
            del learn, dl
            free_memory(device)
        except Exception as e:
            rows.append({"source": source, "workers": workers, "error": _first_line(e)})
            print(f"  {source}, {workers} workers: {rows[-1]['error']}", flush=True)
            free_memory(device)
    return rows


# --- 3. a whole epoch ------------------------------------------------------------------------------------

def epoch_rows(s: dict, data: Path, device, stats) -> list[dict]:
    """Two epochs of a real fit reading the ``preprocess`` cache, against the same number of steps on
    batches already on the device, with the host's waits for the GPU counted."""
    import warnings

    import pandas as pd
    import torch
    from fastai.callback.core import Callback
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader

    from hpa_fastai.config import TrainConfig
    from hpa_fastai.data.pipeline import close_workers
    from hpa_fastai.training.learner import run_learner
    from hpa_fastai.training.run import prepare
    from hpa_fastai.training.schedule import fit_one_cycle

    cfg = TrainConfig(data=str(data), arch=s["arch"], size=s["loader_size"], bs=s["loader_bs"], epochs=2, lr="1e-4",
                      pretrained=False, channels="rgby", seed=0, valid_pct=0.05)  # the defaults of a GPU run
    class EpochTimer(Callback):
        """Seconds of each epoch's training part and its batches."""
        order = -100

        def __init__(self):
            self.seconds, self.batches = [], []

        def before_train(self):
            sync(device)
            self.t0 = time.perf_counter()

        def after_train(self):
            sync(device)
            self.seconds.append(time.perf_counter() - self.t0)
            self.batches.append(self.learn.n_iter)

    rows, learn = [], None
    try:
        ts = prepare(cfg, stats)
        repeat = max(1, math.ceil(s["epoch_images"] / len(ts.items)))  # an epoch of real length
        ts = dataclasses.replace(ts, items=pd.concat([ts.items] * repeat, ignore_index=True))
        learn, setup = run_learner(ts, device=device)
        timer = EpochTimer()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit_one_cycle(learn, 2, 1e-4, cbs=[timer, *run_callbacks(), *sync_check(device, "warn")])
        waits = [w for w in caught if "synchroniz" in str(w.message)]
        where = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in waits})[:3]
        n_batches = timer.batches[-1]
        made = []
        for batch in learn.dls.train:  # augmented and normalised on the device, as the epoch's were
            made.append(batch)
            if len(made) == min(8, n_batches):
                break
        close_workers(learn.dls)
        learn.dls = DataLoaders(DataLoader([made[i % len(made)] for i in range(n_batches)], bs=None, device=device),
                                DataLoader(made[:1], bs=None, device=device))
        steps = EpochTimer()
        fit_one_cycle(learn, 1, 1e-4, cbs=[steps, *run_callbacks()])
        waits_per_batch = len(waits) / max(1, sum(timer.batches) - len(timer.batches))
        for i, seconds in enumerate(timer.seconds):
            rows.append({"pass": f"epoch {i + 1} from the cache{' (starts the workers)' if i == 0 else ''}",
                         "batches": timer.batches[i], "seconds": round(seconds, 2),
                         "/ steps alone": round(seconds / steps.seconds[0], 3),
                         "host waits per batch": round(waits_per_batch, 2) if device.type == "cuda" else "n/a (CPU)",
                         "where": ", ".join(where)})
        rows.append({"pass": "the same steps, batches on the device", "batches": n_batches,
                     "seconds": round(steps.seconds[0], 2), "/ steps alone": 1.0, "host waits per batch": "",
                     "where": f"workers {ts.cfg.workers}, precision {setup.precision}"})
        print(f"  epoch 2 {timer.seconds[-1]:.1f}s, steps alone {steps.seconds[0]:.1f}s, "
              f"{len(waits)} host waits", flush=True)
    except Exception as e:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)
        rows.append({"pass": "epoch from the cache", "error": _first_line(e)})
        print(f"  epoch: {rows[-1]['error']}", flush=True)
    finally:
        if learn is not None:
            close_workers(learn.dls)
        free_memory(device)
    return rows


# --- 4. end to end --------------------------------------------------------------------------------------

def run_command(argv: list, work: Path, in_process: bool) -> tuple:
    """``python run.py ARGV`` in a fresh process (the way a user runs it), or, for the smoke run, in
    this one (four more interpreter start-ups would take most of its minute); (exit code, output)."""
    argv = [str(a) for a in argv]
    if not in_process:
        # the repository first, then whatever PYTHONPATH holds (on the device: the carried wheels)
        path = os.pathsep.join(p for p in (str(C.REPO), os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "PYTHONPATH": path, "PYTHONWARNINGS": "ignore"}
        try:
            res = subprocess.run([sys.executable, str(C.REPO / "run.py"), *argv], capture_output=True, text=True,
                                 env=env, cwd=work, timeout=600)
        except subprocess.TimeoutExpired:
            return "timeout", ""
        return res.returncode, res.stderr if res.returncode else res.stdout
    import contextlib
    import io

    from hpa_fastai.cli import main as cli_main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli_main(argv)
        except SystemExit as e:  # argparse refusing a flag
            code = e.code
    return code, err.getvalue() if code else out.getvalue()


def end_to_end_rows(s: dict, data: Path, work: Path, smoke: bool) -> list[dict]:
    runs, latest = work / "runs", work / "runs" / "latest"
    commands = [
        ("train", ["--data", data, "--arch", s["arch"], "--no-pretrained", "--size", s["e2e_size"], "--bs", s["e2e_bs"],
                   "--epochs", 2, "--precision", "bf16", "--lr", "1e-3", "--out", runs]),
        ("predict --tta", ["predict", "--learner", latest, "--data", data, "--tta", "--out", work / "submission.csv"]),
        ("evaluate", ["evaluate", "--learner", latest, "--data", data, "--out", work / "evaluate"]),
        ("export --onnx", ["export", "--learner", latest, "--onnx"]),
    ]
    rows = []
    for name, argv in commands:
        t0 = time.perf_counter()
        code, text = run_command(argv, work, in_process=smoke)
        lines = [ln for ln in text.splitlines() if ln.strip()]
        rows.append({"command": name, "exit code": code, "seconds": round(time.perf_counter() - t0, 1),
                     "last line": (lines[-1].strip() if lines else "")[:160]})
        print(f"  {name}: exit {code}", flush=True)
    config = latest / "config.json"
    if config.is_file():  # what the run says it trained in
        import json

        used = json.loads(config.read_text())
        rows[0]["last line"] = (f"precision {used.get('precision_used')}; " + rows[0]["last line"])[:160]
    return rows


# --- the run --------------------------------------------------------------------------------------------

def main(argv=None) -> dict:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="everything tiny, on the CPU, in under a minute")
    p.add_argument("--json", default=str(C.REPO / "bench" / "gpu.json"), help="where the JSON goes")
    p.add_argument("--data-root", default=str(C.DATA_ROOT), help="where the synthetic set is made (once) and kept")
    p.add_argument("--arch", default="resnet34")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per timed round and side")
    p.add_argument("--n", type=int, default=256, help="training images of the synthetic 512 px set (+32 test)")
    p.add_argument("--workers", type=int, nargs="+", default=[8, 16], help="DataLoader worker counts to measure")
    p.add_argument("--compile-sizes", type=int, nargs="+", default=[512], help="sizes of the compile rows")
    p.add_argument("--epoch-images", type=int, default=2048, help="images of the epochs read from the cache")
    p.add_argument("--budget", type=float, default=440, help="seconds the whole run may take (8 minutes is 480)")
    p.add_argument("--compile-reserve", type=float, default=100,
                   help="seconds a compile row needs (compiling resnet34 takes about a minute); skipped when "
                        "fewer are left")
    p.add_argument("--no-compile", action="store_true", help="leave out the compile rows")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                   help="what to measure (default: all): the training rows without compile, the DataLoader rows, "
                        "the epochs from the cache, the end-to-end commands, the compile rows")
    p.set_defaults(rounds=3)
    args = C.parse(p, argv)
    t_start = time.perf_counter()

    import torch

    from hpa_fastai import device as D
    from hpa_fastai.atomic import write_json

    s = settings(args)
    if args.smoke:
        device = torch.device("cpu")
        if not args.threads:  # on a shared CPU, more torch threads than free cores wait on each other
            torch.set_num_threads(1)
        D.COMPILE_BACKEND = "aot_eager"  # inductor's first C++ build alone takes minutes on a small CPU
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        raise SystemExit("no CUDA GPU here: run with --smoke, or on a GPU machine")
    record = not (args.no_record or args.smoke)
    machine = C.machine()
    out = {"machine": machine, "smoke": args.smoke, "settings": {k: v for k, v in s.items() if k != "bs"},
           "training": [], "data": [], "epoch": [], "end_to_end": [], "notes": []}
    json_path = Path(args.json)
    json_path.parent.mkdir(parents=True, exist_ok=True)

    def save():
        out["seconds"] = round(time.perf_counter() - t_start, 1)
        write_json(json_path, out)

    data = synthetic_set(Path(args.data_root), s["n_train"], s["n_test"], s["data_size"], s["parts"])
    parts = set(args.parts)
    plain_variants = [v for v in VARIANTS if not v[3]] if "training" in parts else []
    compile_variants = [] if args.no_compile or "compile" not in parts else [v for v in VARIANTS if v[3]]
    if compile_variants and "training" not in parts:  # the compile rows are compared with bf16 + channels-last
        compile_variants = [v for v in VARIANTS if v[0] == DEFAULT_VARIANT] + compile_variants
    stats = None
    print("1. training", flush=True)
    for size in s["sizes"]:
        if plain_variants:
            rows, stats = training_rows(s, data, size, plain_variants, device, args, stats)
            out["training"] += rows
            save()

    model_rate = next((r["Learner images/s"] for r in out["training"]
                       if r["size"] == s["loader_size"] and r["variant"] == DEFAULT_VARIANT), None)
    if "data" in parts:
        print("2. data", flush=True)
        out["data"] += loader_rows(s, data, f"PNG {s['data_size']}px", device, model_rate, stats)
        save()
    if "e2e" in parts:
        work = Path(tempfile.mkdtemp(prefix="gpu-e2e-"))
        try:
            print("4. end to end", flush=True)
            out["end_to_end"] = end_to_end_rows(s, data, work, args.smoke)
            save()
        finally:
            shutil.rmtree(work, ignore_errors=True)

    if "data" in parts or "epoch" in parts:
        from hpa_fastai.data.cache import cache_dir, preprocess

        t0 = time.perf_counter()
        preprocess(data, s["loader_size"], "rgby", None)
        out["notes"].append(f"preprocess of {s['n_train']} images at {s['loader_size']}px: "
                            f"{time.perf_counter() - t0:.1f}s (all cores)")
        try:
            if "data" in parts:
                out["data"] += loader_rows(s, data, f"preprocess cache {s['loader_size']}px", device, model_rate,
                                           stats)
                save()
            if "epoch" in parts:
                print("3. a whole epoch from the cache", flush=True)
                out["epoch"] = epoch_rows(s, data, device, stats)
                save()
        finally:
            shutil.rmtree(cache_dir(data, "rgby", s["loader_size"]), ignore_errors=True)  # the next run measures PNGs

    for size in s["compile_sizes"]:
        for variant in compile_variants:
            left = args.budget - (time.perf_counter() - t_start)
            if not args.smoke and left < args.compile_reserve:
                out["training"].append({"size": size, "variant": variant[0],
                                        "note": f"skipped: {left:.0f}s of the {args.budget:.0f}s budget left"})
                continue
            print(f"5. training, {size}px {variant[0]}", flush=True)
            rows, _ = training_rows(s, data, size, [variant], device, args, stats)
            out["training"] += rows
            save()
    out["training"].sort(key=lambda r: (r["size"], [v[0] for v in VARIANTS].index(r["variant"])))
    rate = {(r["size"], r["variant"]): r.get("Learner images/s") for r in out["training"]}
    for size in s["compile_sizes"]:
        base = rate.get((size, DEFAULT_VARIANT))
        for name in (v[0] for v in VARIANTS if v[3]):
            if base and rate.get((size, name)):
                out["notes"].append(f"{size} px: the Learner with {name.split(' + ')[-1]} / without: "
                                    f"{rate[(size, name)] / base:.2f}x (target at least 1.10x)")

    gpu = machine["gpu"]
    params = {"arch": s["arch"], "device": device.type, "rounds": s["rounds"], "steps": s["steps"],
              "smoke": args.smoke, "TF32 matmul": torch.backends.cuda.matmul.allow_tf32,
              "TF32 cuDNN": torch.backends.cudnn.allow_tf32}
    if out["training"]:
        C.record(f"GPU training images/s on {gpu}: Learner vs plain PyTorch AMP loop", out["training"], params,
                 ["batches held on the device (augmented and normalised once); warm-up s: the first fit and plain "
                  "pass (cuDNN autotuning, compiling); peak GiB: torch.cuda.max_memory_allocated",
                  "targets: Learner / plain at least 0.97 at 512 and 256 px in bf16 + channels-last",
                  "host waits: the Learner's fits ran in set_sync_debug_mode('error') after each epoch's first batch; "
                  "a wait would have failed the row",
                  *[n for n in out["notes"] if " px: the Learner with" in n]], record=record)
    if out["data"]:
        C.record(f"GPU data loading on {gpu}: does the DataLoader keep up with the model?", out["data"],
                 {"size": s["loader_size"], "bs": s["loader_bs"], "model": f"{s['arch']} {DEFAULT_VARIANT} (Learner)"},
                 ["loader images/s: after the first round of batches (each worker decodes whole batches), "
                  "augmentation and normalisation on the device included; GPU busy share: loader / model images/s",
                  "the worker processes live across epochs: first round s is paid once per run",
                  *[n for n in out["notes"] if n.startswith("preprocess")]], record=record)
    if out["epoch"]:
        C.record(f"GPU epoch from the preprocess cache on {gpu}: a whole epoch against its steps alone", out["epoch"],
                 {"size": s["loader_size"], "bs": s["loader_bs"], "images": s["epoch_images"],
                  "model": f"{s['arch']}, the defaults of a GPU run"},
                 ["target: epoch 2 within 5% of its steps alone (/ steps alone at most 1.05)",
                  "host waits: CUDA's synchronising calls after each epoch's first batch, counted in "
                  "set_sync_debug_mode('warn'); where: the first places they came from"], record=record)
    if out["end_to_end"]:
        C.record(f"GPU end to end on {gpu}: synthetic HPA 2018 at {s['e2e_size']}px", out["end_to_end"],
                 {"train images": s["n_train"], "test images": s["n_test"], "size": s["e2e_size"], "bs": s["e2e_bs"],
                  "epochs": 2, "precision": "bf16"},
                 [f"whole run: {time.perf_counter() - t_start:.0f}s"], record=record)
    save()
    print(f"wrote {json_path} ({out['seconds']:.0f}s)", flush=True)
    failed = [r["command"] for r in out["end_to_end"] if r["exit code"] != 0]
    if failed:
        print(f"failed: {', '.join(failed)}", flush=True)
    return out


if __name__ == "__main__":
    result = main()
    sys.exit(1 if any(r["exit code"] != 0 for r in result["end_to_end"]) else 0)
