"""Images in, batches out: decoding of RGB and per-stain files, the DataBlock and its splitters."""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
import torch
from fastai.data.block import DataBlock, MultiCategoryBlock, TransformBlock
from fastai.data.transforms import ColReader, IndexSplitter, IntToFloatTensor, Normalize, RandomSplitter
from fastai.torch_core import TensorImage
from fastai.vision.augment import aug_transforms
from PIL import Image, UnidentifiedImageError

from .errors import HPAError
from .formats import CHANNEL_SETS, key_files

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


class ReadImage:
    """Item transform: item key -> TensorImage (C, H, W) uint8. Module-level so learners pickle."""

    def __init__(self, channels: str = "rgb", size: int | None = None):
        self.channels, self.size = channels, size

    def __call__(self, key) -> TensorImage:
        arr = read_image(str(key), CHANNEL_SETS[self.channels], self.size)
        return TensorImage(torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))))


def ImageTensorBlock(channels: str = "rgb", size: int | None = None) -> TransformBlock:
    """Like fastai's ImageBlock, but for any number of stains (ImageBlock is RGB only)."""
    return TransformBlock(type_tfms=ReadImage(channels, size), batch_tfms=IntToFloatTensor)


def default_workers(cuda: bool) -> int:
    """DataLoader worker processes: on a GPU, decoding must keep up (up to 8); on CPU the model
    needs the cores and worker start-up costs more than it saves on small sets."""
    return min(8, os.cpu_count() or 1) if cuda else 0


# Each worker is a forked copy of the process: far more of them than cores only costs memory and
# start-up time, and a mistyped --workers 640 could exhaust memory or the process table.
MAX_WORKERS = 64


def check_workers(workers, flag: str = "--workers") -> None:
    """Refuse a worker count outside 0..MAX_WORKERS, before any data is read."""
    if workers is None:
        return
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise HPAError(f"{flag} must be 0 or more (got {workers!r:.40})")
    if workers > MAX_WORKERS:
        raise HPAError(f"{flag} must be at most {MAX_WORKERS} (got {workers})")


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may run on (containers, taskset)
    except AttributeError:
        return os.cpu_count() or 1


def bound_workers(workers: int | None, n_items: int, default: int, log=None) -> int:
    """The worker processes to start for ``n_items`` images: ``workers``, or ``default`` when it is
    None, but at most one per available core and one per image. Every command that takes
    ``--workers`` (train, cv, predict, evaluate, preprocess) goes through here; an explicit value
    that is lowered gets a note in ``log``."""
    check_workers(workers)
    want = default if workers is None else workers
    cap = max(1, min(available_cores(), n_items))
    if want <= cap:
        return want
    if workers is not None and log is not None:
        log(f"note: --workers {workers} lowered to {cap} (at most one per CPU core and one per image)")
    return cap


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


def augmentations(size: int, max_rotate: float = 10.0, max_lighting: float = 0.1) -> list:
    """Augmentations that suit microscopy: cells have no up or down, so all eight dihedral
    orientations, small rotations, brightness and contrast; no warp or colour shifts."""
    tfms = aug_transforms(do_flip=True, flip_vert=True, max_rotate=max_rotate, max_zoom=1.0,
                          max_lighting=max_lighting, max_warp=0.0, pad_mode="reflection", size=None)
    for tfm in tfms:
        # training batches only: fastai's affine transform otherwise resamples every validation and
        # test batch through an identity warp, which costs time and changes pixels by float rounding
        tfm.split_idx = 0
    return tfms


def stratified_valid_idx(labels: pd.Series, n_classes: int, n_folds: int, fold: int, seed: int,
                         groups=None) -> np.ndarray:
    """Validation rows of fold ``fold`` of a multi-label stratified K-fold (iterative stratification).

    With ``groups`` (one name per row) whole groups are dealt to the folds, stratified on the
    union of each group's labels, so near-duplicates never sit on both sides.
    """
    y = labels_matrix(labels, n_classes)
    if groups is not None:
        codes, names = pd.factorize(np.asarray(groups, dtype=object))
        group_y = np.zeros((len(names), n_classes), np.uint8)
        np.maximum.at(group_y, codes, y)
        valid_groups = _stratified_fold(group_y, n_folds, fold, seed)
        return np.flatnonzero(np.isin(codes, valid_groups))
    return _stratified_fold(y, n_folds, fold, seed)


def _stratified_fold(y: np.ndarray, n_folds: int, fold: int, seed: int) -> np.ndarray:
    from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

    if n_folds > len(y):  # sklearn's ValueError otherwise
        raise HPAError(f"--n-folds {n_folds} is more than the {len(y)} images (or near-duplicate groups) to split")
    kfold = MultilabelStratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for k, (_, valid) in enumerate(kfold.split(np.zeros(len(y)), y)):
        if k == fold:
            return valid
    raise HPAError(f"--fold {fold} is out of range for --n-folds {n_folds}")


def grouped_valid_idx(groups, valid_pct: float, seed: int) -> np.ndarray:
    """A random split by whole groups: shuffled groups go to validation until ``valid_pct`` of the
    rows (at least one group) are there."""
    codes, names = pd.factorize(np.asarray(groups, dtype=object))
    order = np.random.default_rng(seed).permutation(len(names))
    filled = np.cumsum(np.bincount(codes, minlength=len(names))[order])
    n_valid = max(int(valid_pct * len(codes)), int(filled[0]))
    if n_valid >= len(codes):
        raise HPAError("duplicates.csv puts every image in one near-duplicate group: no split can keep it whole")
    return np.flatnonzero(np.isin(codes, order[filled <= n_valid]))


def labels_matrix(labels: pd.Series, n_classes: int) -> np.ndarray:
    y = np.zeros((len(labels), n_classes), np.uint8)
    for i, text in enumerate(labels):
        y[i, [int(t) for t in text.split()]] = 1
    return y


def make_splitter(df: pd.DataFrame, n_classes: int, valid_pct: float, seed: int,
                  n_folds: int = 0, fold: int = 0):
    """Random or stratified K-fold split; a ``group`` column (near-duplicates, from the data
    folder's duplicates.csv) keeps each group on one side."""
    groups = df["group"].to_numpy() if "group" in df.columns else None
    if n_folds and n_folds > 1:
        return IndexSplitter(stratified_valid_idx(df["labels"], n_classes, n_folds, fold, seed, groups))
    if groups is not None:
        return IndexSplitter(grouped_valid_idx(groups, valid_pct, seed))
    return RandomSplitter(valid_pct=valid_pct, seed=seed)


def make_datablock(vocab, channels: str, size: int, mean, std, splitter, augment: bool = True) -> DataBlock:
    return DataBlock(
        blocks=(ImageTensorBlock(channels, size), MultiCategoryBlock(vocab=vocab)),
        get_x=ColReader("key"),
        get_y=ColReader("labels", label_delim=" "),
        splitter=splitter,
        batch_tfms=[*(augmentations(size) if augment else []), Normalize.from_stats(mean, std)],
    )


def make_dls(df: pd.DataFrame, vocab, channels: str, size: int, mean, std, splitter, bs: int,
             workers: int = 0, seed: int | None = None, device=None, augment: bool = True):
    dblock = make_datablock(vocab, channels, size, mean, std, splitter, augment)
    if seed is not None:
        from fastai.torch_core import set_seed
        set_seed(seed, reproducible=True)
    return dblock.dataloaders(df, bs=bs, num_workers=workers, device=device,
                              pin_memory=torch.cuda.is_available())
