"""Decoding images: RGB files, one file per stain (grayscale, or the stain in its colour as the
Atlas serves HPAv18 images), and the preprocessed cache's arrays; checking that images can be
read; the statistics of a data set's channels."""
from __future__ import annotations

import errno
import os
import stat
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from ..config import MAX_SIZE
from ..errors import HPAError
from .layouts import CHANNEL_SETS, key_files

# Decoding a truncated PNG raises any of these inside PIL.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError)


def _open(path: str, want_mode: str, stain: str | None = None) -> Image.Image:
    """The image at ``path``, its header read and its mode checked; nothing decoded yet. A stain
    file (``stain`` given, ``want_mode`` "L") may also be an RGB image of that stain in its colour,
    as the Atlas serves them."""
    try:
        im = Image.open(path)
    except FileNotFoundError:
        raise HPAError(f"{path}: image file not found") from None
    except _DECODE_ERRORS as e:
        raise HPAError(f"{path}: not a readable image ({e})") from None
    if im.mode != want_mode and not (stain is not None and im.mode == "RGB"):
        what = {"L": "8-bit grayscale or RGB colour (one stain per file)", "RGB": "8-bit RGB"}[want_mode]
        im.close()
        raise HPAError(f"{path}: image mode is {im.mode} ({len(im.getbands())} channel(s)), expected {what}")
    return im


def _check_header(path: str, im: Image.Image, stain: str | None) -> None:
    """The quick check of an opened image before training: the full decode comes only when the
    image is used, and a cut-off download or a wrong colour file would otherwise stop an epoch."""
    if im.format == "PNG" and not _png_complete(path):
        raise HPAError(f"{path}: truncated image (the PNG has no end chunk)")
    if stain is not None and im.mode == "RGB":
        _check_colour_stain(path, stain, None)


def _decode(path: str, im: Image.Image, stain: str | None, size: int | None = None) -> Image.Image:
    """Decode an opened image; a colour stain file becomes its stain's band. With ``size``, a JPEG
    decodes at the smallest of 1/2, 1/4, 1/8 of its side that is still at least ``size`` (PIL's
    draft mode, a scaled inverse DCT): a 2048 px Atlas JPEG read at 512 px costs a tenth."""
    if size is not None and im.format == "JPEG":
        im.draft(im.mode, (size, size))
    try:
        im.load()
    except _DECODE_ERRORS as e:
        raise HPAError(f"{path}: truncated or corrupt image ({e})") from None
    if stain is not None and im.mode == "RGB":
        _check_colour_stain(path, stain, im)
        return stain_band(im, stain)
    return im


def read_stain(path: str, stain: str, size: int | None = None) -> Image.Image:
    """One stain file decoded to 8-bit grayscale: a grayscale file as it is, a colour file (HPAv18
    ``{Id}_{stain}.jpg``) as the band that carries its stain, after checking it is one. ``size``
    only lets a JPEG decode smaller (see ``_decode``); the caller resizes."""
    return _decode(path, _open(path, "L", stain), stain, size)


# How the Human Protein Atlas draws each stain in its colour images: red in the R band, green in
# G, blue in B, yellow in R and G alike. Writing the real grayscale stains of the Kaggle sample as
# such JPEGs and reading them back (bench/hpav18.py), these bands (yellow: the mean of R and
# G) come closest to the original of all bands; PIL's convert("L"), which most 2018 download
# scripts used, scales blue to 11% and red to 30% of its value. The full-resolution luma divided
# by the colour's weight in it does better where the JPEG subsamples chroma and worse where it
# does not; with the Atlas's encoder settings unknown here, the bands the 2018 teams used stay.
STAIN_COLOURS = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1), "yellow": (1, 1, 0)}
# A colour stain file's share of intensity outside its stain's colour, above which it is not that
# stain. Real stains written as JPEGs (quality 30 to 95, with and without chroma subsampling) stay
# at or below 0.34 (dim images, where JPEG noise in the empty bands is largest); a stain drawn in
# another stain's colour is at 0.42 or more (bench/hpav18.py).
MAX_OFF_COLOUR = 0.4
# Below this spread between the bands a colour file is gray (R = G = B: a grayscale image saved as
# RGB, as OpenCV writes one) and holds the stain in every band. Gray JPEGs measure 0.000.
MAX_GRAY_SPREAD = 0.05
_CHECK_SIDE = 128  # the colour check looks at the image box-reduced to about this side


def stain_band(im: Image.Image, stain: str) -> Image.Image:
    """The stain's intensity in a colour image of it, as an 8-bit grayscale image."""
    if stain == "yellow":
        r, g = (np.asarray(im.getchannel(b), np.uint16) for b in "RG")
        return Image.fromarray(((r + g + 1) // 2).astype(np.uint8))
    return im.getchannel("RGB"[STAIN_COLOURS[stain].index(1)])


def colour_shares(pixels: np.ndarray, stain: str) -> tuple[float, float]:
    """For (..., 3) RGB pixels: the share of their intensity outside ``stain``'s colour (the length of
    what is left after projecting each pixel onto the colour, against that plus the stain's value;
    +0.5 keeps a black image at 0) and the mean spread between their bands against their brightest."""
    r, g, b = (np.asarray(pixels[..., i], np.float32) for i in range(3))
    if stain == "yellow":  # the colour (1, 1, 0): what is left is ((r - g) / 2, (g - r) / 2, b)
        on, off = (r + g) / 2, np.sqrt((r - g) ** 2 / 2 + b * b)
    else:
        on, rest = {"red": (r, (g, b)), "green": (g, (r, b)), "blue": (b, (r, g))}[stain]
        off = np.sqrt(rest[0] ** 2 + rest[1] ** 2)
    brightest = np.maximum(np.maximum(r, g), b)
    spread = (brightest - np.minimum(np.minimum(r, g), b)).mean() / (brightest.mean() + 0.5)
    off = off.mean()
    return float(off / (on.mean() + off + 0.5)), float(spread)


def colour_stain_shares(path: str, stain: str, decoded: Image.Image | None = None) -> tuple[float, float]:
    """``colour_shares`` of the colour image at ``path`` (already ``decoded``, or not), box-reduced
    to about 128 px. A JPEG is measured on the decode PIL's draft mode gives for 128 px (an eighth
    of the side of a 2048 px image, at a fraction of the work), whatever the caller decoded, so the
    quick check of every image before training and the full decode agree; when the caller's decode
    is that same draft (training at up to 256 px from 2048 px files) it is used rather than redone."""
    try:
        if decoded is not None and decoded.format != "JPEG":
            small = decoded
        else:
            with Image.open(path) as im:
                if im.format == "JPEG":
                    im.draft("RGB", (_CHECK_SIDE, _CHECK_SIDE))  # reads no pixels yet
                small = (decoded if decoded is not None and decoded.size == im.size else im).convert("RGB")
        small = small.reduce(max(1, max(small.size) // _CHECK_SIDE))
    except _DECODE_ERRORS as e:
        raise HPAError(f"{path}: truncated or corrupt image ({e})") from None
    return colour_shares(np.asarray(small), stain)


def _check_colour_stain(path: str, stain: str, decoded: Image.Image | None) -> None:
    """Refuse a colour file that does not show ``stain`` in its colour on black (nor is gray)."""
    off, spread = colour_stain_shares(path, stain, decoded)
    if off > MAX_OFF_COLOUR and spread > MAX_GRAY_SPREAD:
        raise HPAError(f"{path}: not a {stain} stain file: a colour image with {off:.0%} of its intensity "
                       f"outside the {stain} colour (a stain file is grayscale, or {stain} on black)")


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

    ``key`` is an image file, a ``{channel}`` template of per-stain files (each grayscale, or the
    stain in its colour), or a ``.npy`` of the preprocessed cache (see ``cache.py``). ``header_only``
    reads no pixels but a colour stain file's reduced decode, to check its colour."""
    if key.endswith(".npy"):
        return _read_cached(key, channels, size, header_only)
    files = key_files(key, channels)
    if len(files) == 1:
        if len(channels) != 3:
            raise HPAError(f"{key}: a 4-channel (RGBY) model needs one file per stain; this is a single RGB image")
        stains = [None]
        ims = [_open(files[0], "RGB")]
    else:
        stains = list(channels)
        ims = [_open(f, "L", stain) for f, stain in zip(files, stains)]
        if len({im.size for im in ims}) > 1:
            raise HPAError(f"{files[0]}: the channel files of this image differ in size "
                           f"({', '.join('x'.join(map(str, im.size)) for im in ims)})")
    if header_only:
        try:
            for path, im, stain in zip(files, ims, stains):
                _check_header(path, im, stain)
        finally:
            for im in ims:  # only the header was read: the file is still open
                im.close()
        width, height = ims[0].size
        return np.empty((height, width, len(channels)), np.uint8)
    ims = [_decode(path, im, stain, size) for path, im, stain in zip(files, ims, stains)]
    if size is not None and any(im.size != (size, size) for im in ims):
        if len(ims) in _MERGE_MODES and len({im.size for im in ims}) == 1:  # JPEG and PNG stains may decode
            ims = [Image.merge(_MERGE_MODES[len(ims)], ims)]                # to different draft sizes
        ims = [im.resize((size, size), Image.BILINEAR) for im in ims]
    arrays = [np.asarray(im) for im in ims]
    return arrays[0] if len(arrays) == 1 else np.stack(arrays, axis=-1)


def _read_cached(path: str, channels, size: int | None, header_only: bool) -> np.ndarray:
    """A cached (C, H, W) uint8 array as (H, W, C), resized like ``read_image`` if ``size`` differs."""
    if header_only:
        c, h, w = cached_array_shape(path, len(channels))
        return np.empty((h, w, c), np.uint8)
    arr = read_cached_array(path, len(channels))
    if size is not None and arr.shape[1:] != (size, size):
        bands = [Image.fromarray(band) for band in arr]
        if len(bands) in _MERGE_MODES:
            bands = [Image.merge(_MERGE_MODES[len(bands)], bands)]
        resized = [np.asarray(b.resize((size, size), Image.BILINEAR)) for b in bands]
        return resized[0] if len(resized) == 1 else np.stack(resized, axis=-1)
    return arr.transpose(1, 2, 0)


# A cache entry is opened without following a link (the cache writes none) and without blocking (a
# FIFO in its place would otherwise wait forever for a writer); only a regular file is read.
_CACHE_OPEN = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0)
_REDO = "run preprocess again to redo it"


def _open_cached(path: str, n_channels: int, side: int | None):
    """A cache entry opened and positioned after its .npy header, with the array's shape; checked as
    any file from outside before a byte of the array is allocated: a regular file, a version 1 or 2
    header of at most numpy's 10,000 bytes, uint8 in C order, shape (n_channels, H, W) with sides in
    1..MAX_SIZE (``side`` x ``side`` if given), and a file size of exactly the header and the pixels."""
    try:
        fd = os.open(path, _CACHE_OPEN)
    except FileNotFoundError:
        raise HPAError(f"{path}: cached image not found (run: hpa-fastai preprocess)") from None
    except OSError as e:  # ELOOP: the entry is a link
        what = "a link, not a file" if e.errno == errno.ELOOP else (e.strerror or str(e))
        raise HPAError(f"{path}: unreadable cached image ({what}); {_REDO}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # a folder, FIFO or device
            raise HPAError(f"{path}: unreadable cached image (not a regular file); {_REDO}")
    except BaseException:
        os.close(fd)
        raise
    f = os.fdopen(fd, "rb")
    try:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"a .npy format version {version[0]}.{version[1]}, not 1.0 or 2.0")
        # numpy tokenizes the header and parses it with ast.literal_eval: a forged one raises any of
        # ValueError, SyntaxError, tokenize.TokenError, RecursionError...; none of them is a bug here
        except Exception as e:
            reason = (str(e).splitlines() or [type(e).__name__])[0][:120]
            raise HPAError(f"{path}: unreadable cached image ({reason}); {_REDO}") from None
        want = f"({n_channels}, {side}, {side})" if side else f"({n_channels}, H, W)"
        shape_ok = (isinstance(shape, tuple) and len(shape) == 3 and shape[0] == n_channels
                    and all(isinstance(d, int) and 1 <= d <= MAX_SIZE for d in shape[1:])
                    and (side is None or shape[1:] == (side, side)))
        if dtype != np.uint8 or fortran_order or not shape_ok:
            order = " in Fortran order" if fortran_order else ""
            raise HPAError(f"{path}: cached array is {dtype} {shape!r:.60}{order}, expected uint8 {want}")
        expected = f.tell() + shape[0] * shape[1] * shape[2]
        if st.st_size != expected:
            raise HPAError(f"{path}: unreadable cached image ({st.st_size} bytes where its header calls for "
                           f"{expected}: cut off, or followed by other data); {_REDO}")
        return f, shape
    except BaseException:
        f.close()
        raise


def cached_array_shape(path: str, n_channels: int, side: int | None = None) -> tuple[int, int, int]:
    """The (C, H, W) shape of a cache entry, checked as ``_open_cached`` checks it; no pixels read."""
    f, shape = _open_cached(path, n_channels, side)
    f.close()
    return shape


def read_cached_array(path: str, n_channels: int, side: int | None = None) -> np.ndarray:
    """A cache entry's (C, H, W) uint8 array, read into a fresh, writable array (torch must not share a
    read-only memory map) of the size its checked header gives."""
    f, shape = _open_cached(path, n_channels, side)
    with f:
        arr = np.empty(shape, np.uint8)
        try:
            got = f.readinto(memoryview(arr).cast("B"))
        except OSError as e:
            raise HPAError(f"{path}: unreadable cached image ({e.strerror or e}); {_REDO}") from None
    if got != arr.nbytes:  # the file was cut while being read
        raise HPAError(f"{path}: unreadable cached image (cut off); {_REDO}")
    return arr


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

    keys = df["key"].tolist()
    # in chunks: a thread pool's bookkeeping per task costs more than checking one image's header
    chunks = [keys[i:i + 64] for i in range(0, len(keys), 64)]
    with ThreadPoolExecutor(workers) as pool:
        messages = [msg for part in pool.map(lambda chunk: [check(key) for key in chunk], chunks) for msg in part]
    return {key: msg for key, msg in zip(keys, messages) if msg}
