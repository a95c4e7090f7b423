"""Console output: one rich console, plain log lines and tables, with nothing from a file able to
reach the terminal as markup or control characters."""
from __future__ import annotations

import logging
import math

import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

class _NoTrailingSpaces:
    """What rich writes to a log or pipe, each line without the spaces rich pads it with (a table's
    title is padded to the table's width). Written to whatever ``sys.stdout`` is at the time, as
    rich's own default does, so a redirected stdout (a test's capture) still gets it."""

    def __init__(self):
        self.spaces = ""  # trailing spaces of an unfinished line: kept until the line goes on

    def write(self, text: str) -> int:
        import sys

        lines = (self.spaces + text).split("\n")
        last = lines.pop()
        self.spaces = last[len(last.rstrip(" ")):]
        sys.stdout.write("".join(line.rstrip(" ") + "\n" for line in lines) + last.rstrip(" "))
        return len(text)

    def flush(self) -> None:
        import sys

        sys.stdout.flush()

    def isatty(self) -> bool:
        return False


console = Console(highlight=False)
if not console.is_terminal:
    # a log file has no width; rich's 80-column default would fold tables and epoch lines (the runs
    # table, with a column per score, is about 170 columns wide)
    console = Console(highlight=False, width=200, file=_NoTrailingSpaces())


def plain(text) -> str:
    """``text`` as it may reach a terminal: control characters (escape sequences that retitle the
    window or clear the screen, carriage returns, bidirectional overrides) written as repr() escapes.
    File names, ids and values read from files pass through here before they are printed."""
    text = str(text)
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def log(msg: str = "") -> None:
    console.print(plain(msg), markup=False, soft_wrap=True)


def table(title: str, df: pd.DataFrame, floats: str = "{:.4f}") -> Table:
    """A rich table of ``df``; title, headers and cells are plain text (no rich markup, no control characters)."""
    t = Table(title=Text(plain(title)), title_justify="left")
    for i, col in enumerate(df.columns):
        # the first column names the row (a run, a class, an image): never shortened when the
        # table is wider than the console; the other columns wrap instead
        key = {"no_wrap": True, "min_width": min(60, max([len(plain(v)) for v in df[col]] + [1]))} if i == 0 else {}
        t.add_column(escape(plain(col)), justify="right" if df[col].dtype.kind in "iuf" else "left", **key)
    for row in df.itertuples(index=False):
        t.add_row(*[Text(plain((floats.format(v) if math.isfinite(v) else "-") if isinstance(v, float) else v))
                    for v in row])
    return t


def fmt(v, spec: str = ".4f") -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else format(v, spec)
    return str(v)


class ConsoleHandler(logging.Handler):
    """The package's log records (``logging.getLogger(__name__)`` in every library module) as console
    lines: INFO as it is, WARNING and above after ``warning:`` / ``error:``. Only the command line
    attaches it; a script or notebook sees the records through its own logging set-up."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
            if record.levelno >= logging.WARNING:
                msg = f"{'warning' if record.levelno < logging.ERROR else 'error'}: {msg}"
            log(msg)
        except Exception:  # logging's rule: a handler never raises into the code that logged
            self.handleError(record)


def attach_logging(level: int = logging.INFO) -> None:
    """Route the package's log records to the console (once, whatever the number of calls)."""
    logger = logging.getLogger("hpa_fastai")
    if not any(isinstance(h, ConsoleHandler) for h in logger.handlers):
        logger.addHandler(ConsoleHandler())
    logger.setLevel(level)
