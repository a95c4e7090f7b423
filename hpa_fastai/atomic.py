"""Atomic file writes: a file appears under its final name complete or not at all, with the
permissions ``open()`` would give it (0666 less the umask)."""
from __future__ import annotations

import contextlib
import json
import math
import os
import stat
import tempfile
from pathlib import Path

from .errors import HPAError


def current_umask() -> int:
    """The process's umask, read without changing it where Linux allows (``os.umask`` sets it while
    reading it, which races with threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not every platform can open a folder
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path, durable: bool = False):
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds.

    ``durable``: flush the file to disk before the rename and the folder after it, so that after a
    power loss the final name holds either the old file or the complete new one (checkpoints and
    exported models; the other files are cheap to make again)."""
    path = Path(path)
    try:  # e.g. a parent that is a file
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise HPAError(f"cannot write {path}: {e.strerror or e}") from None
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        # mkstemp makes the file 0600 (and some writers, e.g. safetensors, make it anew): the final
        # file gets the mode open() would have given it
        os.chmod(tmp, 0o666 & ~current_umask())
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            _fsync_dir(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise HPAError(f"cannot write {path}: {e.strerror or e}") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path, text: str, durable: bool = False) -> Path:
    with atomic_path(path, durable) as tmp:
        tmp.write_text(text)
    return Path(path)


def finite_json(obj):
    """``obj`` with every float that is not finite (NaN, infinity) as None: JSON has no NaN, and
    strict parsers refuse the bare ``NaN`` Python's json would write."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # a numpy or torch scalar
        return finite_json(obj.item())
    return obj


def write_json(path, obj, durable: bool = False) -> Path:
    """``obj`` as JSON, NaN and infinity written as ``null`` (never a bare ``NaN``)."""
    return write_text(path, json.dumps(finite_json(obj), indent=2, default=str, allow_nan=False) + "\n", durable)


def write_csv(path, df, **kwargs) -> Path:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, **kwargs)
    return Path(path)


def save_png(path, image) -> Path:
    """Save a PIL image as PNG atomically."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)


def save_figure(path, fig) -> Path:
    """A matplotlib figure as PNG, written atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    return Path(path)


def folder_size(folder) -> int:
    """Bytes of the regular files under ``folder`` (links are not followed)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:  # removed meanwhile
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


@contextlib.contextmanager
def exclusive_lock(path, busy: str):
    """An advisory lock on ``path`` (a folder, or a file created if need be) for the block;
    ``HPAError(busy)`` at once if another process holds it. Locking a folder writes nothing into it.
    The operating system drops the lock with the process, so it never outlives a killed command."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks
        yield
        return
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY) if path.is_dir() else os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)
    except OSError as e:
        raise HPAError(f"cannot lock {path}: {e.strerror or e}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise HPAError(busy) from None
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def lock_is_free(path) -> bool | None:
    """Whether no process holds ``exclusive_lock`` on the file ``path``: True when it is free or the
    file is gone, False while a process holds it, None when it cannot be told (not a regular file,
    a link, no advisory locks). Never follows a link, never waits on a FIFO."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except FileNotFoundError:
        return True
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    finally:
        os.close(fd)
