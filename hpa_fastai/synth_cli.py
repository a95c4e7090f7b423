"""The ``synth`` command: write a synthetic data set with a progress bar."""
from __future__ import annotations

from pathlib import Path

from rich.progress import Progress

from .console import console, log
from .errors import HPAError
from .synth import make_dataset


def synth_command(cfg) -> Path:
    if not cfg.out.strip():
        raise HPAError("--out is empty: give the folder to write the data set to")
    total = cfg.n_train + cfg.n_test
    if console.is_terminal:
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("images", total=total)
            out = make_dataset(cfg.out, cfg.format, cfg.n_train, cfg.n_test, cfg.size, cfg.seed, cfg.easy,
                               progress=lambda done, _total: progress.update(task, completed=done))
    else:
        out = make_dataset(cfg.out, cfg.format, cfg.n_train, cfg.n_test, cfg.size, cfg.seed, cfg.easy)
    log(f"wrote {total} images ({cfg.format}, {cfg.size}px) to {out}")
    return out
