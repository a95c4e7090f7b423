"""The web app's own temporary folder. Everything a request leaves on disk lives in it: Gradio's
uploads (the app points ``GRADIO_TEMP_DIR`` here), the scratch folder an answer reads its uploads
from, and the heatmaps a page shows. It holds at most ``max_bytes`` and ``max_files`` at once (the oldest files
go first; an upload larger than the whole cap is refused), it knows which files each browser
session holds so that they go when the session moves on or ends, and it is removed when the server
stops. A folder left by a server that was killed outright (SIGKILL, a power cut) is removed by the
next ``serve``."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import threading
from collections import Counter
from pathlib import Path

PREFIX = "hpa-serve-"  # then the server's process id: hpa-serve-{pid}-{random}
SCRATCH = "scratch"  # a folder per request, of links to its uploads; each request removes its own


def mib(nbytes: int) -> str:
    value = nbytes / 2**20
    return f"{value:.0f} MiB" if value >= 100 else f"{value:.3g} MiB"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's process
        return True
    return True


def remove_stale(parent: Path) -> None:
    """Remove the folders in ``parent`` that this user's earlier ``serve`` processes left behind
    when they were killed outright: their process no longer runs."""
    if os.name != "posix":  # os.kill(pid, 0) terminates the process on Windows
        return
    with contextlib.suppress(OSError), os.scandir(parent) as entries:
        for entry in entries:
            match = re.fullmatch(rf"{PREFIX}(\d+)-\w+", entry.name)
            try:
                if (match and entry.is_dir(follow_symlinks=False)
                        and entry.stat(follow_symlinks=False).st_uid == os.getuid()
                        and not _pid_alive(int(match.group(1)))):
                    shutil.rmtree(entry.path, ignore_errors=True)
            except OSError:
                continue


def stored_bytes(files) -> int:
    """Bytes on disk of ``files`` (path, stat), a file's hard links counted once: a request's scratch
    folder links to its uploads."""
    return sum({(st.st_dev, st.st_ino): st.st_size for _, st in files}.values())


class TempFolder:
    """A folder under the system temp folder, bounded in bytes and files, removed by ``remove``
    (or on leaving a ``with`` block)."""

    def __init__(self, max_bytes: int, max_files: int, parent: str | Path | None = None):
        parent = Path(parent or tempfile.gettempdir())
        remove_stale(parent)
        self.path = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=parent)).resolve()
        (self.path / SCRATCH).mkdir()
        self.max_bytes, self.max_files = max_bytes, max_files
        self._lock = threading.RLock()
        self._in_use: Counter[Path] = Counter()
        self._reserved = 0  # bytes of uploads on their way in
        self._sessions: dict[str, dict[str, set[Path]]] = {}

    def __enter__(self) -> TempFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    # --- what it holds ---------------------------------------------------------------------------

    def inside(self, path) -> Path | None:
        """``path`` resolved, if it lies in this folder; None for anything else (a user's own file
        is never deleted)."""
        try:
            resolved = Path(path).resolve()
        except (OSError, RuntimeError, ValueError):
            return None
        return resolved if resolved.is_relative_to(self.path) and resolved != self.path else None

    def files(self) -> list[tuple[Path, os.stat_result]]:
        """Every regular file in the folder, with its stat; links are not followed."""
        found, folders = [], [self.path]
        while folders:
            with contextlib.suppress(OSError), os.scandir(folders.pop()) as entries:
                for entry in entries:
                    with contextlib.suppress(OSError):
                        if entry.is_dir(follow_symlinks=False):
                            folders.append(Path(entry.path))
                        elif entry.is_file(follow_symlinks=False):
                            found.append((Path(entry.path), entry.stat(follow_symlinks=False)))
        return found

    def usage(self) -> tuple[int, int]:
        """Bytes and files the folder holds now."""
        files = self.files()
        return stored_bytes(files), len(files)

    @contextlib.contextmanager
    def in_use(self, paths):
        """Keep ``paths`` from being evicted or deleted while a request reads them."""
        held = [p for p in map(self.inside, paths) if p is not None]
        with self._lock:
            self._in_use.update(held)
        try:
            yield
        finally:
            with self._lock:
                self._in_use.subtract(held)
                self._in_use = +self._in_use  # drop the zero counts

    @property
    def scratch_dir(self) -> Path:
        """Where a request makes its folder of links to its uploads (and removes it when it ends);
        nothing in it is evicted."""
        return self.path / SCRATCH

    def write(self, kind: str, blobs: list[bytes], suffix: str = "", names: list[str] | None = None) -> list[Path] | None:
        """``blobs`` written as the files 1{suffix}, 2{suffix} ... (or ``names``, plain file names) of a
        new folder under ``kind``, after making room for them; None when there is none."""
        with self._lock:
            if not self.make_room(sum(map(len, blobs)), len(blobs)):
                return None
            target = Path(tempfile.mkdtemp(dir=self._mkdir(kind)))
            names = names or [f"{i}{suffix}" for i in range(1, len(blobs) + 1)]
            paths = [target / Path(name).name for name in names]
            for path, blob in zip(paths, blobs):
                path.write_bytes(blob)
            return paths

    def _mkdir(self, kind: str) -> Path:
        (self.path / kind).mkdir(exist_ok=True)
        return self.path / kind

    # --- the cap ---------------------------------------------------------------------------------

    def _evictable(self, path: Path) -> bool:
        return path not in self._in_use and path.parent.parent != self.scratch_dir

    def make_room(self, nbytes: int = 0, nfiles: int = 0, partly: bool = False) -> bool:
        """Delete the oldest files until ``nbytes`` more bytes and ``nfiles`` more files fit under
        the cap; False when they cannot (files in use, or more than the whole cap), and then
        nothing is deleted unless ``partly``."""
        with self._lock:
            files = self.files()
            used = stored_bytes(files) + self._reserved
            count = len(files)
            victims = []
            for path, st in sorted(files, key=lambda f: f[1].st_mtime):
                if used + nbytes <= self.max_bytes and count + nfiles <= self.max_files:
                    break
                if self._evictable(path):
                    victims.append(path)
                    used -= st.st_size
                    count -= 1
            fits = used + nbytes <= self.max_bytes and count + nfiles <= self.max_files
            if fits or partly:
                for path in victims:
                    self._unlink(path)
                self._forget_gone()
            return fits

    def reserve(self, nbytes: int) -> str | None:
        """Room for an upload of ``nbytes``, held until ``release``; or why there is none."""
        held = f"{mib(self.max_bytes)} of uploads and heatmaps, {self.max_files} files"
        if nbytes > self.max_bytes:
            return f"this upload is {mib(nbytes)}, more than the server holds at once ({held}); drop fewer or smaller files"
        with self._lock:
            if not self.make_room(nbytes, 1):
                return f"the server is full ({held}) while it answers other requests; try again in a moment"
            self._reserved += nbytes
        return None

    def release(self, nbytes: int) -> None:
        with self._lock:
            self._reserved -= nbytes
            self.make_room(partly=True)  # an upload of many small files can pass the file count

    # --- deleting --------------------------------------------------------------------------------

    def _unlink(self, path: Path) -> bool:
        try:
            path.unlink()
        except FileNotFoundError:
            return True
        except OSError:
            return False
        # Gradio keeps each upload and each cached file in a folder of its own: remove it with it
        parent = path.parent
        while parent not in (self.path, self.scratch_dir):
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent
        return True

    def delete(self, paths) -> None:
        """Delete ``paths`` that lie in this folder and no request is reading."""
        with self._lock:
            for path in filter(None, map(self.inside, paths)):
                if path not in self._in_use:
                    self._unlink(path)

    # --- what each browser session holds ---------------------------------------------------------

    def hold_for(self, session: str | None, kind: str, paths) -> None:
        """``paths`` are what ``session`` now holds of ``kind`` (its uploads, or the heatmaps on
        its page): what it held of that kind before and no longer does is deleted."""
        if session is None:
            return
        now = {p for p in map(self.inside, paths) if p is not None}
        with self._lock:
            kinds = self._sessions.setdefault(session, {})
            self.delete(kinds.get(kind, set()) - now)
            kinds[kind] = now

    def end_session(self, session: str | None) -> None:
        """The page was closed: delete everything ``session`` held."""
        with self._lock:
            for held in self._sessions.pop(session, {}).values():
                self.delete(held)

    def _forget_gone(self) -> None:
        """Drop the sessions whose files are all gone (evicted), so the table stays as small as the
        folder."""
        for session, kinds in list(self._sessions.items()):
            if not any(p.exists() for held in kinds.values() for p in held):
                del self._sessions[session]


class UploadCap:
    """ASGI middleware around Gradio's app: an upload is let in only if the folder can hold it.
    Gradio bounds each file (``max_file_size``) but not a request, which may carry 1000 files, nor
    what piles up; this is the one place that does. The size comes from ``Content-Length`` (uvicorn
    delivers no more body than it says); a chunked upload states no size and is refused."""

    def __init__(self, app, folder: TempFolder):
        self.app, self.folder = app, folder

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].rstrip("/").endswith("/upload"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"")
        if b"transfer-encoding" in headers or not length.isdigit():
            return await self._refuse(send, 411, "an upload must state its size (Content-Length)")
        nbytes = int(length)
        refusal = self.folder.reserve(nbytes)
        if refusal:
            return await self._refuse(send, 413 if nbytes > self.folder.max_bytes else 503, refusal)
        released = False

        async def send_when_within_cap(message):
            nonlocal released
            if message["type"] == "http.response.start" and not released:  # the files are in place by then
                released = True
                self.folder.release(nbytes)
            await send(message)

        try:
            await self.app(scope, receive, send_when_within_cap)
        finally:
            if not released:
                self.folder.release(nbytes)

    @staticmethod
    async def _refuse(send, status: int, message: str) -> None:
        body = message.encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
