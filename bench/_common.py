"""What every benchmark shares: the machine description, cached synthetic data sets, interleaved
timing, and the one rich table per benchmark that is also appended to ``bench/results.md``.

Timings on a shared machine drift as other work comes and goes, so each benchmark runs its sides
in alternating order within one process, round after round, and reports the median of the
per-round ratios next to the range; absolute images/s are only comparable within one section.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/x.py` puts bench/, not the repository, on the path
    sys.path.insert(0, str(REPO))

# torch and fastai warn about their own deprecations on import; they would only clutter the tables
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning)

import pandas as pd  # noqa: E402

RESULTS = REPO / "bench" / "results.md"
# data/synthetic/ is git-ignored; a data set made once is reused by later runs
DATA_ROOT = REPO / "data" / "synthetic" / "bench"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--rounds", type=int, default=5, help="timing rounds; each runs every side once")
    p.add_argument("--no-record", action="store_true", help="print the table but leave results.md alone")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's own choice, one per core)")
    return p


def parse(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return args


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    import fastai
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"cpu": cpu_model(), "cores": cores, "torch": torch.__version__, "torch threads": torch.get_num_threads(),
            "fastai": fastai.__version__, "python": platform.python_version(), "gpu": gpu}


def synth_set(fmt: str, n: int, size: int, seed: int = 0) -> Path:
    """A synthetic competition folder, made on first use and kept under data/synthetic/bench/."""
    from hpa_fastai.synth import make_dataset

    out = DATA_ROOT / f"{fmt}-{size}px-{n}-seed{seed}"
    if not (out / "train.csv").is_file():  # make_dataset writes train.csv last
        print(f"making {out} (once)...", flush=True)
        make_dataset(out, fmt, n_train=n, n_test=0, size=size, seed=seed)
    return out


def random_predictor(arch: str, size: int):
    """A Predictor of a randomly initialised ``arch`` for HPA 2018 RGBY images of ``size`` px, loaded
    through the safe export as ``predict`` loads a trained model (the numbers do not depend on the
    weights)."""
    import shutil
    import tempfile

    import torch
    from safetensors.torch import save_file

    from hpa_fastai.atomic import write_json
    from hpa_fastai.data.vocab import class_names, vocab_for
    from hpa_fastai.inference.loading import load_predictor
    from hpa_fastai.models import create_model

    run_dir = Path(tempfile.mkdtemp(prefix="bench-model-"))
    try:
        torch.manual_seed(0)
        model, _ = create_model(arch, 4, 28, pretrained=False)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run_dir / "model.safetensors"))
        write_json(run_dir / "model.json", {
            "arch": arch, "format": "hpa2018", "channels": "rgby", "n_in": 4, "size": size,
            "mean": [0.1] * 4, "std": [0.15] * 4, "vocab": vocab_for("hpa2018"), "names": class_names("hpa2018"),
            "thresholds": [0.5] * 28, "loss": "bce", "focal_gamma": 2.0})
        return load_predictor(run_dir)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def interleaved(sides: dict, rounds: int, warmup: bool = True) -> dict[str, list[float]]:
    """Seconds of each side per round. Sides run in alternating order (A B, B A, ...) so a slow
    spell of the shared machine falls on both; a warm-up call each fills caches first. A side that
    returns a number has timed itself (e.g. the training part of a fit); otherwise its call is timed."""
    names = list(sides)
    if warmup:
        for name in names:
            sides[name]()
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            own = sides[name]()
            times[name].append(own if isinstance(own, float) else time.perf_counter() - t0)
    return times


def ratio(times: dict, side: str, baseline: str) -> dict:
    """How fast ``side`` is relative to ``baseline`` (baseline seconds / side seconds; 1 = as fast):
    the median of the per-round ratios, their range, and the ratio of each side's best round
    (timeit's estimator: the fastest round is the one least disturbed by other work)."""
    per_round = [b / a for a, b in zip(times[side], times[baseline])]
    return {"ratio (median)": statistics.median(per_round), "ratio (best rounds)": min(times[baseline]) / min(times[side]),
            "range": f"{min(per_round):.2f}-{max(per_round):.2f}"}


def rate(n: int, seconds: list[float]) -> float:
    """Items per second in the median round."""
    return round(n / statistics.median(seconds), 1)


def record(title: str, rows: list[dict], params: dict, notes: list[str] = (), record: bool = True) -> None:
    """Print the benchmark's table and append it, with the machine and parameters, to results.md."""
    from hpa_fastai.console import console, table

    df = pd.DataFrame(rows)
    console.print(table(title, df, floats="{:.3f}"))
    for note in notes:
        console.print(f"  {note}", markup=False, soft_wrap=True)
    if not record:
        return
    m = machine()
    lines = [f"## {title}", "",
             f"{datetime.now().isoformat(timespec='seconds')}; CPU {m['cpu']}, {m['cores']} cores "
             f"(torch threads {m['torch threads']}); GPU {m['gpu']}; torch {m['torch']}, fastai {m['fastai']}, "
             f"Python {m['python']}", "",
             "Parameters: " + ", ".join(f"{k} {v}" for k, v in params.items()), "",
             _markdown(df), ""]
    lines += [f"- {note}" for note in notes]
    with open(RESULTS, "a") as f:
        f.write("\n".join(lines).rstrip() + "\n\n")


def _markdown(df: pd.DataFrame) -> str:
    def cell(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)
    head = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "| " + " | ".join("---" for _ in df.columns) + " |"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *body])


# The real data beside the checkout (see ../shared/hpa_real/MANIFEST.md), or $HPA_REAL
HPA_REAL = Path(os.environ.get("HPA_REAL", REPO.parent / "shared" / "hpa_real"))


def full_size_layout(root: Path | None = None) -> Path:
    """An HPA 2018 folder of full size, the competition's real ``train.csv`` (31,072 ids, their real
    labels) over 124,288 real 512 px stain PNGs, made once by hard links: id ``i`` of train.csv gets
    the four stains of image ``i mod 65`` of the real four-stain sample. The pixels do not match the
    labels, which does not matter for start-up; the files take the sample's 29 MiB of disk once."""
    real = HPA_REAL / "kaggle2018"
    sample = real / "rgby_sample"
    if not (real / "train.csv").is_file() or not (sample / "train.csv").is_file():
        raise SystemExit(f"the full-size layout needs the real HPA data in {HPA_REAL} (or set HPA_REAL)")
    out = Path(root or DATA_ROOT) / "hpa2018-real-full-31072"
    if (out / "train.csv").is_file():  # written last
        return out
    print(f"making {out} (hard links, once)...", flush=True)
    ids = [line.split(",", 1)[0] for line in (real / "train.csv").read_text().splitlines()[1:]]
    sources = [line.split(",", 1)[0] for line in (sample / "train.csv").read_text().splitlines()[1:]]
    folder = out / "train"
    folder.mkdir(parents=True, exist_ok=True)
    for i, image_id in enumerate(ids):
        for stain in ("red", "green", "blue", "yellow"):
            dest = folder / f"{image_id}_{stain}.png"
            if not dest.exists():
                os.link(sample / "train" / f"{sources[i % len(sources)]}_{stain}.png", dest)
    (out / "train.csv").write_bytes((real / "train.csv").read_bytes())
    return out
