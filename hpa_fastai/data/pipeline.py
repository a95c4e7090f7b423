"""The one data pipeline, for training and for prediction: item key -> uint8 tensor (decoded and
resized once), batched, augmented (training batches only) and normalised on the batch; the
DataBlock that training uses and the DataLoader that prediction uses share these transforms."""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
import torch
from fastai.data.block import DataBlock, MultiCategoryBlock, TransformBlock
from fastai.data.core import Datasets, TfmdDL
from fastai.data.transforms import ColReader, IntToFloatTensor, Normalize
from fastai.torch_core import TensorImage
from fastai.vision.augment import aug_transforms

from ..config import MAX_WORKERS
from ..errors import HPAError
from .images import read_image
from .layouts import CHANNEL_SETS


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


def check_workers(workers, flag: str = "--workers") -> None:
    """Refuse a worker count outside 0..MAX_WORKERS (for callers that bypass the config's checks):
    each worker is a forked copy of the process, and a mistyped 640 could exhaust memory."""
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


def make_datablock(vocab, channels: str, size: int, mean, std, splitter, augment: bool = True) -> DataBlock:
    """Training data: images (``ImageTensorBlock``) and their labels, augmented then normalised."""
    return DataBlock(
        blocks=(ImageTensorBlock(channels, size), MultiCategoryBlock(vocab=vocab)),
        get_x=ColReader("key"),
        get_y=ColReader("labels", label_delim=" "),
        splitter=splitter,
        batch_tfms=[*(augmentations(size) if augment else []), Normalize.from_stats(mean, std)],
    )


def predict_dl(items: pd.DataFrame, channels: str, size: int, mean, std, bs: int = 32, workers: int = 0,
               device=None) -> TfmdDL:
    """Batches of ``items`` (a frame with a ``key`` column), in order, through the same image block
    and normalisation as ``make_datablock``'s, without labels or augmentation: what a model
    exported as weights plus model.json predicts on (a pickled learner has its own ``test_dl``)."""
    block = ImageTensorBlock(channels, size)
    dsets = Datasets(items[["key"]].reset_index(drop=True), tfms=[[ColReader("key"), *block.type_tfms]])
    return TfmdDL(dsets, bs=bs, num_workers=workers, device=device, shuffle=False, drop_last=False,
                  after_batch=[*block.batch_tfms, Normalize.from_stats(mean, std)])


def make_dls(df: pd.DataFrame, vocab, channels: str, size: int, mean, std, splitter, bs: int,
             workers: int = 0, seed: int | None = None, device=None, augment: bool = True,
             oversample_cap: float | None = None):
    """The training and validation DataLoaders; with ``oversample_cap``, the training images are
    drawn with ``sampling.oversampling_weights`` (weights from the training split's own labels)."""
    dblock = make_datablock(vocab, channels, size, mean, std, splitter, augment)
    if seed is not None:
        from fastai.torch_core import set_seed
        set_seed(seed, reproducible=True)
    kwargs = dict(bs=bs, num_workers=workers, device=device, pin_memory=torch.cuda.is_available())
    if oversample_cap is None:
        return dblock.dataloaders(df, **kwargs)
    import fastai.callback.data  # noqa: F401  (adds Datasets.weighted_dataloaders)

    from .sampling import oversampling_weights

    dsets = dblock.datasets(df)
    weights = oversampling_weights(df["labels"].iloc[dsets.splits[0]], len(vocab), oversample_cap)
    return dsets.weighted_dataloaders(weights, after_item=dblock.item_tfms, after_batch=dblock.batch_tfms, **kwargs)
