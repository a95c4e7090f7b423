"""What start-up has already checked of a data folder, remembered per file, so that a run on data that
has not changed since the last one checks only new or changed files.

Before training every image is checked (``images.verify_images``: its header, that a PNG is complete,
a colour stain's colour; with ``--skip-bad`` a full decode) and the channel statistics are measured on
a sample: on the full HPA 2018 set (124,288 stain files) that was most of a run's start-up, paid again
by every run of a search, every fold and every resume. An image passed is recorded with its files'
size, modification time and inode; a later run skips the ones whose files still have all three
(a file written again, replaced or touched is checked again, and a damaged one is then caught). The
statistics are recorded with the sample they were measured on, under the same rule.

The record is one small JSON file per data folder in the user's cache folder
(``$XDG_CACHE_HOME/hpa_fastai/checked/``, by default ``~/.cache/hpa_fastai/checked/``), named after
the data folder's path: nothing is written into the data folder, which may be read-only or shared.
It says what it is in its own ``about`` field and may be deleted at any time. It is read as any file
from outside: bounded in size, through ``jsonfile``; one that is not such a record, or whose values
are not what this module writes, is ignored (everything is checked again) and written anew.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..atomic import write_json
from ..errors import HPAError
from ..jsonfile import MAX_BYTES, read_json
from ..paths import cache_root, user_cache_dir
from .images import channel_stats, verify_images
from .layouts import CHANNEL_SETS, key_files

logger = logging.getLogger(__name__)

RECORD = "checked.json"
VERSION = 1
ABOUT = ("hpa_fastai: the images of the data folder named in 'folder' that passed the checks before training, "
         "and its channel statistics; each entry is a digest of its files' size, modification time and inode, "
         "and an image whose digest differs is checked again. Safe to delete.")
MAX_STATS = 8  # samples remembered per folder (sizes, stains, seeds)
_DIGEST_CHARS = 16


def record_path(data_dir: Path) -> Path:
    """Where the record of ``data_dir`` is kept (see the module's description)."""
    data_dir = Path(data_dir).resolve()
    root = cache_root(None) or user_cache_dir()  # $HPA_FASTAI_CACHE, else the per-user cache
    return root / "checked" / f"{hashlib.sha256(str(data_dir).encode()).hexdigest()[:16]}.json"


def files_digest(paths) -> str | None:
    """A short digest of the files' size, modification time (ns) and inode, or None if one is missing."""
    h = hashlib.blake2b(digest_size=_DIGEST_CHARS // 2)
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            return None
        h.update(b"%d %d %d;" % (st.st_size, st.st_mtime_ns, st.st_ino))
    return h.hexdigest()


class Record:
    """The record of one data folder: ``checks[kind][relative key] = digest`` and ``stats[digest] =
    (mean, std)``; ``dirty`` once something was added."""

    def __init__(self, data_dir):
        self.folder = str(data_dir)  # as the item keys spell it
        self.data_dir, self.path = Path(data_dir).resolve(), record_path(data_dir)
        self.checks: dict[str, dict[str, str]] = {}
        self.stats: dict[str, tuple[list, list]] = {}
        self.dirty = False
        self._read()

    def _read(self) -> None:
        try:
            saved = read_json(self.path, "record of checked images", max_bytes=MAX_BYTES, missing=None)
        except HPAError as e:
            logger.info(f"note: {e}; checking every image again")
            return
        if saved is None:
            return
        problem = _problem(saved)
        if problem:
            logger.info(f"note: {self.path} is not a record this version writes ({problem}); checking every image "
                        "again")
            return
        self.checks, self.stats = saved["checks"], {k: (v["mean"], v["std"]) for k, v in saved["stats"].items()}

    def relative(self, key: str) -> str:
        """``key`` (an item key in this folder) relative to the folder."""
        return key[len(self.folder) + 1:] if self.folder else key

    def save(self) -> None:
        if not self.dirty:
            return
        try:
            write_json(self.path, {"about": ABOUT, "version": VERSION, "folder": str(self.data_dir),
                                   "checks": self.checks,
                                   "stats": {k: {"mean": m, "std": s} for k, (m, s) in self.stats.items()}})
        except (HPAError, OSError) as e:  # a full or read-only disk: the next run checks again
            logger.info(f"note: could not remember the checked images ({e})")
        self.dirty = False


def _problem(saved) -> str | None:
    """What makes ``saved`` something other than a record of this version, or None."""
    if not isinstance(saved, dict) or saved.get("version") != VERSION:
        return "no version 1"
    checks, stats = saved.get("checks"), saved.get("stats")
    if not isinstance(checks, dict) or not all(isinstance(v, dict) for v in checks.values()):
        return "checks"
    for entries in checks.values():
        if not all(isinstance(k, str) and isinstance(d, str) and len(d) == _DIGEST_CHARS for k, d in entries.items()):
            return "a check entry"
    if not isinstance(stats, dict):
        return "stats"
    if len(stats) > MAX_STATS:
        return "too many statistics"
    for entry in stats.values():
        if not (isinstance(entry, dict) and _numbers(entry.get("mean"), 0.0, 1.0)
                and _numbers(entry.get("std"), 1e-3, 1.0) and len(entry["mean"]) == len(entry["std"])):
            return "statistics"
    return None


def _numbers(values, low: float, high: float) -> bool:
    return (isinstance(values, list) and 1 <= len(values) <= 4
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and low <= x <= high
                    for x in values))


def _data_folder(key: str) -> str:
    """The data folder an item key belongs to: keys are ``<data>/<split>/<file>``."""
    parts = key.rsplit(os.sep, 2)
    return parts[0] if len(parts) == 3 else ""


def verify_remembered(items: pd.DataFrame, channels: str, deep: bool = False) -> dict[str, str]:
    """``verify_images`` for the images not already checked since their files last changed, then
    remembered; {item key: message} for the unreadable ones."""
    names = CHANNEL_SETS[channels]
    kind = f"{'decode' if deep else 'header'}:{channels}"
    accepted = [f"decode:{channels}"] + ([] if deep else [kind])  # a decode covers the header check
    records, digests, todo = {}, {}, []
    folder_of = {}
    for key in items["key"].tolist():
        folder = folder_of[key] = _data_folder(key)
        record = records.get(folder) or records.setdefault(folder, Record(folder))
        digest = digests[key] = files_digest(key_files(key, names))
        rel = record.relative(key)
        if digest is None or not any(record.checks.get(k, {}).get(rel) == digest for k in accepted):
            todo.append(key)
    if todo and len(todo) < len(digests):
        logger.info(f"checking {len(todo)} new or changed of {len(digests)} images")
    bad = verify_images(pd.DataFrame({"key": todo}), channels, deep=deep) if todo else {}
    passed = {folder: {} for folder in records}
    for key, digest in digests.items():
        if key not in bad and digest is not None:
            folder = folder_of[key]
            passed[folder][records[folder].relative(key)] = digest
    for folder, record in records.items():
        if record.checks.get(kind) != passed[folder]:  # entries of images no longer listed go too
            record.checks[kind] = passed[folder]
            record.dirty = True
        record.save()
    return bad


def remembered_stats(data_dir: Path, keys, channels: str, size: int, seed: int = 0, n: int = 64) -> tuple[list, list]:
    """``channel_stats`` of ``keys``, or what it gave before for the same sample of the same files."""
    keys = list(keys)
    pick = np.random.default_rng(seed).choice(len(keys), size=min(n, len(keys)), replace=False)
    names = CHANNEL_SETS[channels]
    h = hashlib.blake2b(f"{channels} {size} {seed} {n} {len(keys)}".encode(), digest_size=_DIGEST_CHARS // 2)
    for i in pick:
        digest = files_digest(key_files(keys[i], names))
        if digest is None:
            return channel_stats(keys, channels, size, n=n, seed=seed)  # its error names the missing file
        h.update(f"{keys[i]} {digest};".encode())
    sample = h.hexdigest()
    record = Record(data_dir)
    if sample in record.stats and len(record.stats[sample][0]) == len(names):
        return record.stats[sample]
    mean, std = channel_stats(keys, channels, size, n=n, seed=seed)
    record.stats[sample] = (mean, std)
    record.stats = dict(list(record.stats.items())[-MAX_STATS:])
    record.dirty = True
    record.save()
    return mean, std
