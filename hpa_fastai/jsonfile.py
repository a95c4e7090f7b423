"""Reading JSON that this process did not just write: every JSON file the tool reads (run files,
model descriptions, safetensors headers, the preprocess cache's index, download settings) goes
through here, so that a damaged or hostile file is one HPAError line naming it, never a hang, a
RecursionError or an allocation sized by the file."""
from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

from .errors import HPAError

MAX_BYTES = 64 * 1024 * 1024  # no JSON file of this tool comes near; a bound before anything is read
SMALL = 1024 * 1024  # configs, model descriptions, status and metrics files: a few KB when the tool writes them

# What to do with NaN, Infinity and numbers too large for a float (1e999), which Python's json
# accepts although JSON has no such values:
REFUSE = "refuse"  # an error naming the file
KEEP = "keep"  # float nan / inf, for a caller that checks every number itself
AS_NONE = "none"  # None, for a lenient reader that shows a missing value

_NOT_FOUND = object()


class InvalidJSON(ValueError):
    """Text that is not JSON this tool accepts; the message is one line, e.g. "not valid JSON
    (nested too deeply)". A ValueError, so callers that word the error themselves catch it as such."""


def loads(text: str | bytes, nonfinite: str = REFUSE):
    """The value of the JSON ``text``, or InvalidJSON saying why not (see ``parse_json``)."""
    if nonfinite not in (REFUSE, KEEP, AS_NONE):
        raise ValueError(f"nonfinite must be {REFUSE}, {KEEP} or {AS_NONE}")
    if isinstance(text, (bytes, bytearray)):
        try:  # a BOM from a Windows editor is harmless; other encodings are not what this tool writes
            text = bytes(text).decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise InvalidJSON(f"not valid JSON (not UTF-8 text: {e.reason} at byte {e.start})") from None
    if len(text) > MAX_BYTES:
        raise InvalidJSON(f"not valid JSON (over {MAX_BYTES} characters)")

    def constant(name):  # NaN, Infinity, -Infinity, and what overflows a float
        if nonfinite == REFUSE:
            raise InvalidJSON(f"not valid JSON ({name[:40]} is not a finite number)")
        return None if nonfinite == AS_NONE else float(name)

    def number(token):
        value = float(token)
        return value if math.isfinite(value) else constant(token)

    try:
        return json.loads(text, parse_constant=constant, parse_float=number)
    except InvalidJSON:
        raise
    except RecursionError:  # the C scanner recurses once per bracket: "[[[[..." exhausts the stack
        raise InvalidJSON("not valid JSON (nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError, and integers longer than Python's digit limit
        raise InvalidJSON(f"not valid JSON ({str(e).splitlines()[0].split(';')[0][:120]})") from None


def parse_json(text: str | bytes, where, nonfinite: str = REFUSE):
    """The value of the JSON ``text`` read from ``where`` (named in the error), or an HPAError.
    ``nonfinite``: what NaN, Infinity and 1e999 become (REFUSE, KEEP or AS_NONE)."""
    try:
        return loads(text, nonfinite)
    except InvalidJSON as e:
        raise HPAError(f"{where}: {e}") from None


def open_regular(path, what: str = "file"):
    """``path`` opened for reading in binary, if it is a regular file (an HPAError naming it if not;
    FileNotFoundError passes through). Opened without blocking, so a FIFO or a device in place of
    a file is refused, not waited on; the caller closes the file."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise
    except OSError as e:
        raise HPAError(f"{path}: cannot read the {what} ({e.strerror or e})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a folder, FIFO or device: nothing to read, or no end to it
            raise HPAError(f"{path}: cannot read the {what} (not a regular file)")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path, max_bytes: int = MAX_BYTES, what: str = "file") -> bytes:
    """The bytes of the regular file ``path`` (see ``open_regular``), at most ``max_bytes`` of them."""
    with open_regular(path, what) as f:
        try:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise HPAError(f"{path}: cannot read the {what} ({size} bytes, over the {max_bytes} a {what} may have)")
            data = f.read(max_bytes + 1)  # the file may have grown since fstat
        except OSError as e:
            raise HPAError(f"{path}: cannot read the {what} ({e.strerror or e})") from None
    if len(data) > max_bytes:
        raise HPAError(f"{path}: cannot read the {what} (over the {max_bytes} bytes a {what} may have)")
    return data


def read_json(path, what: str = "JSON file", max_bytes: int = SMALL, nonfinite: str = REFUSE,
              missing=_NOT_FOUND):
    """The value of the JSON file ``path`` (``what`` it is, for the error), read as ``read_bytes``
    reads; ``missing``, if given, is returned when there is no such file."""
    try:
        data = read_bytes(path, max_bytes, what)
    except FileNotFoundError as e:
        if missing is not _NOT_FOUND:
            return missing
        raise HPAError(f"{path}: cannot read the {what} ({e.strerror or 'not found'})") from None
    return parse_json(data, path, nonfinite)
