"""The fastai-native door: ``DataLoaders`` and a ``Learner`` for either competition layout, on which
fastai's own tools work as fastai users expect (``show_batch``, ``lr_find``, ``fine_tune`` and
``fit_one_cycle``, ``show_results``, ``predict``, ``export``, ``Interpretation``), and the steps fastai
has no word for: per-class thresholds, the safe export, heatmaps and a Kaggle submission; and the
callback that reports a fit to an Optuna trial (``OptunaPruning``), for a search in a notebook.

    from hpa_fastai import hpa_dls, hpa_learner
    dls = hpa_dls("data/hpa2018", size=256, bs=32)
    learn = hpa_learner(dls, "resnet34")
    learn.fine_tune(5, 1e-3)

The data and the model are the ones ``run.py`` trains (same checks, DataBlock, statistics, model
registry, loss and metrics); ``run.py`` adds the run folder around them. Library code never imports
this module, and ``import hpa_fastai`` loads it only when one of its names is used.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
from fastai.data.core import DataLoaders
from fastai.learner import Learner

from . import metrics as M
from . import modelfile
from .config import TrainConfig
from .losses import set_thresholds
from .inference.cam import explain, write_explanations
from .inference.predictor import items_for_paths
from .inference.submission import write_predictions
from .paths import SAMPLE_DIR
from .runs.folder import MODEL_JSON
from .search.callback import OptunaPruning
from .training.learner import create_learner, default_device, training_dls
from .training.run import prepare, validate


class HPADataLoaders(DataLoaders):
    """fastai ``DataLoaders`` of an HPA data set (as fastai's ``ImageDataLoaders`` are of image
    folders) that also carry what a model of them must know: the checked training set (format,
    vocabulary, class names, channels, size, normalisation). Build them with ``hpa_dls``."""

    def __init__(self, *loaders, training_set=None, **kwargs):
        super().__init__(*loaders, **kwargs)
        self.training_set = training_set

    def new_empty(self):
        # what Learner.export pickles: the transforms without the items, and the description kept
        empty = super().new_empty()
        empty.training_set = None
        return empty

    @property
    def names(self) -> list[str]:
        return list(self.training_set.names)

    @classmethod
    def from_folder(cls, data=None, channels: str = "auto", size: int | None = None, bs: int = 32,
                    valid_pct: float = 0.2, n_folds: int = 0, fold: int = 0, seed: int = 42,
                    workers: int | None = None, extra_data=None, skip_bad: bool = False, augment: bool = True,
                    device=None, oversample: bool | None = None, oversample_cap: float | None = None) -> "HPADataLoaders":
        """``data`` (a competition folder; default the bundled sample) checked and split as
        ``run.py`` does: the same flags, defaults (rare classes oversampled unless
        ``oversample=False``), constraints, error messages and DataBlock."""
        given = {k: v for k, v in (("oversample", oversample), ("oversample_cap", oversample_cap)) if v is not None}
        cfg = TrainConfig(data=None if data is None else str(data), channels=channels, size=size, bs=bs,
                          valid_pct=valid_pct, n_folds=n_folds, fold=fold, seed=seed, workers=workers,
                          extra_data=extra_data, skip_bad=skip_bad, **given)
        ts = prepare(cfg)
        dls = training_dls(ts, device or default_device(), augment=augment)
        return cls(*dls.loaders, path=ts.data_dir, device=dls.device, training_set=ts)


def hpa_dls(data=None, **kwargs) -> HPADataLoaders:
    """``HPADataLoaders.from_folder``: DataLoaders of a competition folder in either layout."""
    return HPADataLoaders.from_folder(data, **kwargs)


# the options of a run's model, loss and device that hpa_learner takes, by their TrainConfig names
LEARNER_OPTIONS = ("pretrained", "weights", "loss", "focal_gamma", "asl_gamma_neg", "asl_gamma_pos", "asl_clip",
                   "wd", "threshold", "precision", "memory_format", "compile", "seed")


def hpa_learner(dls: HPADataLoaders, arch: str = "resnet34", **kwargs) -> Learner:
    """A fastai ``Learner`` for ``dls``, built by the factory ``run.py`` uses: a registered
    architecture (``cnn``, ``resnet18`` ... ``resnet152``, ``densenet121``, ``seresnext50``,
    ``inception_v3``, ``timm:<name>``) for the data's stains and classes, the
    loss (``loss="bce" | "focal" | "asl"`` with ``focal_gamma``, ``asl_gamma_neg``, ``asl_gamma_pos``,
    ``asl_clip``), macro and samples F1 at ``threshold``, torch's AdamW (weight decay ``wd``) under body/head
    parameter groups for ``fine_tune``, ``precision`` (on CUDA mixed precision by default), ``memory_format``
    and ``compile``, each with ``run.py``'s default and check (``pretrained=True``; ``weights=PATH``: an
    ImageNet file as torchvision or timm publish it, an earlier run, or a state dict, as ``--weights``).
    With ImageNet weights or a run's, the body starts frozen, as fastai's ``vision_learner``. The other
    ``kwargs`` go to ``Learner`` (``cbs``, ``wd``, ``path``...); ``path`` defaults to the current
    folder rather than the data folder, where ``lr_find`` and ``save`` would otherwise write."""
    ts = dls.training_set if isinstance(dls, HPADataLoaders) else None
    if ts is None:
        raise TypeError("hpa_learner needs the DataLoaders that hpa_dls makes (they carry the vocabulary, "
                        "channels and normalisation the model is built for)")
    options = {k: kwargs.pop(k) for k in LEARNER_OPTIONS if k in kwargs}
    if options.get("weights") is not None:
        options["weights"] = str(options["weights"])
    cfg = validate(dataclasses.replace(ts.cfg, arch=arch, **options))
    kwargs.setdefault("path", Path("."))
    device = dls.device if dls.device is not None else default_device()
    learn, setup = create_learner(dls, ts, cfg, device, **kwargs)
    # model.json's description travels in the learner (and in learn.export's pickle) as a callback
    learn.add_cb(modelfile.ModelDescription(modelfile.model_meta(dataclasses.replace(ts, cfg=cfg),
                                                                 [cfg.threshold] * len(ts.vocab), setup.precision)))
    if setup.pretrained:
        learn.freeze()
    return learn


def description(learn: Learner) -> dict:
    meta = modelfile.description_of(learn)
    if meta is None:
        raise TypeError("this Learner was not made by hpa_learner (it has no model description)")
    return meta


def tune_thresholds(learn: Learner, dl=None) -> pd.DataFrame:
    """Per-class thresholds that maximise each class's F1 on the validation set (or ``dl``), kept in
    the learner: ``learn.predict`` decodes with them from now on, and ``export`` and ``export_safe``
    carry them, so ``load_learner``, ``load_predictor`` and ``run.py predict`` give the same labels.
    Returns the per-class table (threshold, precision, recall, F1, support)."""
    meta = description(learn)
    probs, targets = learn.get_preds(dl=dl if dl is not None else learn.dls.valid)
    probs, targets = probs.float().numpy(), targets.numpy().astype(bool)
    thresholds = M.tune_thresholds(probs, targets, default=0.5)
    meta["thresholds"] = [float(t) for t in thresholds]
    set_thresholds(learn.loss_func, thresholds)
    return M.per_class_report(probs, targets, thresholds, meta["names"])


def export_safe(learn: Learner, folder) -> Path:
    """The safe export (``model.safetensors`` + ``model.json``) into ``folder``: what ``load_predictor``,
    ``run.py predict``, ``explain`` and ``serve`` load without unpickling anything."""
    folder = Path(folder)
    modelfile.save(modelfile.bare_model(learn.model).state_dict(), description(learn), folder)
    return folder / MODEL_JSON


def show_heatmaps(predictor, images, classes=None, threshold: float | None = None, tta: str | None = None,
                  out=None):
    """Grad-CAM heatmaps of image files (for RGBY any one stain file, or the ``{id}`` prefix) with a
    ``load_predictor`` model: per image the stains and one overlay per predicted class (or per class
    in ``classes``) in a matplotlib figure; with ``out``, also the files ``run.py explain`` writes.
    Returns the explanations."""
    import matplotlib.pyplot as plt

    from . import plots

    images = [images] if isinstance(images, (str, Path)) else list(images)
    explanations = explain(predictor, items_for_paths(images, predictor.channels), classes, threshold, tta)
    for e in explanations:
        fig, axes = plt.subplots(1, len(e.classes) + 1, figsize=(3 * (len(e.classes) + 1), 3.3), squeeze=False)
        axes[0, 0].imshow(e.image)
        axes[0, 0].set_title(plots.plain_text(e.id), fontsize=8)
        for ax, c, heat in zip(axes[0, 1:], e.classes, e.heatmaps):
            ax.imshow(plots.heatmap_overlay(e.image, heat))
            ax.set_title(plots.plain_text(f"{predictor.names[c]} {e.probs[c]:.2f}"), fontsize=8)
        for ax in axes.flat:
            ax.axis("off")
        fig.tight_layout()
    if out is not None:
        write_explanations(predictor, explanations, out, threshold)
    return explanations


def submission(predictor, data=None, out="submission.csv", threshold: float | None = None,
               tta: str | None = None) -> pd.DataFrame:
    """A Kaggle submission for a competition folder (default the bundled sample), or labels for a
    folder of images, written to ``out`` as ``run.py predict`` writes it; returns the table."""
    return write_predictions(predictor, Path(data) if data is not None else SAMPLE_DIR, out, threshold, tta).table


__all__ = ["HPADataLoaders", "hpa_dls", "hpa_learner", "tune_thresholds", "export_safe", "show_heatmaps",
           "submission", "OptunaPruning"]
