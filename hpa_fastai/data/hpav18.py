"""The ``download-hpav18`` command: the HPAv18 external images (the 2018 winners' extra data) fetched
from the Human Protein Atlas image server into the layout that ``--extra-data`` reads.

For each id of the label CSV (``HPAv18RBGY_wodpl.csv``: ``Id,Target``) the four stain files are
``{base}/{antibody}/{rest}_{stain}.jpg``: id ``10580_1610_C1_1`` is ``10580/1610_C1_1_red.jpg``
and so on, colour JPEGs (see ``images.STAIN_COLOURS``). A bounded pool of connections fetches
them; a failed transfer is retried with exponential back-off; each file is written under a
temporary name, decoded and checked to be its stain, and only then given its final name, so a
download that was killed resumes where it stopped and a partial file never counts as done.
With ``--size`` each stain is resized on the fly and stored as an 8-bit grayscale PNG.
``train.csv`` (the ids whose four stains are all on disk) is written at the end, also after
Ctrl-C; ``failed.csv`` lists the files this run could not get.
"""
from __future__ import annotations

import contextlib
import os
import queue
import random
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pandas as pd
from PIL import Image

from ..atomic import atomic_path, save_png, write_csv, write_json
from ..config import DownloadHPAv18Config, validate
from ..console import console, log
from ..errors import HPAError
from ..jsonfile import loads
from ..outputs import check_output
from .images import read_stain
from .layouts import CHANNELS, check_id, iter_csv, parse_labels
from .vocab import vocab_for

SETTINGS_JSON = "hpav18.json"  # how the folder's images were stored: a later run must store them alike
FAILED_CSV = "failed.csv"
LOCK_FILE = ".download-hpav18.lock"
# An Atlas stain JPEG is 0.2 to 3 MB; a response beyond this is not one, and is not read to the end.
MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_BACKOFF = 120.0  # seconds: the longest wait between two tries of a file, Retry-After included
# the statuses worth another try: the server is busy, restarting or behind a failing proxy
RETRY_STATUSES = {408, 425, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class StainFile:
    image_id: str
    stain: str
    url: str
    path: Path


@dataclass
class DownloadResult:
    out: Path
    complete: int  # ids whose four stains are on disk (the rows of train.csv)
    selected: int  # ids this run was asked for
    fetched: int = 0  # files downloaded by this run
    present: int = 0  # files already on disk
    missing: list = field(default_factory=list)  # (file, reason): HTTP 404, not on the server
    failed: list = field(default_factory=list)  # (file, reason): still failing after every retry
    bytes: int = 0
    seconds: float = 0.0
    interrupted: bool = False


def stain_url(base_url: str, image_id: str, stain: str) -> str:
    """The Atlas URL of one stain of an HPAv18 id, as the 2018 download scripts built it."""
    antibody, _, rest = image_id.partition("_")
    return f"{base_url.rstrip('/')}/{quote(antibody)}/{quote(rest)}_{stain}.jpg"


def read_hpav18_labels(path) -> pd.DataFrame:
    """The label CSV's rows (``Id``, ``Target`` with the labels sorted), each checked as it is read;
    a bad row is an HPAError naming the file and line."""
    path = Path(path)
    records = iter_csv(path)
    columns = next(records)
    if not {"Id", "Target"} <= set(columns):
        raise HPAError(f"{path}: expected columns Id,Target (the HPAv18 label CSV), found {','.join(columns)}")
    id_at, target_at = columns.index("Id"), columns.index("Target")
    n_classes = len(vocab_for("hpa2018"))
    rows, seen = [], {}
    for line, fields, problem in records:
        where = f"{path}, line {line}"
        if problem:
            raise HPAError(problem)
        image_id = check_id(fields[id_at], where)
        antibody, _, rest = image_id.partition("_")
        if not antibody or not rest:
            raise HPAError(f"{where}: id {image_id!r} is not an HPAv18 id (like 10580_1610_C1_1: "
                           "the antibody number, an underscore, the image's name)")
        if image_id in seen:
            raise HPAError(f"{where}: duplicated id {image_id!r} (first at line {seen[image_id]})")
        seen[image_id] = line
        labels = parse_labels(fields[target_at], n_classes, where)
        rows.append((image_id, " ".join(map(str, labels))))
    if not rows:
        raise HPAError(f"{path}: no rows")
    return pd.DataFrame(rows, columns=["Id", "Target"])


def select(labels: pd.DataFrame, classes=None, ids: int | None = None) -> pd.DataFrame:
    """The rows carrying at least one of ``classes`` (all rows without), then the first ``ids``."""
    if classes:
        wanted = {str(c) for c in classes}
        labels = labels[[bool(wanted & set(t.split())) for t in labels["Target"]]]
    return labels if ids is None else labels.iloc[:ids]


def class_list(classes) -> list[int] | None:
    """``--classes`` as class ids: a list (from the command line) or one string of ids."""
    if classes is None:
        return None
    tokens = classes.replace(",", " ").split() if isinstance(classes, str) else [str(c) for c in classes]
    return sorted({int(t) for t in tokens})


def _settings(cfg: DownloadHPAv18Config) -> dict:
    return {"format": _format(cfg), "size": cfg.size}


def _format(cfg: DownloadHPAv18Config) -> str:
    return ("png" if cfg.size else "jpg") if cfg.format == "auto" else cfg.format


def _check_settings(out: Path, settings: dict) -> None:
    """A folder holds images stored one way: a run that would store them otherwise is refused."""
    path = out / SETTINGS_JSON
    try:
        before = loads(path.read_text())
    except FileNotFoundError:
        return
    except (OSError, ValueError) as e:
        raise HPAError(f"{path}: unreadable ({e}); remove it if the folder holds no images yet") from None
    if not isinstance(before, dict):
        raise HPAError(f"{path}: not a JSON object; remove it if the folder holds no images yet")
    for key, flag in (("format", "--format"), ("size", "--size")):
        if before.get(key) != settings[key]:
            raise HPAError(f"--out {out}: holds HPAv18 images stored with {flag} {before.get(key)} ({path}); "
                           f"pass the same {flag} to continue that download, or choose another --out")


@contextlib.contextmanager
def _folder_lock(out: Path):
    """One download at a time per folder: each cleans up the temporary files a killed one left."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; nothing else differs
        yield
        return
    with open(out / LOCK_FILE, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise HPAError(f"--out {out}: another download-hpav18 is writing into this folder") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_leftovers(folder: Path) -> None:
    """Temporary files of a download that was killed (they never got a final name)."""
    for p in folder.glob(".*"):
        if p.suffix in (".tmp", ".part") and p.is_file():
            p.unlink(missing_ok=True)


class _Retry(Exception):
    def __init__(self, reason: str, wait: float | None = None):
        super().__init__(reason)
        self.wait = wait


class _Fail(Exception):
    pass


class _Fetcher:
    """Fetches stain files; one requests session (one kept-alive connection) per thread."""

    def __init__(self, cfg: DownloadHPAv18Config, fmt: str, stop: threading.Event):
        self.cfg, self.fmt, self.stop = cfg, fmt, stop
        self.local = threading.local()
        self.sessions = []
        self.lock = threading.Lock()

    def session(self):
        import requests
        from requests.adapters import HTTPAdapter

        if not hasattr(self.local, "session"):
            session = requests.Session()
            # the retries are ours (below): urllib3's own cover neither a body cut short nor a file
            # that arrives whole but does not decode
            adapter = HTTPAdapter(pool_connections=1, pool_maxsize=1, max_retries=0)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            session.headers["User-Agent"] = "hpa_fastai download-hpav18"
            self.local.session = session
            with self.lock:
                self.sessions.append(session)
        return self.local.session

    def close(self) -> None:
        for session in self.sessions:
            session.close()

    def fetch(self, task: StainFile) -> tuple[str, int, str]:
        """("done", bytes, "") or ("missing" | "failed" | "stopped", 0, reason), after the retries."""
        reason = ""
        for attempt in range(self.cfg.retries + 1):
            if self.stop.is_set():
                return "stopped", 0, "interrupted"
            try:
                return "done", self._fetch_once(task), ""
            except _Fail as e:
                return ("missing" if str(e).startswith("HTTP 404") else "failed"), 0, str(e)
            except _Retry as e:
                reason, delay = str(e), e.wait
            if attempt < self.cfg.retries:
                backoff = self.cfg.backoff * 2 ** attempt * random.uniform(0.5, 1.0)  # jitter: spread the threads
                self.stop.wait(min(max(backoff, delay or 0.0), MAX_BACKOFF))
        tries = self.cfg.retries + 1
        return "failed", 0, f"{reason} ({tries} {'try' if tries == 1 else 'tries'})"

    def _fetch_once(self, task: StainFile) -> int:
        import requests

        part = None
        try:
            with self.session().get(task.url, timeout=self.cfg.timeout, stream=True) as response:
                status = response.status_code
                if status in RETRY_STATUSES:
                    after = response.headers.get("Retry-After", "")
                    raise _Retry(f"HTTP {status}", float(after) if after.isdigit() else None)
                if status != 200:
                    raise _Fail(f"HTTP {status}" + (" (not on the server)" if status == 404 else ""))
                declared = response.headers.get("Content-Length", "")
                if declared.isdigit() and int(declared) > MAX_FILE_BYTES:
                    raise _Fail(f"{int(declared)} bytes, more than a stain image's {MAX_FILE_BYTES}")
                fd, part = tempfile.mkstemp(prefix=f".{task.path.name}.", suffix=".part", dir=task.path.parent)
                size = 0
                with os.fdopen(fd, "wb") as f:
                    for chunk in response.iter_content(1 << 16):
                        size += len(chunk)
                        if size > MAX_FILE_BYTES:
                            raise _Fail(f"more than {MAX_FILE_BYTES} bytes, more than a stain image")
                        f.write(chunk)
            self._store(Path(part), task)
            return size
        except requests.RequestException as e:
            raise _Retry(_reason(e)) from None
        except (ConnectionError, TimeoutError) as e:  # a socket error that requests did not wrap
            raise _Retry(f"{type(e).__name__}: {e}"[:200]) from None
        except OSError as e:  # writing the file: a full disk is not going to get better by retrying
            raise HPAError(f"cannot write {task.path}: {e.strerror or e}") from None
        finally:
            if part is not None:
                Path(part).unlink(missing_ok=True)

    def _store(self, part: Path, task: StainFile) -> None:
        """Check the downloaded file decodes as its stain; move it, or its resized grayscale PNG, in place."""
        size = self.cfg.size
        try:
            stain = read_stain(str(part), task.stain, size)  # all of it (scaled down with --size): a cut-off file fails
        except HPAError as e:
            raise _Retry(str(e).replace(f"{part}: ", "", 1)) from None
        if self.fmt == "jpg":
            with atomic_path(task.path) as tmp:
                os.replace(part, tmp)
        else:
            if size is not None and stain.size != (size, size):
                stain = stain.resize((size, size), Image.BILINEAR)  # as training resizes (images.read_image)
            save_png(task.path, stain)


def _reason(e: Exception) -> str:
    """A requests exception as a short reason (its text nests the whole urllib3 chain)."""
    import requests

    if isinstance(e, requests.Timeout):
        return "no answer within --timeout"
    if isinstance(e, requests.exceptions.ChunkedEncodingError):
        return "connection broken before the end of the file"
    if isinstance(e, requests.ConnectionError):
        return "connection refused or dropped by the server"
    return type(e).__name__


class _Progress:
    """A live bar (files, rate, ETA) in a terminal; elsewhere a plain line per 5% or per minute."""

    def __init__(self, total: int):
        self.total, self.done, self.bytes = total, 0, 0
        self.start = self.last_line = time.monotonic()
        self.last_share = 0.0
        self.bar = None
        if console.is_terminal and total:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("HPAv18"), BarColumn(), MofNCompleteColumn(), TextColumn("files"),
                                TextColumn("{task.fields[rate]}"), TextColumn("ETA"), TimeRemainingColumn(),
                                console=console, transient=True)
            self.task = self.bar.add_task("", total=total, rate="")
            self.bar.start()

    def rate(self) -> str:
        seconds = max(time.monotonic() - self.start, 1e-9)
        return f"{self.done / seconds:.1f} files/s, {self.bytes / seconds / 1e6:.2f} MB/s"

    def eta(self) -> str:
        seconds = time.monotonic() - self.start
        if not self.done:
            return "unknown"
        left = int(seconds / self.done * (self.total - self.done))
        return f"{left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}"

    def advance(self, nbytes: int) -> None:
        self.done += 1
        self.bytes += nbytes
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done, rate=self.rate())
            return
        share = self.done / self.total
        now = time.monotonic()
        if share - self.last_share >= 0.05 or now - self.last_line >= 60 or self.done == self.total:
            self.last_share, self.last_line = share, now
            log(f"HPAv18: {self.done}/{self.total} files ({share:.0%}), {self.rate()}, ETA {self.eta()}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def download(cfg: DownloadHPAv18Config) -> DownloadResult:
    """Fetch the stains of the selected ids into ``cfg.out``, then write its train.csv."""
    validate(cfg)
    labels_path = Path(cfg.labels)
    out = Path(cfg.out)
    fmt = _format(cfg)
    labels = read_hpav18_labels(labels_path)
    chosen = select(labels, class_list(cfg.classes), cfg.ids)
    if chosen.empty:
        raise HPAError(f"--classes {' '.join(map(str, class_list(cfg.classes)))}: no image of {labels_path} "
                       "carries any of these classes")
    for name in ("train.csv", FAILED_CSV, SETTINGS_JSON):
        check_output(out / name, "--out", inputs=[labels_path])
    if out.exists() and not out.is_dir():
        raise HPAError(f"--out {out}: not a folder")
    if (out / "train.csv").exists() and not (out / SETTINGS_JSON).exists():
        # e.g. the competition's own folder: its train.csv would be replaced by HPAv18's
        raise HPAError(f"--out {out}: holds a train.csv that download-hpav18 did not write (there is no "
                       f"{SETTINGS_JSON}); choose a new folder, and pass it to training with --extra-data")
    folder = out / "train"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HPAError(f"--out {out}: cannot create the folder ({e.strerror or e})") from None
    with _folder_lock(out):
        _check_settings(out, _settings(cfg))
        write_json(out / SETTINGS_JSON, {**_settings(cfg), "labels": str(labels_path), "base_url": cfg.base_url})
        _remove_leftovers(folder)
        return _download(cfg, fmt, out, folder, labels, chosen)


def _download(cfg, fmt: str, out: Path, folder: Path, labels: pd.DataFrame, chosen: pd.DataFrame) -> DownloadResult:
    tasks = [StainFile(image_id, stain, stain_url(cfg.base_url, image_id, stain), folder / f"{image_id}_{stain}.{fmt}")
             for image_id in chosen["Id"] for stain in CHANNELS]
    present = set(os.listdir(folder))
    todo = [t for t in tasks if t.path.name not in present]
    result = DownloadResult(out, 0, len(chosen), present=len(tasks) - len(todo))
    stored = "the server's colour JPEGs" if fmt == "jpg" else f"grayscale PNGs{f' of {cfg.size} px' if cfg.size else ''}"
    log(f"HPAv18: {len(chosen)} images ({len(tasks)} stain files) from {cfg.base_url}: {len(todo)} to fetch, "
        f"{len(tasks) - len(todo)} already in {folder}; stored as {stored}")
    stop = threading.Event()
    fetcher = _Fetcher(cfg, fmt, stop)
    progress = _Progress(len(todo))
    start = time.monotonic()
    try:
        _run(fetcher, todo, progress, result, cfg.connections)
    except KeyboardInterrupt:
        result.interrupted = True
    finally:
        stop.set()  # after Ctrl-C or an error the other threads stop before their next file or try
        progress.close()
        result.seconds = time.monotonic() - start
        result.complete = _write_tables(out, folder, fmt, labels, result)
    if result.interrupted:
        raise KeyboardInterrupt
    fetcher.close()
    return result


def _run(fetcher: _Fetcher, todo: list, progress: _Progress, result: DownloadResult, connections: int) -> None:
    """``connections`` threads take the files in turn; this thread counts what they report.

    Daemon threads rather than a ThreadPoolExecutor, whose threads the interpreter joins at exit:
    after Ctrl-C a thread stuck on a silent server would hold the process for up to --timeout.
    A thread abandoned mid-file leaves only a temporary file, which the next run removes."""
    tasks = iter(todo)
    take = threading.Lock()
    reports: queue.SimpleQueue = queue.SimpleQueue()

    def work():
        try:
            while not fetcher.stop.is_set():
                with take:
                    task = next(tasks, None)
                if task is None:
                    break
                reports.put((task, fetcher.fetch(task)))
        except BaseException as e:  # e.g. a full disk: reported to the main thread, which stops the rest
            reports.put((None, e))
        finally:
            reports.put(None)

    threads = [threading.Thread(target=work, name=f"hpav18-{i}", daemon=True)
               for i in range(min(connections, len(todo)))]
    for t in threads:
        t.start()
    running = len(threads)
    while running:
        try:
            report = reports.get(timeout=0.5)  # the timeout lets Ctrl-C through on every platform
        except queue.Empty:
            continue
        if report is None:
            running -= 1
            continue
        task, outcome = report
        if task is None:
            raise outcome
        status, nbytes, reason = outcome
        if status == "done":
            result.fetched += 1
            result.bytes += nbytes
            progress.advance(nbytes)
        elif status in ("missing", "failed"):
            getattr(result, status).append((task, reason))
            progress.advance(0)


def _write_tables(out: Path, folder: Path, fmt: str, labels: pd.DataFrame, result: DownloadResult) -> int:
    """train.csv: every id of the label CSV whose four stains are in the folder (from this run or
    an earlier one); failed.csv: the files this run could not get (removed when there are none)."""
    present = set(os.listdir(folder))
    complete = [all(f"{image_id}_{stain}.{fmt}" in present for stain in CHANNELS) for image_id in labels["Id"]]
    write_csv(out / "train.csv", labels[complete])
    problems = result.missing + result.failed
    if problems:
        write_csv(out / FAILED_CSV, pd.DataFrame([(t.image_id, t.stain, t.url, reason) for t, reason in problems],
                                                 columns=["Id", "stain", "url", "reason"]))
    else:
        (out / FAILED_CSV).unlink(missing_ok=True)
    return sum(complete)
