"""The command line's view of progress. Library functions that take long report it through a plain
callback, ``progress(done, total)``, and print nothing themselves; ``ConsoleProgress`` is that callback
for the console: a live bar in a terminal, and in a log (stdout not a terminal, where a bar would
print carriage returns) one plain line per 5% of the work or per minute."""
from __future__ import annotations

import time

from ..console import console, log

LINE_EVERY_SHARE = 0.05
LINE_EVERY_SECONDS = 60.0


class ConsoleProgress:
    """``with ConsoleProgress("images") as progress: make_dataset(..., progress=progress)``."""

    def __init__(self, what: str, out=console):
        self.what, self.out = what, out
        self.bar = self.task = None
        self.start = self.last_line = time.monotonic()
        self.last_share = 0.0

    def __enter__(self) -> "ConsoleProgress":
        if self.out.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn(self.what), BarColumn(), MofNCompleteColumn(), TextColumn("ETA"),
                                TimeRemainingColumn(), console=self.out, transient=True)
            self.bar.start()
        return self

    def __call__(self, done: int, total: int) -> None:
        if self.bar is not None:
            if self.task is None:
                self.task = self.bar.add_task("", total=total)
            self.bar.update(self.task, completed=done, total=total)
            return
        share, now = done / max(total, 1), time.monotonic()
        if done == total or share - self.last_share >= LINE_EVERY_SHARE or now - self.last_line >= LINE_EVERY_SECONDS:
            self.last_share, self.last_line = share, now
            log(f"{self.what}: {done}/{total} ({share:.0%}), {done / max(now - self.start, 1e-9):.1f}/s, "
                f"ETA {_eta(now - self.start, done, total)}")

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


def _eta(seconds: float, done: int, total: int) -> str:
    if not done:
        return "unknown"
    left = int(seconds / done * (total - done))
    return f"{left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}"


class TrialProgress:
    """The console's view of a search: one line per finished trial (its state, score, epochs, time and
    parameters, and the best so far) and, in a terminal, a bar over the trials the study should hold.
    ``with TrialProgress(n_trials) as progress: tune(cfg, on_trial=progress)``."""

    def __init__(self, n_trials: int, out=console):
        self.n_trials, self.out = n_trials, out
        self.bar = self.task = None

    def __enter__(self) -> "TrialProgress":
        if self.out.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("trials"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                console=self.out, transient=True)
            self.bar.start()
            self.task = self.bar.add_task("", total=self.n_trials)
        return self

    def __call__(self, report) -> None:
        log(trial_line(report))
        if self.bar is not None:
            self.bar.update(self.task, completed=min(report.finished, report.n_trials), total=report.n_trials)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


def trial_line(report) -> str:
    """``trial 7 complete  0.6123 (best 0.6400, trial 3)  6 epochs  41s  lr 0.0012 loss focal ...``"""
    row = report.row
    parts = [f"trial {row['number']} {row['state']}"]
    if row["value"] is not None:
        parts.append(f"{row['value']:.4f}")
    if report.best_value is not None:
        parts.append(f"(best {report.best_value:.4f}, trial {report.best_number})")
    if row["epochs_run"] is not None:
        parts.append(f"{row['epochs_run']:.0f} epoch{'' if row['epochs_run'] == 1 else 's'}")
    if row["seconds"] is not None:
        parts.append(f"{row['seconds']:.0f}s")
    params = " ".join(f"{k[len('param_'):]} {_short(v)}" for k, v in row.items() if k.startswith("param_"))
    if params:
        parts.append(params)
    if row["reason"] and row["state"] != "complete":
        parts.append(f"- {row['reason']}")
    return f"[{min(report.finished, report.n_trials)}/{report.n_trials}] " + "  ".join(parts)


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
