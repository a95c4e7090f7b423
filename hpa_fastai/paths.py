"""Where the project's own files are (the bundled sample, inside the package), and where the files
derived from a data set (the preprocessed cache, the near-duplicate list) go: into the data folder
when it is writable, else into a per-user cache folder of that data set, or under ``--cache`` /
``$HPA_FASTAI_CACHE`` when one is given."""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from .errors import HPAError

# package data: an installed wheel carries it (pyproject.toml's package-data), so does a checkout
SAMPLE_DIR = Path(__file__).resolve().parent / "sample"
CACHE_ENV = "HPA_FASTAI_CACHE"  # the --cache of every command that does not pass one


def resolve_data_dir(data) -> Path:
    """``--data`` as a Path; without it, the bundled sample."""
    if data is None:
        if not (SAMPLE_DIR / "train.csv").is_file():
            raise HPAError(f"no --data given and the bundled sample {SAMPLE_DIR} is missing from this installation; "
                           "reinstall hpa_fastai, or pass --data")
        return SAMPLE_DIR
    return Path(data)


def user_cache_dir() -> Path:
    """The per-user cache folder: ``$XDG_CACHE_HOME/hpa_fastai``, by default ``~/.cache/hpa_fastai``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hpa_fastai"


def cache_root(cache) -> Path | None:
    """The folder given by ``--cache`` or, without it, by ``$HPA_FASTAI_CACHE`` (None: neither)."""
    chosen = cache if cache is not None else os.environ.get(CACHE_ENV, "").strip() or None
    return None if chosen is None else Path(chosen).expanduser()


def writable(folder: Path) -> bool:
    """Whether files can be created in ``folder``. ``os.access`` asks the kernel, which also answers
    for a read-only mount (Kaggle's /kaggle/input), where root, who passes any permission check, is
    refused too."""
    return os.access(folder, os.W_OK | os.X_OK)


def data_set_key(data_dir: Path) -> str:
    """A folder name of its own for each data set: its folder's name and a hash of its absolute path,
    so two data sets never share a cache, whatever they are called."""
    absolute = str(Path(data_dir).resolve())
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(absolute).name).strip("._")[:40] or "data"
    return f"{name}-{hashlib.sha256(absolute.encode()).hexdigest()[:16]}"


def derived_dir(data_dir, cache=None) -> tuple[Path, str]:
    """Where the files derived from ``data_dir`` go, and why there (for the log): the data folder
    itself when it is writable and no ``--cache`` / ``$HPA_FASTAI_CACHE`` is given, else a folder
    of that data set's own under the one given or under the per-user cache. The bundled sample counts
    as read-only: an installed package's folder is no place for a cache."""
    data_dir = Path(data_dir)
    root = cache_root(cache)
    if root is not None:
        source = "--cache" if cache is not None else f"${CACHE_ENV}"
        return root / data_set_key(data_dir), f"{source} {root}"
    if data_dir.resolve() != SAMPLE_DIR and writable(data_dir):
        return data_dir, "the data folder"
    why = "the bundled sample" if data_dir.resolve() == SAMPLE_DIR else f"{data_dir} is read-only"
    return user_cache_dir() / data_set_key(data_dir), (f"{why}: the per-user cache; --cache DIR or ${CACHE_ENV} "
                                                       "puts it elsewhere")
