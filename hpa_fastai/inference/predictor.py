"""A trained model answering: class probabilities for images (optionally over the 8 dihedral
orientations, batched), in the precision the model trained in, labels decoded with per-class
thresholds, and several models as one ensemble."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from fastai.callback.progress import ProgressCallback
from fastai.data.core import DataLoaders
from fastai.learner import Learner

from .. import device as D
from .. import metrics as M
from ..data.layouts import distinct_ids, scan_images
from ..data.pipeline import predict_dl
from ..errors import HPAError
from ..losses import set_thresholds


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th of the 8 symmetries of the square (k in 0..7): optional transpose, then flips."""
    if k & 4:
        x = x.transpose(-1, -2)
    if k & 1:
        x = x.flip(-1)
    if k & 2:
        x = x.flip(-2)
    return x


def inverse_dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """Undo ``dihedral(x, k)``: the flips first, then the transpose (each is its own inverse)."""
    if k & 2:
        x = x.flip(-2)
    if k & 1:
        x = x.flip(-1)
    if k & 4:
        x = x.transpose(-1, -2)
    return x


class Predictor:
    """A trained model with what it needs to read images: channels, size, normalisation, vocabulary
    and per-class thresholds. Build one with ``load_predictor``."""

    def __init__(self, learn: Learner, meta: dict, source: Path, safe: bool):
        self.learn, self.meta, self.source, self.safe = learn, meta, source, safe
        # the learner's own decoding (learn.predict) with the thresholds this predictor decodes with
        set_thresholds(self.learn.loss_func, meta["thresholds"])
        self.learn.remove_cbs(self.learn.cbs.filter(lambda c: isinstance(c, ProgressCallback)))
        self.learn.model.eval()
        self.device = D.model_device(self.learn.model)
        # TTA's views per forward pass; None: all 8 views of a batch on a GPU (lowered when it runs
        # out of memory), one orientation of a batch on a CPU
        self.views_per_pass = None
        D.set_channels_last(self.learn, self.device.type == "cuda")
        D.tune_backend(self.device)
        self.set_precision("auto")

    def set_precision(self, requested: str = "auto") -> str:
        """Predict in ``requested`` (``auto``: the precision the model trained in, see
        ``device.inference_precision``); returns the precision used."""
        self.precision = D.inference_precision(self.meta.get("precision", "fp32"), requested, self.device)
        D.set_precision(self.learn, self.precision)
        return self.precision

    channels = property(lambda self: self.meta["channels"])
    size = property(lambda self: self.meta["size"])
    names = property(lambda self: self.meta["names"])
    format = property(lambda self: self.meta["format"])

    @property
    def thresholds(self) -> np.ndarray:
        return np.asarray(self.meta["thresholds"], dtype=float)

    def dataloader(self, items: pd.DataFrame, bs: int = 32, workers: int = 0):
        """Batches of ``items`` (a frame with a ``key`` column) with the training-time transforms
        and normalisation: fastai's ``test_dl`` for a pickled learner, the training pipeline's
        ``predict_dl`` with model.json's size and statistics for the safe export."""
        items = items[["key"]].reset_index(drop=True)
        device = next(self.learn.model.parameters()).device
        if not self.safe:
            return self.learn.dls.test_dl(items, rm_type_tfms=0, bs=bs, num_workers=workers, device=device)
        dl = predict_dl(items, self.channels, self.size, self.meta["mean"], self.meta["std"], bs, workers, device)
        self.learn.dls = DataLoaders(dl, dl)  # get_preds' callbacks look at learn.dls
        return dl

    def probabilities(self, items: pd.DataFrame, tta: str | None = None, bs: int = 32, workers: int = 0) -> np.ndarray:
        """Class probabilities, shape (n_images, n_classes). ``tta``: None, 'mean' or 'max' over the
        8 dihedral orientations (fastai's ``Learner.tta`` averages random augmentations instead)."""
        dl = self.dataloader(items, bs, workers)
        if tta is None:
            with torch.no_grad():
                return self.learn.get_preds(dl=dl)[0].float().numpy()
        # On a GPU all 8 views of a batch go through at once. A CPU gains nothing from larger
        # passes, and running out of memory there ends the process rather than raising an error:
        # one orientation of a batch per pass, --bs images, as without TTA.
        per_pass = None if self.device.type == "cuda" else bs
        activation = getattr(self.learn.loss_func, "activation", torch.sigmoid)
        model, out = self.learn.model.eval(), []
        with torch.no_grad():
            for (xb,) in dl:
                xb = xb.as_subclass(torch.Tensor)
                views = torch.cat([dihedral(xb, k) for k in range(8)])  # view k of image i at k * len(xb) + i
                ps = activation(self._forward(model, views, per_pass).float()).view(8, len(xb), -1)
                out.append((ps.mean(0) if tta == "mean" else ps.max(0).values).cpu())
        return torch.cat(out).numpy()

    def _forward(self, model, views: torch.Tensor, per_pass: int | None = None) -> torch.Tensor:
        """The model's outputs for ``views`` in the predictor's precision, in as few forward passes
        as memory allows: ``per_pass`` views at a time (None: all at once), then half as many each
        time the GPU runs out of memory (remembered in ``views_per_pass`` for the next batches)."""
        if self.device.type == "cuda":
            views = D.to_channels_last(views)
        while True:
            n = min(self.views_per_pass or per_pass or len(views), len(views))
            try:
                with D.autocast(self.precision, self.device):
                    return torch.cat([model(chunk) for chunk in views.split(n)])
            except torch.cuda.OutOfMemoryError:
                if n == 1:
                    raise
                self.views_per_pass = n // 2
            torch.cuda.empty_cache()  # outside the handler, whose traceback still holds the failed pass's tensors

    def decode(self, probs: np.ndarray, threshold: float | None = None) -> np.ndarray:
        thresholds = self.thresholds if threshold is None else np.full(probs.shape[1], threshold)
        return M.decode(probs, thresholds)

    def predict_batch(self, paths, threshold: float | None = None, tta: str | None = None, bs: int = 32) -> list[dict]:
        """Labels, names and probabilities for image files (for RGBY: any one file of each image's
        four, or the common ``{id}`` prefix)."""
        items = items_for_paths(paths, self.channels)
        probs = self.probabilities(items, tta, bs)
        preds = self.decode(probs, threshold)
        return [{"image": image_id, "labels": [int(i) for i in np.flatnonzero(row)],
                 "names": [self.names[i] for i in np.flatnonzero(row)],
                 "probabilities": [float(probs[n, i]) for i in np.flatnonzero(row)],
                 "all_probabilities": probs[n].tolist()}
                for n, (image_id, row) in enumerate(zip(items["id"], preds))]

    def predict(self, path, threshold: float | None = None, tta: str | None = None) -> dict:
        return self.predict_batch([path], threshold, tta)[0]


def items_for_paths(paths, channels: str) -> pd.DataFrame:
    """Items (``id``, ``key``) for image files; for RGBY any one stain file of an image, or the
    common ``{id}`` prefix of its four files."""
    paths = list(paths)
    if not paths:
        raise HPAError("no images given: name one or more image files")
    items = pd.concat([_items_for_path(p, channels) for p in paths], ignore_index=True)
    return items.assign(id=distinct_ids(list(items["id"]), list(items["key"]), channels))


def _items_for_path(path, channels: str) -> pd.DataFrame:
    path = Path(path)
    if not path.exists() and channels == "rgby":
        matches = sorted(path.parent.glob(f"{path.name}_green.*"))
        if matches:
            path = matches[0]
    if not path.is_file():
        raise HPAError(f"{path}: image file not found")
    items = scan_images(path, channels)
    return items


class Ensemble:
    """Several trained models answering as one: the mean of their probabilities, decoded with one
    set of per-class thresholds. Same interface as ``Predictor``; the members may differ in
    architecture and image size but must share format, vocabulary and channels."""

    def __init__(self, members: list, thresholds, source: Path):
        first = members[0]
        for member in members[1:]:
            if (member.format, member.channels) != (first.format, first.channels):
                raise HPAError(f"--learner {member.source}: trained on {member.format} {member.channels} data, "
                               f"{first.source} on {first.format} {first.channels}; ensemble members must agree")
            if list(member.meta["vocab"]) != list(first.meta["vocab"]):
                raise HPAError(f"--learner {member.source}: its class vocabulary differs from that of "
                               f"{first.source}; ensemble members must agree")
        thresholds = np.asarray(thresholds, dtype=float)
        if thresholds.shape != (len(first.names),):
            raise HPAError(f"{source}: {thresholds.size} thresholds for {len(first.names)} classes")
        self.members, self.thresholds, self.source = members, thresholds, Path(source)

    channels = property(lambda self: self.members[0].channels)
    names = property(lambda self: self.members[0].names)
    format = property(lambda self: self.members[0].format)

    @property
    def meta(self) -> dict:
        raise HPAError(f"{self.source}: an ensemble of {len(self.members)} models has no single model "
                       f"description; pass one member, e.g. --learner {self.members[0].source}")

    def probabilities(self, items: pd.DataFrame, tta: str | None = None, bs: int = 32, workers: int = 0) -> np.ndarray:
        return np.mean([m.probabilities(items, tta, bs, workers) for m in self.members], axis=0)

    def set_precision(self, requested: str = "auto") -> str:
        """Each member predicts in ``requested`` (``auto``: the precision it trained in)."""
        return ", ".join(sorted({m.set_precision(requested) for m in self.members}))

    decode = Predictor.decode
    predict_batch = Predictor.predict_batch
    predict = Predictor.predict
