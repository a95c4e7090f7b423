"""Shared fixtures: tiny data sets written in each competition's exact layout, and the real HPA data.

``make_z2g(n=..., size=...)`` and ``make_hpa2018(n=..., size=...)`` write a competition folder
(train.csv + train/) under the test's tmp_path and return its path; ``hpa_real`` is the read-only
folder of real HPA data, or a skip when this machine does not have it.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
STAINS = ("red", "green", "blue", "yellow")
# Distinct constant value per stain, so a test can tell which file ended up in which channel.
STAIN_VALUES = {"red": 10, "green": 20, "blue": 30, "yellow": 40}
N_CLASSES = {"z2g": 10, "hpa2018": 28}


def hpa_real_dir() -> Path:
    """../shared/hpa_real next to the repository, or $HPA_REAL."""
    return Path(os.environ.get("HPA_REAL") or REPO.parent / "shared" / "hpa_real")


def write_png(path, array) -> Path:
    """Save a uint8 array as PNG: (H, W) grayscale, (H, W, 3) RGB, (H, W, 4) RGBA; uint16 (H, W) as 16-bit."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array)).save(path, format="PNG")
    return path


def write_train_csv(data_dir, header: str, rows) -> Path:
    """train.csv from a header line and (id, labels) pairs."""
    path = Path(data_dir) / "train.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + "\n" + "".join(f"{image_id},{labels}\n" for image_id, labels in rows))
    return path


def default_labels(n: int, n_classes: int) -> list[str]:
    """One or two labels per image, cycling through the vocabulary."""
    return [f"{i % n_classes}" if i % 3 else f"{i % n_classes} {(i + 5) % n_classes}" for i in range(n)]


def random_channel(rng, size: int, channel: int) -> np.ndarray:
    """Random uint8 pixels in 0..255 - 60 * channel: each channel has its own mean and std."""
    return rng.integers(0, 256 - 60 * channel, (size, size), dtype=np.uint8)


def _labels(n, labels, n_classes):
    labels = default_labels(n, n_classes) if labels is None else list(labels)
    if len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} images")
    return labels


def write_z2g(data_dir, n: int = 8, size: int = 16, labels=None, value=None, seed: int = 0) -> Path:
    """A Zero-to-GANs folder: train.csv (Image,Label) and train/{Image}.png RGB.

    Pixels are random (each channel with its own range, so per-channel statistics differ) unless
    ``value`` gives a constant (r, g, b). Ids are img0, img1, ...
    """
    data_dir = Path(data_dir)
    rng = np.random.default_rng(seed)
    labels = _labels(n, labels, N_CLASSES["z2g"])
    ids = [f"img{i}" for i in range(n)]
    for image_id in ids:
        if value is None:
            pixels = np.stack([random_channel(rng, size, c) for c in range(3)], axis=-1)
        else:
            pixels = np.broadcast_to(np.asarray(value, np.uint8), (size, size, 3))
        write_png(data_dir / "train" / f"{image_id}.png", pixels)
    write_train_csv(data_dir, "Image,Label", zip(ids, labels))
    return data_dir


def write_hpa2018(data_dir, n: int = 8, size: int = 16, labels=None, values=None, seed: int = 0,
                  stains=STAINS) -> Path:
    """An HPA 2018 folder: train.csv (Id,Target) and train/{Id}_{red,green,blue,yellow}.png grayscale.

    Pixels are random unless ``values`` maps stain -> constant (e.g. ``STAIN_VALUES``). Ids look
    like the competition's (uuid-like, with hyphens): id-0000, id-0001, ...
    """
    data_dir = Path(data_dir)
    rng = np.random.default_rng(seed)
    labels = _labels(n, labels, N_CLASSES["hpa2018"])
    ids = [f"id-{i:04d}" for i in range(n)]
    for image_id in ids:
        for stain in stains:
            if values is None:
                pixels = random_channel(rng, size, STAINS.index(stain))
            else:
                pixels = np.full((size, size), values[stain], np.uint8)
            write_png(data_dir / "train" / f"{image_id}_{stain}.png", pixels)
    write_train_csv(data_dir, "Id,Target", zip(ids, labels))
    return data_dir


# Ten colours far apart in RGB (corners and edge midpoints of the cube): one per Zero-to-GANs
# class, so that a model that learns at all tells them apart whatever the augmentation's
# +-10% brightness and contrast do.
CLASS_COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255),
                 (255, 255, 255), (0, 0, 0), (128, 0, 0), (0, 128, 0)]


def write_colour_classes(data_dir, per_class: int = 16, size: int = 32, seed: int = 0) -> Path:
    """A Zero-to-GANs folder where each image has one label and shows its class's colour under
    strong pixel noise: easy to learn, impossible to score well on without learning."""
    data_dir = Path(data_dir)
    rng = np.random.default_rng(seed)
    labels = [c for c in range(len(CLASS_COLOURS)) for _ in range(per_class)]
    ids = [f"img{i}" for i in range(len(labels))]
    for image_id, c in zip(ids, labels):
        noise = rng.normal(0, 40, (size, size, 3))
        pixels = np.clip(np.asarray(CLASS_COLOURS[c], float) * 0.7 + 38 + noise, 0, 255).astype(np.uint8)
        write_png(data_dir / "train" / f"{image_id}.png", pixels)
    write_train_csv(data_dir, "Image,Label", zip(ids, map(str, labels)))
    return data_dir


@pytest.fixture
def make_z2g(tmp_path):
    """Factory: ``make_z2g(n=8, size=16, labels=None, value=None, seed=0, name='z2g')`` -> data folder."""
    def make(n: int = 8, size: int = 16, labels=None, value=None, seed: int = 0, name: str = "z2g") -> Path:
        return write_z2g(tmp_path / name, n, size, labels, value, seed)
    return make


@pytest.fixture
def make_hpa2018(tmp_path):
    """Factory: ``make_hpa2018(n=8, size=16, labels=None, values=None, seed=0, name='hpa2018')`` -> data folder."""
    def make(n: int = 8, size: int = 16, labels=None, values=None, seed: int = 0, name: str = "hpa2018",
             stains=STAINS) -> Path:
        return write_hpa2018(tmp_path / name, n, size, labels, values, seed, stains)
    return make


@pytest.fixture
def make_data(make_z2g, make_hpa2018):
    """Factory by format name: ``make_data('z2g' | 'hpa2018', **kwargs)``."""
    return lambda fmt, **kwargs: {"z2g": make_z2g, "hpa2018": make_hpa2018}[fmt](**kwargs)


@pytest.fixture(scope="session")
def hpa_real() -> Path:
    """The real HPA data folder (read-only), or skip: a user's machine does not have it."""
    path = hpa_real_dir()
    if not path.is_dir():
        pytest.skip(f"../shared/hpa_real not found ({path}); set HPA_REAL to the real-data folder to run this test")
    return path


@pytest.fixture(autouse=True)
def console_logging():
    """The package's log records on the console, as the command line shows them, also for library
    calls made in-process (tests read them with capsys)."""
    from hpa_fastai.console import attach_logging

    attach_logging()


@pytest.fixture(autouse=True, scope="session")
def user_cache_folder(tmp_path_factory):
    """The user's cache folder (where start-up remembers what it checked of each data set) in the
    session's temporary folder, for this process and the commands it starts: tests leave ~/.cache
    alone."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("user-cache")))
        yield
