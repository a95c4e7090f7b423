"""The ``preprocess`` command: a resized copy of a data set, decoded once, that training reads
instead of decoding full-size PNGs every epoch.

Each training image becomes one uint8 ``.npy`` of shape (C, H, W), the layout of the tensors the
loader hands on, under ``<data>/cache/<channels>_<size>/<id>.npy`` (or, for a read-only data folder
or with ``--cache DIR`` / ``$HPA_FASTAI_CACHE``, under a folder of that data set's own elsewhere:
``paths.derived_dir``); ``cache.json`` beside them
(size, channels, count) is written last. Images are resized by ``read_image`` itself, so batches
from the cache are identical to batches decoded from the PNGs. Every file is written atomically
and files that are already there and valid are skipped, so an interrupted run just continues.

The cache lives in a folder where anyone may have put anything: every entry is checked as
an untrusted file before it is used (``images.cached_array_shape``: a regular file, not a link, a
FIFO or a folder; a .npy header of uint8 (C, size, size); exactly the size that header calls for),
and so is ``cache.json``. ``preprocess`` writes a bad entry again; training reads the originals of
a folder whose cache has one, and says so.
"""
from __future__ import annotations

import logging
import os
import stat
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from ..atomic import atomic_path, write_json
from ..config import MIN_SIZE
from ..errors import HPAError
from ..jsonfile import read_json
from ..paths import CACHE_ENV, derived_dir, resolve_data_dir
from .images import cached_array_shape, read_image
from .layouts import CHANNEL_SETS, detect_format, key_files, read_items
from .pipeline import available_cores, bound_workers

logger = logging.getLogger(__name__)

CACHE_JSON = "cache.json"


def cache_dir(data_dir, channels: str, size: int, cache=None) -> Path:
    """The cache folder of ``data_dir`` at (channels, size) that ``preprocess`` writes; ``cache``:
    the ``--cache`` flag (see ``paths.derived_dir``)."""
    return derived_dir(data_dir, cache)[0] / "cache" / f"{channels}_{size}"


def _cache_dirs_to_read(data_dir: Path, channels: str, size: int, cache=None) -> list[Path]:
    """Where training looks for a cache of ``data_dir``: where ``preprocess`` writes it now, then the
    data folder's own (one made before the folder became read-only, or shipped with the data set)."""
    own = Path(data_dir) / "cache" / f"{channels}_{size}"
    return list(dict.fromkeys([cache_dir(data_dir, channels, size, cache), own]))


def cached_file(folder: Path, image_id: str) -> Path:
    return folder / f"{image_id}.npy"


def _newest_source(key: str, channels: str) -> float:
    return max(os.stat(f).st_mtime for f in key_files(key, CHANNEL_SETS[channels]))


def entry_problem(path: Path, channels: str, size: int) -> str | None:
    """What is wrong with the cache entry ``path`` (a message naming it), or None if it holds a
    complete (C, size, size) uint8 array; reads its header only."""
    try:
        cached_array_shape(str(path), len(channels), size)
    except HPAError as e:
        return str(e)
    return None


def is_cached(path: Path, key: str, channels: str, size: int) -> bool:
    """Whether ``path`` holds a complete (C, size, size) uint8 array newer than every source file."""
    if entry_problem(path, channels, size) is not None:
        return False
    try:
        return path.lstat().st_mtime >= _newest_source(key, channels)
    except OSError:
        return False


def _cache_one(task: tuple) -> str | None:
    """Worker: decode and resize one image, write its .npy; the error message if it is unreadable."""
    key, dest, channels, size = task
    try:
        arr = read_image(key, CHANNEL_SETS[channels], size)
    except HPAError as e:
        return str(e)
    try:  # a FIFO or link in the entry's place is replaced by the rename; a folder must go first
        if stat.S_ISDIR(dest.lstat().st_mode):
            dest.rmdir()
    except FileNotFoundError:
        pass
    except OSError as e:
        return f"{dest}: a folder where a cached image belongs, and it cannot be removed ({e.strerror or e}); remove it"
    with atomic_path(dest) as tmp, open(tmp, "wb") as f:  # a file object: np.save would add ".npy" to a path
        np.save(f, np.ascontiguousarray(arr.transpose(2, 0, 1)), allow_pickle=False)
    return None


def _writable_cache_dir(folder: Path, data_dir: Path) -> None:
    """Create ``folder`` and check that files can be written in it, before any image is decoded."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise HPAError(f"{data_dir}: cannot write the cache folder {folder} ({e.strerror or e}); pass --cache DIR "
                       f"(or set ${CACHE_ENV}) to a folder that is writable and run it again") from None


def preprocess(data=None, size: int = 256, channels: str = "auto", workers: int | None = None,
               cache=None) -> Path:
    """Cache the training images of ``data`` at ``size``; returns the cache folder. ``cache``: the
    ``--cache`` flag (default: the data folder when writable, else the per-user cache)."""
    if size < MIN_SIZE:
        raise HPAError(f"--size must be at least {MIN_SIZE} pixels (got {size})")
    data_dir = resolve_data_dir(data)
    fmt = detect_format(data_dir)
    channels = fmt.default_channels if channels == "auto" else channels
    if channels == "rgby" and not fmt.channel_files:
        raise HPAError(f"--channels rgby needs one file per stain (HPA 2018 layout); {data_dir} is "
                       "Zero-to-GANs RGB: use --channels rgb")
    # bad rows are left out as `train --skip-bad` leaves them out; without it, training stops on them anyway
    items = read_items(data_dir, fmt, "train", skip_bad=True, channels=channels)
    folder = cache_dir(data_dir, channels, size, cache)
    logger.info(f"cache folder {folder} ({derived_dir(data_dir, cache)[1]})")
    _writable_cache_dir(folder, data_dir)
    tasks = [(key, cached_file(folder, image_id), channels, size) for image_id, key in zip(items["id"], items["key"])]
    todo = [t for t in tasks if not is_cached(t[1], t[0], channels, size)]
    if todo:
        logger.info(f"caching {len(todo)} of {len(tasks)} images of {data_dir} ({channels}, {size}px) in {folder}"
            + (f" ({len(tasks) - len(todo)} already cached)" if len(todo) < len(tasks) else ""))
    else:
        logger.info(f"all {len(tasks)} images of {data_dir} are already cached in {folder}")
    workers = bound_workers(workers, len(todo), available_cores())
    if workers == 1:
        errors = [_cache_one(t) for t in todo]
    else:
        # one process per core: decoding and resizing are CPU-bound, and each image is independent
        with ProcessPoolExecutor(workers) as pool:
            errors = list(pool.map(_cache_one, todo, chunksize=max(1, min(32, len(todo) // (4 * workers)))))
    bad = [msg for msg in errors if msg]
    if bad:
        logger.info(f"skipped {len(bad)} unreadable image(s):")
        for msg in bad:
            logger.info(f"  {msg}")
    write_json(folder / CACHE_JSON, {"size": size, "channels": channels, "count": len(tasks) - len(bad),
                                     "format": fmt.name, "layout": "uint8 (channels, height, width), one .npy per id"})
    logger.info(f"cache ready: {len(tasks) - len(bad)} images in {folder}; training at --size {size} --channels "
        f"{channels} reads it from now on")
    return folder


def cached_items(items: pd.DataFrame, channels: str, size: int, cache=None) -> pd.DataFrame:
    """``items`` with keys switched to their cached .npy files, folder by folder (``--data`` and
    each ``--extra-data``): a folder's images switch when its cache for (channels, size) holds an
    up-to-date copy of every one of them; otherwise they are decoded as before, with a note.
    ``cache``: the ``--cache`` flag, as ``preprocess`` took it."""
    keys = items["key"].to_numpy(dtype=object).copy()
    data_dirs = [os.path.dirname(os.path.dirname(key)) for key in keys]  # keys are <data>/train/<file>
    for data_dir in dict.fromkeys(data_dirs):
        rows = [i for i, d in enumerate(data_dirs) if d == data_dir]
        paths = _cached_paths(Path(data_dir), items["id"].iloc[rows], keys[rows], channels, size, cache)
        if paths is not None:
            keys[rows] = [str(p) for p in paths]
    return items.assign(key=keys)


def _cached_paths(data_dir: Path, ids, keys, channels: str, size: int, cache=None) -> list[Path] | None:
    folders = _cache_dirs_to_read(data_dir, channels, size, cache)
    # the first that has an index (a link or a FIFO in its place counts: it is reported, never followed)
    folder = next((f for f in folders if os.path.lexists(f / CACHE_JSON)), folders[0])
    cache_flag = f" --cache {cache}" if cache is not None else ""
    update = (f"update it with: hpa-fastai preprocess --data {data_dir} --size {size} --channels {channels}"
              f"{cache_flag}")
    try:
        meta = read_json(folder / CACHE_JSON, "cache index", missing=None)
    except HPAError as e:
        logger.info(f"note: {e}; decoding the originals instead ({update})")
        return None
    if meta is None:  # no cache of this size and channels
        return None
    if not (isinstance(meta, dict) and meta.get("size") == size and meta.get("channels") == channels):
        logger.info(f"note: {folder / CACHE_JSON} does not describe a cache of {channels} images at {size} px; "
                    f"decoding the originals instead ({update})")
        return None
    try:
        present = set(os.listdir(folder))
    except OSError:
        return None
    paths = [cached_file(folder, image_id) for image_id in ids]
    problem, detail = None, ""
    if missing := sum(p.name not in present for p in paths):
        problem = f"lacks {missing}"
    elif bad := [msg for p in paths if (msg := entry_problem(p, channels, size))]:
        problem, detail = f"has {len(bad)} unusable", f" ({'first: ' if len(bad) > 1 else ''}{bad[0]})"
    else:  # a source changed after caching (a re-download, a regenerated set) makes its copy stale
        try:
            stale = sum(p.lstat().st_mtime < _newest_source(key, channels) for p, key in zip(paths, keys))
        except OSError:
            return None
        if stale:
            problem = f"has {stale} out-of-date"
    if problem:
        logger.info(f"note: the cache {folder} {problem} of {len(paths)} images{detail}; decoding the originals "
                    f"instead ({update})")
        return None
    logger.info(f"reading {len(paths)} images from the preprocessed cache {folder}")
    return paths
