"""Decoding images: RGB files, one grayscale file per stain, and the preprocessed cache's arrays;
checking that images can be read; the statistics of a data set's channels."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from ..errors import HPAError
from .layouts import CHANNEL_SETS, key_files

# Decoding a truncated PNG raises any of these inside PIL.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError)


def _open(path: str, want_mode: str, header_only: bool):
    try:
        im = Image.open(path)
    except FileNotFoundError:
        raise HPAError(f"{path}: image file not found") from None
    except _DECODE_ERRORS as e:
        raise HPAError(f"{path}: not a readable image ({e})") from None
    if im.mode != want_mode:
        what = {"L": "8-bit grayscale (one stain per file)", "RGB": "8-bit RGB"}[want_mode]
        raise HPAError(f"{path}: image mode is {im.mode} ({len(im.getbands())} channel(s)), expected {what}")
    if not header_only:
        try:
            im.load()
        except _DECODE_ERRORS as e:
            raise HPAError(f"{path}: truncated or corrupt image ({e})") from None
    elif im.format == "PNG" and not _png_complete(path):
        # The header check runs over every image before training, the full decode only when the
        # image is used: a cut-off download would otherwise surface mid-epoch.
        raise HPAError(f"{path}: truncated image (the PNG has no end chunk)")
    return im


_PNG_END = b"IEND\xaeB`\x82"  # the end chunk's type and CRC, the last bytes of every complete PNG


def _png_complete(path: str) -> bool:
    """Whether the file ends with a PNG end chunk; reads 1 KiB (a little trailing data is allowed)."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(f.tell() - 1024, 0))
        return _PNG_END in f.read()


# Stains resized together as one multi-band PIL image: one pass instead of one per stain, and
# PIL resamples each band exactly as it would on its own (no alpha, so no premultiplication).
_MERGE_MODES = {3: "RGB", 4: "CMYK"}


def read_image(key: str, channels=CHANNEL_SETS["rgb"], size: int | None = None,
               header_only: bool = False) -> np.ndarray:
    """Decode one item as a uint8 array (H, W, C) with channels in ``channels`` order, resized to ``size``.

    ``key`` is an image file, a ``{channel}`` template of per-stain files, or a ``.npy`` of the
    preprocessed cache (see ``preprocess.py``)."""
    if key.endswith(".npy"):
        return _read_cached(key, channels, size, header_only)
    files = key_files(key, channels)
    if len(files) == 1:
        if len(channels) != 3:
            raise HPAError(f"{key}: a 4-channel (RGBY) model needs one file per stain; this is a single RGB image")
        ims = [_open(files[0], "RGB", header_only)]
    else:
        ims = [_open(f, "L", header_only) for f in files]
        if len({im.size for im in ims}) > 1:
            raise HPAError(f"{files[0]}: the channel files of this image differ in size "
                           f"({', '.join('x'.join(map(str, im.size)) for im in ims)})")
    if header_only:
        width, height = ims[0].size
        for im in ims:  # only the header was read: the file is still open
            im.close()
        return np.empty((height, width, len(channels)), np.uint8)
    if size is not None and ims[0].size != (size, size):
        if len(ims) in _MERGE_MODES:
            ims = [Image.merge(_MERGE_MODES[len(ims)], ims)]
        ims = [im.resize((size, size), Image.BILINEAR) for im in ims]
    arrays = [np.asarray(im) for im in ims]
    return arrays[0] if len(arrays) == 1 else np.stack(arrays, axis=-1)


def _read_cached(path: str, channels, size: int | None, header_only: bool) -> np.ndarray:
    """A cached (C, H, W) uint8 array as (H, W, C), resized like ``read_image`` if ``size`` differs."""
    try:
        # a memory map reads only the header; a full read copies the file once into a fresh,
        # writable array (torch must not share a read-only map), faster than mapping then copying
        arr = np.load(path, mmap_mode="r" if header_only else None, allow_pickle=False)
    except FileNotFoundError:
        raise HPAError(f"{path}: cached image not found (run: python run.py preprocess)") from None
    except (OSError, ValueError, EOFError) as e:
        raise HPAError(f"{path}: unreadable cached image ({e}); run preprocess again to redo it") from None
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[0] != len(channels):
        raise HPAError(f"{path}: cached array is {arr.dtype} {tuple(arr.shape)}, expected uint8 "
                       f"({len(channels)}, H, W)")
    if header_only:
        return np.empty((*arr.shape[1:], arr.shape[0]), np.uint8)
    if size is not None and arr.shape[1:] != (size, size):
        bands = [Image.fromarray(band) for band in arr]
        if len(bands) in _MERGE_MODES:
            bands = [Image.merge(_MERGE_MODES[len(bands)], bands)]
        resized = [np.asarray(b.resize((size, size), Image.BILINEAR)) for b in bands]
        return resized[0] if len(resized) == 1 else np.stack(resized, axis=-1)
    return arr.transpose(1, 2, 0)


def native_size(key: str, channels: str) -> int:
    h, w, _ = read_image(key, CHANNEL_SETS[channels], header_only=True).shape
    return max(h, w)


def channel_stats(keys, channels: str, size: int, n: int = 64, seed: int = 0) -> tuple[list, list]:
    """Per-channel mean and std (on the 0..1 scale) of a random sample of ``n`` training images."""
    rng = np.random.default_rng(seed)
    keys = list(keys)
    pick = rng.choice(len(keys), size=min(n, len(keys)), replace=False)
    total = np.zeros(len(CHANNEL_SETS[channels]))
    total_sq = np.zeros_like(total)
    count = 0
    for i in pick:
        arr = read_image(keys[i], CHANNEL_SETS[channels], size).reshape(-1, total.size) / 255.0
        total += arr.sum(0)
        total_sq += (arr ** 2).sum(0)
        count += arr.shape[0]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 0))
    return mean.round(6).tolist(), np.maximum(std, 1e-3).round(6).tolist()


def verify_images(df: pd.DataFrame, channels: str, deep: bool = False, workers: int = 8) -> dict[str, str]:
    """Open every image (``deep``: decode it fully); return {item key: message} for the unreadable ones."""
    def check(key):
        try:
            read_image(key, CHANNEL_SETS[channels], size=None, header_only=not deep)
            return None
        except HPAError as e:
            return str(e)

    with ThreadPoolExecutor(workers) as pool:
        return {key: msg for key, msg in zip(df["key"], pool.map(check, df["key"])) if msg}
