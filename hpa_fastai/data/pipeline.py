"""The one data pipeline, for training and for prediction: item key -> uint8 tensor (decoded and
resized once), batched, augmented (training batches only) and normalised on the batch; the
DataBlock that training uses and the DataLoader that prediction uses share these transforms."""
from __future__ import annotations

import functools
import logging
import os
import random

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from fastai.callback.data import WeightedDL
from fastai.data.block import DataBlock, MultiCategoryBlock, TransformBlock
from fastai.data.core import Datasets, TfmdDL
from fastai.data.load import _loaders
from fastai.data.transforms import ColReader, IntToFloatTensor, Normalize
from fastai.torch_core import TensorImage, show_image, to_device
from fastai.vision import augment as fastai_augment
from fastai.vision.augment import AffineCoordTfm, aug_transforms

from ..config import MAX_WORKERS, TrainConfig, check_field
from .images import read_image
from .layouts import CHANNEL_SETS, key_for_path


logger = logging.getLogger(__name__)

class TensorRGBY(TensorImage):
    """A four-stain image. fastai shows a TensorImage by handing its channels to matplotlib, which
    reads a fourth channel as transparency; ``show`` (and so ``show_batch``, ``show_results`` and
    ``Interpretation.plot_top_losses``) draws it in false colour instead, yellow as red + green, as
    the Human Protein Atlas does. Transforms keep the type, so batches carry it through."""

    def show(self, ctx=None, **kwargs):
        return show_image(false_colour_tensor(self), ctx=ctx, **{**self._show_args, **kwargs})


def false_colour_tensor(x: torch.Tensor) -> torch.Tensor:
    """(4, H, W) RGBY as (3, H, W) RGB, on the tensor's own scale (0..1 floats or 0..255 integers)."""
    x = x.as_subclass(torch.Tensor)
    top = 255 if not x.is_floating_point() or x.max() > 1 else 1
    r, g, b, y = x.float()
    return torch.stack([r + y / 2, g + y / 2, b]).clamp(0, top).to(x.dtype)


class ReadImage:
    """Item transform: item key -> TensorImage (C, H, W) uint8 (TensorRGBY for four stains).
    Module-level so learners pickle. A path that is not a key (one stain file of an HPA image, or
    its ``{id}`` prefix) is read as its image, so that ``learn.predict(path)`` works."""

    def __init__(self, channels: str = "rgb", size: int | None = None):
        self.channels, self.size = channels, size

    def __call__(self, key) -> TensorImage:
        arr = read_image(key_for_path(key, self.channels), CHANNEL_SETS[self.channels], self.size)
        tensor_type = TensorRGBY if self.channels == "rgby" else TensorImage
        return tensor_type(torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))))


class NonBlockingDL(TfmdDL):
    """fastai's ``TfmdDL`` with two changes to its ``DataLoader.__iter__`` (fastai 2.8.12), the one
    place that relies on fastai's private names (``_loaders``, the epoch's index list ``__idxs``):

    - A batch in pinned memory is copied to the GPU with ``non_blocking=True``. fastai copies with a
      blocking ``.to(device)``: the GPU starts the copy only after the kernels already queued (the
      previous step's), and the host waits for it instead of queueing the batch's augmentation.
    - With ``persistent_workers=True`` (the training and validation loaders), the worker processes
      live as long as the loader. fastai hands each worker the epoch's index list when it starts
      them, so it starts them afresh every epoch (``persistent_workers`` has no effect on it): 1.0 to
      1.5 s per epoch and loader with 16 workers at 512 px on an H100. Here they are torch's own
      persistent workers, sent one batch of indices at a time from the main process (torch's
      ``DataLoader`` over a batch sampler that reads ``__idxs``), so each epoch keeps the order
      and oversampling draws that the main process made for it, as before. ``close()`` ends them.
    """

    def __iter__(self):
        self.randomize()
        self.before_iter()
        self._DataLoader__idxs = self.get_idxs()  # in the main process, before workers see it
        if self.fake_l.num_workers > 0 and self.fake_l.persistent_workers:
            batches = self._persistent_batches()
        else:
            batches = _loaders[self.fake_l.num_workers == 0](self.fake_l)
        for b in batches:
            if self.pin_memory and type(b) == list:  # pinning turns tuples into lists
                b = tuple(b)
            if self.device is not None:
                b = to_device(b, self.device, non_blocking=self.pin_memory)
            yield self.after_batch(b)
        self.after_iter()
        if hasattr(self, "it"):
            del self.it

    def _persistent_batches(self):
        loader = getattr(self, "_workers", None)
        if loader is None:
            loader = self._workers = torch.utils.data.DataLoader(
                _Items(self), batch_sampler=_EpochBatches(self), collate_fn=_Collate(self),
                num_workers=self.fake_l.num_workers, pin_memory=self.pin_memory, timeout=self.fake_l.timeout,
                worker_init_fn=_init_worker, persistent_workers=True)
        elif loader._iterator is not None:
            # Starting the workers' iterator draws their base seed from torch's global generator, as
            # fastai's fresh workers did every epoch; batch augmentation draws from the same stream.
            # One draw per epoch keeps that stream, and so --resume (which restores it), as before.
            torch.empty((), dtype=torch.int64).random_()
        return iter(loader)

    def close(self) -> None:
        """End the persistent worker processes (the next epoch would start new ones)."""
        loader, self._workers = getattr(self, "_workers", None), None
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None:
            # the iterator and this loader refer to each other: garbage collection would end the
            # workers only at its next cycle collection, so they are ended here
            iterator._shutdown_workers()

    def __getstate__(self):
        # the worker processes, their queues and threads stay with this process (spawned workers
        # and pickled learners get the loader without them)
        return {k: v for k, v in self.__dict__.items() if k != "_workers"}


class _Items(torch.utils.data.Dataset):
    """A fastai loader's items as torch's map-style dataset, for its worker processes: item ``i``
    decoded and transformed as fastai's own workers would (``do_item``)."""

    def __init__(self, dl):
        self.dl = dl

    def __len__(self):
        return self.dl.n

    def __getitem__(self, i):
        return self.dl.do_item(i)


class _EpochBatches:
    """torch's batch sampler over the current epoch's indices, read each time an epoch starts."""

    def __init__(self, dl):
        self.dl = dl

    def __iter__(self):
        idxs, bs = self.dl._DataLoader__idxs, self.dl.bs
        stop = len(idxs) - len(idxs) % bs if self.dl.drop_last else len(idxs)
        return (idxs[i:i + bs] for i in range(0, stop, bs))

    def __len__(self):
        return len(self.dl)


class _Collate:
    """A batch of items into fastai's batch (``do_batch``: before_batch, collation, types), in the
    worker, as fastai's workers do; an item skipped by fastai's SkipItemException is left out."""

    def __init__(self, dl):
        self.dl = dl

    def __call__(self, items):
        return self.dl.do_batch([item for item in items if item is not None])


def _init_worker(worker_id: int) -> None:
    """What fastai's ``_wif`` does in each worker it starts: one torch thread, its own seed."""
    from fastai.torch_core import set_seed

    info = torch.utils.data.get_worker_info()
    torch.set_num_threads(1)
    set_seed(info.seed)
    info.dataset.dl.wif()


def close_workers(dls) -> None:
    """End the persistent worker processes of every loader of ``dls`` (a fastai DataLoaders)."""
    for dl in getattr(dls, "loaders", ()):
        dl = getattr(dl, "dl", dl)  # under several processes, the loader DistributedDL wraps
        if isinstance(dl, NonBlockingDL):
            dl.close()


class NonBlockingWeightedDL(NonBlockingDL, WeightedDL):
    """fastai's ``WeightedDL`` (the training loader draws an epoch of indices with replacement, one
    weight per image; validation keeps its order) with ``NonBlockingDL``'s copies to the GPU."""


def ImageTensorBlock(channels: str = "rgb", size: int | None = None) -> TransformBlock:
    """Like fastai's ImageBlock, but for any number of stains (ImageBlock is RGB only)."""
    return TransformBlock(type_tfms=ReadImage(channels, size), batch_tfms=IntToFloatTensor)


def default_workers(cuda: bool) -> int:
    """DataLoader worker processes: on a GPU, one per available core, since decoding must keep up
    (on an H100 a resnet34 trains on about 1,300 512 px RGBY images/s, and each worker decodes
    about 58 of them from PNGs: see bench/gpu.py); on CPU none, as the model needs the cores and
    worker start-up costs more than it saves on small sets. ``bound_workers`` caps it at
    MAX_WORKERS and the number of images."""
    return min(available_cores(), MAX_WORKERS) if cuda else 0


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may run on (containers, taskset)
    except AttributeError:
        return os.cpu_count() or 1


def bound_workers(workers: int | None, n_items: int, default: int) -> int:
    """The worker processes to start for ``n_items`` images: ``workers``, or ``default`` when it is
    None, but at most one per available core and one per image. Every command that takes
    ``--workers`` (train, cv, predict, evaluate, preprocess) goes through here; an explicit value
    that is lowered gets a note in the log."""
    check_field(TrainConfig, "workers", workers)  # callers from Python bypass the config's checks
    want = default if workers is None else workers
    cap = max(1, min(available_cores(), n_items))
    if want <= cap:
        return want
    if workers is not None:
        logger.info(f"note: --workers {workers} lowered to {cap} (at most one per CPU core and one per image)")
    return cap


def augmentations(size: int, max_rotate: float = 10.0, max_lighting: float = 0.1) -> list:
    """Augmentations that suit microscopy: cells have no up or down, so all eight dihedral
    orientations, small rotations, brightness and contrast; no warp, zoom or colour shifts."""
    tfms = aug_transforms(do_flip=True, flip_vert=True, max_rotate=max_rotate, max_zoom=1.0,
                          max_lighting=max_lighting, max_warp=0.0, pad_mode="reflection", size=None)
    tfms = [SyncFreeAffine.like(tfm) if isinstance(tfm, AffineCoordTfm) else tfm for tfm in tfms]
    for tfm in tfms:
        # training batches only: fastai's affine transform otherwise resamples every validation and
        # test batch through an identity warp, which costs time and changes pixels by float rounding
        tfm.split_idx = 0
    return tfms


# fastai's batch augmentation on a GPU waits for the GPU twice per batch: ``dihedral_mat`` builds its
# four lookup tables from Python lists on the device (a blocking copy to the GPU each), and
# ``_grid_sample`` reads the zoom of the batch's sampling grid with ``.item()``. ``SyncFreeAffine``
# is fastai's affine transform with the same random draws and the same pixels, without either.

_DIHEDRAL = torch.tensor([[1, -1, 1, -1, -1, 1, 1, -1],   # fastai's dihedral_mat: xs
                          [1, 1, -1, 1, -1, -1, 1, -1],   # ys
                          [1, 1, 1, 0, 1, 0, 0, 0],       # m0
                          [0, 0, 0, 1, 0, 1, 1, 1]])      # m1


@functools.lru_cache(maxsize=None)
def _dihedral_table(device: torch.device) -> torch.Tensor:
    return _DIHEDRAL.to(device)  # copied to each device once per process


def dihedral_mat(x: torch.Tensor, p: float = 0.5, draw=None, batch: bool = False) -> torch.Tensor:
    """fastai's ``dihedral_mat`` (a random one of the eight flips and 90-degree rotations per image,
    applied with probability ``p``), its lookup tables kept on the device."""
    def _def_draw(x):
        return torch.randint(0, 8, (x.size(0),), device=x.device)

    def _def_draw_b(x):
        return random.randint(0, 7) + x.new_zeros((x.size(0),)).long()

    idx = fastai_augment._draw_mask(x, _def_draw_b if batch else _def_draw, draw=draw, p=p, batch=batch).long()
    table = _dihedral_table(x.device)
    xs, ys, m0, m1 = (table[i].gather(0, idx) for i in range(4))
    t0 = fastai_augment.t0
    return fastai_augment.affine_mat(xs * m0, xs * m1, t0(xs), ys * m1, ys * m0, t0(xs)).float()


class SyncFreeAffine(AffineCoordTfm):
    """fastai's ``AffineCoordTfm`` for the augmentations above: one resampling per batch for the
    dihedral orientation and the rotation (and progressive resizing's smaller size), giving fastai's
    pixels without reading anything back from the GPU.

    fastai's ``_grid_sample`` first shrinks the batch by area averaging when the output is less than
    half its side and the transform does not zoom in as much; it reads the zoom from the sampling
    grid's span with ``.item()``. Flips and rotations without zoom keep the grid's corners at
    distance 1 or more from the centre (a span of at least 2, a zoom of at most 1), so the rule
    comes down to the sizes alone, known on the host."""

    @classmethod
    def like(cls, tfm: AffineCoordTfm) -> "SyncFreeAffine":
        aff_fs = [functools.partial(dihedral_mat, **f.keywords) if getattr(f, "func", None) is fastai_augment.dihedral_mat
                  else f for f in tfm.aff_fs]
        unknown = [f for f in aff_fs if getattr(f, "func", None) not in (dihedral_mat, fastai_augment.rotate_mat)]
        if unknown or len(tfm.coord_fs):  # a zoom or a warp would make the shortcut above wrong
            raise ValueError(f"SyncFreeAffine takes flips and rotations only, not {unknown or list(tfm.coord_fs)}")
        new = cls(aff_fs=aff_fs, size=tfm.size, mode=tfm.mode, pad_mode=tfm.pad_mode, mode_mask=tfm.mode_mask,
                  align_corners=tfm.align_corners, p=tfm.p)
        new.split_idx = tfm.split_idx
        return new

    def _encode(self, x, mode, reverse=False):
        if not isinstance(x, TensorImage) or mode != "bilinear":
            return super()._encode(x, mode, reverse)
        size = tuple(x.shape[-2:]) if self.size is None else (self.size, self.size) if isinstance(self.size, int) \
            else tuple(self.size)
        coords = fastai_augment.affine_grid(self.mat, x.shape[:2] + size, align_corners=self.align_corners)
        shrink = min(x.shape[-2] / size[0], x.shape[-1] / size[1]) / 2
        if shrink > 1:
            x = F.interpolate(x, scale_factor=1 / shrink, mode="area", recompute_scale_factor=True)
        return TensorImage(F.grid_sample(x, coords, mode=mode, padding_mode=self.pad_mode,
                                         align_corners=self.align_corners))


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
    return NonBlockingDL(dsets, bs=bs, num_workers=workers, device=device, shuffle=False, drop_last=False,
                         pin_memory=_pin(device), after_batch=[*block.batch_tfms, Normalize.from_stats(mean, std)])


def _pin(device) -> bool:
    """Pinned (page-locked) host memory for batches bound for a GPU (fastai's default device, when
    none is given), so that they are copied asynchronously."""
    return torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"


def make_dls(df: pd.DataFrame, vocab, channels: str, size: int, mean, std, splitter, bs: int,
             workers: int = 0, seed: int | None = None, device=None, augment: bool = True,
             oversample_cap: float | None = None):
    """The training and validation DataLoaders; with ``oversample_cap``, the training images are
    drawn with ``sampling.oversampling_weights`` (weights from the training split's own labels)."""
    dblock = make_datablock(vocab, channels, size, mean, std, splitter, augment)
    if seed is not None:
        from fastai.torch_core import set_seed
        set_seed(seed, reproducible=True)
    # the training and validation loaders keep their worker processes from epoch to epoch
    kwargs = dict(bs=bs, num_workers=workers, device=device, pin_memory=_pin(device), persistent_workers=workers > 0)
    if oversample_cap is None:
        return dblock.dataloaders(df, dl_type=NonBlockingDL, **kwargs)
    from .sampling import oversampling_weights

    dsets = dblock.datasets(df)
    weights = oversampling_weights(df["labels"].iloc[dsets.splits[0]], len(vocab), oversample_cap)
    # fastai's Datasets.weighted_dataloaders, spelled out: it fixes the loader class to WeightedDL,
    # and the training loader must also be the non-blocking one
    return dsets.dataloaders(dl_type=NonBlockingWeightedDL, dl_kwargs=({"wgts": weights}, *[{}] * (dsets.n_subsets - 1)),
                             after_item=dblock.item_tfms, after_batch=dblock.batch_tfms, **kwargs)
