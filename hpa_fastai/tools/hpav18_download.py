"""Fetching the HPAv18 stain files from the Human Protein Atlas's image server into the layout that
``--extra-data`` reads (the label format, URLs and train.csv are ``data.hpav18``).

A bounded pool of connections fetches the files; a failed try is retried with exponential
back-off; each file is written under a temporary name, decoded and checked to be its stain, and
only then given its final name, so a download that was killed resumes where it stopped and a
partial file never counts as done. With ``size`` each stain is resized on the fly and stored as an
8-bit grayscale PNG. ``train.csv`` (the ids whose four stains are all on disk) is written at the
end, also after Ctrl-C; ``failed.csv`` lists the files this run could not get. One download at a
time writes into a folder (a lock file), and a folder's images are all stored alike (``hpav18.json``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import random
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from PIL import Image

from ..atomic import atomic_path, save_png, write_csv, write_json
from ..config import HPAV18_MIN_RATE, DownloadHPAv18Config, validate
from ..data.hpav18 import (IMAGE_FOLDER, TRAIN_CSV, class_list, read_hpav18_labels, select, stain_file, stain_url,
                           write_train_csv)
from ..data.images import read_stain
from ..data.layouts import CHANNELS
from ..errors import HPAError
from ..jsonfile import read_json
from ..outputs import check_output

logger = logging.getLogger(__name__)

SETTINGS_JSON = "hpav18.json"  # how the folder's images were stored: a later run must store them alike
FAILED_CSV = "failed.csv"
LOCK_FILE = ".download-hpav18.lock"
# An Atlas stain JPEG is 0.2 to 3 MB; a response beyond this is not one, and is not read to the end.
MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_BACKOFF = 120.0  # seconds: the longest wait between two tries of a file, Retry-After included
# the statuses worth another try: the server is busy, restarting or behind a failing proxy
RETRY_STATUSES = {408, 425, 429, 500, 502, 503, 504}
CHUNK_BYTES = 1 << 16

_DEFAULT = {f.name: f.default for f in dataclasses.fields(DownloadHPAv18Config)}  # the flags' defaults


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


def download(labels, out=_DEFAULT["out"], *, size: int | None = None, format: str = _DEFAULT["format"],
             ids: int | None = None, classes=None, base_url: str = _DEFAULT["base_url"],
             connections: int = _DEFAULT["connections"], retries: int = _DEFAULT["retries"],
             backoff: float = _DEFAULT["backoff"], timeout: float = _DEFAULT["timeout"],
             progress=None) -> DownloadResult:
    """Fetch the four stains of the chosen ids of the label CSV ``labels`` into ``out/train``, then
    write ``out/train.csv``; the parameters mean what ``download-hpav18``'s flags of the same names
    do. ``progress(done, total)`` is called after each file this run fetched or gave up on (``total``:
    the files it had to fetch). On Ctrl-C (KeyboardInterrupt) train.csv is still written, then the
    KeyboardInterrupt goes on."""
    settings = DownloadHPAv18Config(labels=str(labels), out=str(out), size=size, format=format, ids=ids,
                                    classes=classes, base_url=base_url, connections=connections, retries=retries,
                                    backoff=backoff, timeout=timeout)
    validate(settings)  # the flags' constraints hold for a caller from Python too
    labels_path, out = Path(labels), Path(out)
    fmt = ("png" if size else "jpg") if format == "auto" else format
    table = read_hpav18_labels(labels_path)
    chosen = select(table, class_list(classes), ids)
    if chosen.empty:
        raise HPAError(f"--classes {' '.join(map(str, class_list(classes)))}: no image of {labels_path} "
                       "carries any of these classes")
    for name in (TRAIN_CSV, FAILED_CSV, SETTINGS_JSON):
        check_output(out / name, "--out", inputs=[labels_path])
    if out.exists() and not out.is_dir():
        raise HPAError(f"--out {out}: not a folder")
    if (out / TRAIN_CSV).exists() and not (out / SETTINGS_JSON).exists():
        # e.g. the competition's own folder: its train.csv would be replaced by HPAv18's
        raise HPAError(f"--out {out}: holds a train.csv that download-hpav18 did not write (there is no "
                       f"{SETTINGS_JSON}); choose a new folder, and pass it to training with --extra-data")
    folder = out / IMAGE_FOLDER
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HPAError(f"--out {out}: cannot create the folder ({e.strerror or e})") from None
    stored = {"format": fmt, "size": size}
    with _folder_lock(out):
        _check_settings(out, stored)
        write_json(out / SETTINGS_JSON, {**stored, "labels": str(labels_path), "base_url": base_url})
        _remove_leftovers(folder)
        tasks = [StainFile(image_id, stain, stain_url(base_url, image_id, stain),
                           folder / stain_file(image_id, stain, fmt))
                 for image_id in chosen["Id"] for stain in CHANNELS]
        fetcher = _Fetcher(fmt, size, retries, backoff, timeout)
        return _download(fetcher, tasks, out, fmt, table, len(chosen), base_url, connections, progress)


def _check_settings(out: Path, settings: dict) -> None:
    """A folder holds images stored one way: a run that would store them otherwise is refused."""
    path = out / SETTINGS_JSON
    if not os.path.lexists(path):
        return
    try:
        before = read_json(path)
    except HPAError as e:
        raise HPAError(f"{e}; remove it if the folder holds no images yet") from None
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

    def __init__(self, fmt: str, size: int | None, retries: int, backoff: float, timeout: float):
        self.fmt, self.size, self.retries, self.backoff, self.timeout = fmt, size, retries, backoff, timeout
        self.stop = threading.Event()
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
        for attempt in range(self.retries + 1):
            if self.stop.is_set():
                return "stopped", 0, "interrupted"
            try:
                return "done", self._fetch_once(task), ""
            except _Fail as e:
                return ("missing" if str(e).startswith("HTTP 404") else "failed"), 0, str(e)
            except _Retry as e:
                reason, delay = str(e), e.wait
            if attempt < self.retries:
                backoff = self.backoff * 2 ** attempt * random.uniform(0.5, 1.0)  # jitter: spread the threads
                self.stop.wait(min(max(backoff, delay or 0.0), MAX_BACKOFF))
        tries = self.retries + 1
        return "failed", 0, f"{reason} ({tries} {'try' if tries == 1 else 'tries'})"

    def _fetch_once(self, task: StainFile) -> int:
        import requests
        import urllib3

        part = None
        start = time.monotonic()
        try:
            with self.session().get(task.url, timeout=self.timeout, stream=True) as response:
                status = response.status_code
                if status in RETRY_STATUSES:
                    after = response.headers.get("Retry-After", "")
                    raise _Retry(f"HTTP {status}", float(after) if after.isdigit() else None)
                if status != 200:
                    raise _Fail(f"HTTP {status}" + (" (not on the server)" if status == 404 else ""))
                declared = response.headers.get("Content-Length", "")
                expected = int(declared) if declared.isdigit() else None
                if expected is not None and expected > MAX_FILE_BYTES:
                    raise _Fail(f"{expected} bytes, more than a stain image's {MAX_FILE_BYTES}")
                fd, part = tempfile.mkstemp(prefix=f".{task.path.name}.", suffix=".part", dir=task.path.parent)
                size = 0
                with os.fdopen(fd, "wb") as f:
                    # read1: whatever has arrived, at most one wait of --timeout; requests' iter_content
                    # waits for a whole chunk, however slowly it comes, so the rate could not be checked
                    while chunk := response.raw.read1(CHUNK_BYTES, decode_content=True):
                        size += len(chunk)
                        if size > MAX_FILE_BYTES:
                            raise _Fail(f"more than {MAX_FILE_BYTES} bytes, more than a stain image")
                        f.write(chunk)
                        seconds = time.monotonic() - start
                        # a try's deadline (config.HPAV18_MIN_RATE): checked as data arrives; a wait
                        # for data is bounded by --timeout itself
                        if size != expected and seconds > self.timeout + size / HPAV18_MIN_RATE:
                            raise _Retry(f"slower than {HPAV18_MIN_RATE // 1000} kB/s: {size} bytes in {seconds:.1f} s")
            self._store(Path(part), task)
            return size
        except (requests.RequestException, urllib3.exceptions.HTTPError) as e:
            raise _Retry(_reason(e)) from None
        except (ConnectionError, TimeoutError) as e:  # a socket error that neither library wrapped
            raise _Retry(f"{type(e).__name__}: {e}"[:200]) from None
        except OSError as e:  # writing the file: a full disk is not going to get better by retrying
            raise HPAError(f"cannot write {task.path}: {e.strerror or e}") from None
        finally:
            if part is not None:
                Path(part).unlink(missing_ok=True)

    def _store(self, part: Path, task: StainFile) -> None:
        """Check the downloaded file decodes as its stain; move it, or its resized grayscale PNG, in place."""
        size = self.size
        try:
            stain = read_stain(str(part), task.stain, size)  # all of it (scaled down with --size): a cut-off file fails
        except HPAError as e:
            # the temporary file is gone by the time the reason is read: name what the user knows
            raise _Retry(str(e).replace(f"{part}: ", "", 1).replace(str(part), task.url)) from None
        if self.fmt == "jpg":
            with atomic_path(task.path) as tmp:
                os.replace(part, tmp)
        else:
            if size is not None and stain.size != (size, size):
                stain = stain.resize((size, size), Image.BILINEAR)  # as training resizes (images.read_image)
            save_png(task.path, stain)


def _reason(e: Exception) -> str:
    """A requests or urllib3 exception as a short reason (their text nests the whole chain)."""
    import requests
    import urllib3

    if isinstance(e, (requests.Timeout, urllib3.exceptions.TimeoutError)):
        return "no answer within --timeout"
    if isinstance(e, (requests.exceptions.ChunkedEncodingError, urllib3.exceptions.ProtocolError)):
        return "connection broken before the end of the file"
    if isinstance(e, requests.ConnectionError):
        return "connection refused or dropped by the server"
    return type(e).__name__


def _download(fetcher: _Fetcher, tasks: list, out: Path, fmt: str, labels: pd.DataFrame, selected: int,
              base_url: str, connections: int, progress) -> DownloadResult:
    folder = out / IMAGE_FOLDER
    present = set(os.listdir(folder))
    todo = [t for t in tasks if t.path.name not in present]
    result = DownloadResult(out, 0, selected, present=len(tasks) - len(todo))
    stored = "the server's colour JPEGs" if fmt == "jpg" else \
        f"grayscale PNGs{f' of {fetcher.size} px' if fetcher.size else ''}"
    logger.info("HPAv18: %d images (%d stain files) from %s: %d to fetch, %d already in %s; stored as %s",
                selected, len(tasks), base_url, len(todo), len(tasks) - len(todo), folder, stored)
    start = time.monotonic()
    try:
        _run(fetcher, todo, result, connections, progress)
    except KeyboardInterrupt:
        result.interrupted = True
    finally:
        fetcher.stop.set()  # after Ctrl-C or an error the other threads stop before their next file or try
        result.seconds = time.monotonic() - start
        result.complete = write_train_csv(out, fmt, labels)
        _write_failed(out, result)
    if result.interrupted:
        raise KeyboardInterrupt
    fetcher.close()
    return result


def _run(fetcher: _Fetcher, todo: list, result: DownloadResult, connections: int, progress) -> None:
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
    running, done = len(threads), 0
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
        elif status in ("missing", "failed"):
            getattr(result, status).append((task, reason))
        else:
            continue
        done += 1
        if progress is not None:
            progress(done, len(todo))


def _write_failed(out: Path, result: DownloadResult) -> None:
    """failed.csv: the files this run could not get (removed when there are none)."""
    problems = result.missing + result.failed
    if problems:
        write_csv(out / FAILED_CSV, pd.DataFrame([(t.image_id, t.stain, t.url, reason) for t, reason in problems],
                                                 columns=["Id", "stain", "url", "reason"]))
    else:
        (out / FAILED_CSV).unlink(missing_ok=True)
