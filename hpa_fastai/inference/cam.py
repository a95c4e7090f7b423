"""Class activation maps: where in an image a trained model saw a class (Grad-CAM, Selvaraju et al.
2017), on the feature map of the model's last convolutional block, for images read exactly as the
model reads them (channels, size, normalisation; optionally over the 8 dihedral orientations).

Why fastai's hooks and not the grad-cam package: grad-cam needs opencv-python (a large wheel that
wants libGL at import time) only to resize and colour the maps, and it leaves the choice of the
target layer to each caller, per architecture. Every model here is ``nn.Sequential(body, head)``,
so one rule finds the last feature map for all of them (the output of the body's blocks computed
last that is still an image larger than 1x1); fastai's ``Hooks`` keep those outputs in the graph and
``torch.autograd.grad`` gives its gradient. fastai's own gradient hooks (``grad=True``) use torch's
deprecated module backward hooks, which report the gradient of a module's last operation only.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from fastai.callback.hook import Hooks
from torch import nn

from .. import plots
from ..atomic import save_png, write_csv
from ..data.layouts import CHANNEL_SETS, key_files
from ..errors import HPAError
from ..outputs import check_output_folder, for_spreadsheet
from .predictor import Ensemble, dihedral, inverse_dihedral, items_for_paths

EXPLANATIONS_CSV = "explanations.csv"


def feature_blocks(model: nn.Module) -> tuple[list[nn.Module], bool]:
    """The modules of the model's body whose outputs may hold the last feature map (the body's
    blocks, or a timm model's top-level modules and the body itself), and whether that map comes
    channels-last (some timm models, e.g. Swin, give (B, H, W, C))."""
    if not (isinstance(model, nn.Sequential) and len(model) == 2):
        raise HPAError(f"class activation maps need a model built as body + head; this one is "
                       f"{type(model).__name__}")
    body = model[0]
    if isinstance(body, nn.Sequential):
        return list(body.children()), False
    timm_model = getattr(body, "model", None)  # fastai's TimmBody wraps the timm model
    channels_last = "NHWC" in str(getattr(timm_model, "output_fmt", "NCHW"))
    inner = list(timm_model.children()) if isinstance(timm_model, nn.Module) else []
    return inner + [body], channels_last


def _last_feature_map(outputs, channels_last: bool) -> torch.Tensor:
    """The output computed last that is still an image larger than 1x1 (``outputs``: (call number,
    output) per hooked module, None for modules that did not run)."""
    for _, out in sorted((o for o in outputs if o is not None), key=lambda o: o[0], reverse=True):
        if isinstance(out, torch.Tensor) and out.ndim == 4:
            fmap = out.permute(0, 3, 1, 2) if channels_last else out
            if fmap.shape[-1] * fmap.shape[-2] > 1:
                return fmap
    raise HPAError("the model's body gives no feature map larger than 1x1 pixel at this image size (a vision "
                   "transformer, or images too small), so there is nothing to draw a heatmap on")


def grad_cam(model: nn.Module, xb: torch.Tensor, classes) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM heatmaps of ``classes`` (class indices) for each image of the normalised batch ``xb``
    (B, C, H, W): a tensor (B, len(classes), H, W), each map scaled to 0..1 by its own maximum (all
    zeros where nothing speaks for the class), and the model's logits (B, n_classes)."""
    classes = [int(c) for c in classes]
    blocks, channels_last = feature_blocks(model)
    model.eval()
    # the input takes part in the graph, so the maps exist even where the weights are frozen
    xb = xb.detach().as_subclass(torch.Tensor).clone().requires_grad_(True)
    maps = []
    calls = itertools.count()  # the order the hooked modules ran in, which their registration need not follow
    with torch.enable_grad(), Hooks(blocks, lambda m, i, o: (next(calls), o), detach=False) as hooks:
        logits = model(xb)
        fmap = _last_feature_map(hooks.stored, channels_last)
        for j, c in enumerate(classes):
            (grads,) = torch.autograd.grad(logits[:, c].sum(), fmap, retain_graph=j < len(classes) - 1)
            weights = grads.float().mean((2, 3), keepdim=True)  # each channel's importance for the class
            cam = F.relu((weights * fmap.detach().float()).sum(1, keepdim=True))
            maps.append(F.interpolate(cam, size=xb.shape[-2:], mode="bilinear", align_corners=False)[:, 0])
    if not maps:
        return xb.new_zeros((len(xb), 0, *xb.shape[-2:])), logits.detach()
    cams = torch.stack(maps, 1)
    peak = cams.amax((-2, -1), keepdim=True)
    return torch.where(peak > 0, cams / peak.clamp_min(1e-12), torch.zeros_like(cams)), logits.detach()


def grad_cam_tta(model: nn.Module, xb: torch.Tensor, classes) -> torch.Tensor:
    """``grad_cam`` averaged over the 8 dihedral orientations, each map turned back first (what
    ``--tta`` predicts from), then scaled to 0..1 again."""
    cams = torch.stack([inverse_dihedral(grad_cam(model, dihedral(xb, k), classes)[0], k) for k in range(8)]).mean(0)
    peak = cams.amax((-2, -1), keepdim=True)
    return torch.where(peak > 0, cams / peak.clamp_min(1e-12), torch.zeros_like(cams))


@dataclass
class Explanation:
    """One image explained: what the model saw (RGB, RGBY in false colour, at the model's size), its
    probabilities, the classes it predicts, and one heatmap per explained class."""
    id: str
    image: np.ndarray  # (H, W, 3) uint8
    probs: np.ndarray  # (n_classes,)
    predicted: list[int]
    classes: list[int]
    heatmaps: np.ndarray  # (len(classes), H, W) in 0..1


def check_classes(classes, n_classes: int, flag: str = "--classes") -> list[int] | None:
    if classes is None:
        return None
    if isinstance(classes, (int, np.integer)):
        classes = [classes]
    out = []
    for c in classes:
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 0 <= c < n_classes:
            raise HPAError(f"{flag} {c!r:.40}: not a class of this model (0..{n_classes - 1})")
        out.append(int(c))
    return list(dict.fromkeys(out))


def explain(pred, items: pd.DataFrame, classes=None, threshold: float | None = None, tta: str | None = None,
            bs: int = 8) -> list[Explanation]:
    """Explain each image of ``items`` (a frame with ``id`` and ``key``): its probabilities (as
    ``predict`` gives them, with ``threshold`` or the tuned per-class thresholds and ``tta``) and a
    heatmap for each of ``classes``, by default each predicted class, or the most probable one when
    none reaches its threshold."""
    if isinstance(pred, Ensemble):
        raise HPAError(f"class activation maps need one model, not an ensemble of {len(pred.members)}; "
                       f"pass one member, e.g. --learner {pred.members[0].source}")
    classes = check_classes(classes, len(pred.names))
    probs = pred.probabilities(items, tta, bs)
    decided = pred.decode(probs, threshold)
    wanted = [classes if classes is not None else (np.flatnonzero(row).tolist() or [int(np.argmax(p))])
              for row, p in zip(decided, probs)]
    images, maps = heatmaps(pred, items, wanted, tta, bs)
    return [Explanation(id=str(image_id), image=image, probs=p, predicted=np.flatnonzero(row).tolist(), classes=want,
                        heatmaps=m)
            for image_id, image, p, row, want, m in zip(items["id"], images, probs, decided, wanted, maps)]


def heatmaps(pred, items: pd.DataFrame, wanted: list[list[int]], tta: str | None = None,
             bs: int = 8) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """For each image of ``items``, what the model saw ((H, W, 3) uint8, RGBY in false colour) and
    the Grad-CAM heatmaps ((len(wanted[i]), H, W) in 0..1) of its classes ``wanted[i]``."""
    mean = torch.tensor(pred.meta["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(pred.meta["std"]).view(1, -1, 1, 1)
    model, images, maps, start = pred.learn.model, [], [], 0
    for (xb,) in pred.dataloader(items, bs):
        xb = xb.as_subclass(torch.Tensor)
        batch_wanted = wanted[start:start + len(xb)]
        union = sorted({c for w in batch_wanted for c in w})
        cams = (grad_cam_tta(model, xb, union) if tta else grad_cam(model, xb, union)[0]).cpu().numpy()
        seen = ((xb.detach().cpu() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
        for i, want in enumerate(batch_wanted):
            images.append(plots.false_colour(seen[i].permute(1, 2, 0).numpy()))
            maps.append(cams[i, [union.index(c) for c in want]])
        start += len(xb)
    return images, maps


def file_stem(text: str) -> str:
    """``text`` as part of a file name: letters, digits, ``.``, ``-`` and ``_`` only."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._") or "image"


def explanation_files(explanations: list[Explanation], names: list[str]) -> list[dict]:
    """The files ``write_explanations`` writes: per image one overlay per explained class and a
    probability chart; two images with one id (from two folders) get numbered names."""
    rows, used = [], set()
    for e in explanations:
        stem, n = file_stem(e.id), 2
        while stem in used:
            stem, n = f"{file_stem(e.id)}-{n}", n + 1
        used.add(stem)
        rows.append({"stem": stem, "overlays": [f"{stem}_cam{c:02d}_{file_stem(names[c])}.png" for c in e.classes],
                     "probabilities": f"{stem}_probabilities.png"})
    return rows


def write_explanations(pred, explanations: list[Explanation], out, threshold: float | None = None,
                       flag: str = "--out", inputs=()) -> pd.DataFrame:
    """Write each explanation into the folder ``out``: ``{id}_cam{class}_{name}.png`` (the stains and
    the heatmap over them) per explained class, ``{id}_probabilities.png``, and explanations.csv
    listing every overlay with its class, probability and threshold. Returns that table."""
    names = list(pred.names)
    thresholds = pred.thresholds if threshold is None else np.full(len(names), threshold)
    files = explanation_files(explanations, names)
    every = [EXPLANATIONS_CSV] + [f for row in files for f in (*row["overlays"], row["probabilities"])]
    folder = check_output_folder(out, flag, every, inputs, [pred.source])
    rows = []
    for e, f in zip(explanations, files):
        for c, heat, name in zip(e.classes, e.heatmaps, f["overlays"]):
            verdict = "predicted" if c in e.predicted else "not predicted"
            if not heat.max() > 0:
                verdict += "; no region speaks for it"
            title = f"{e.id}\n{names[c]} (class {c}): p = {e.probs[c]:.2f}, threshold {thresholds[c]:.2f}, {verdict}"
            save_png(folder / name, Image.fromarray(plots.cam_panel(e.image, plots.heatmap_overlay(e.image, heat), title)))
            rows.append({"image": e.id, "class": c, "name": names[c], "probability": round(float(e.probs[c]), 4),
                         "threshold": round(float(thresholds[c]), 4), "predicted": c in e.predicted, "file": name})
        plots.probability_plot(folder / f["probabilities"], e.probs, names, thresholds, e.id)
    table = pd.DataFrame(rows, columns=["image", "class", "name", "probability", "threshold", "predicted", "file"])
    write_csv(folder / EXPLANATIONS_CSV, for_spreadsheet(table))  # ids from file names, for people
    return table


def image_inputs(items: pd.DataFrame, channels: str) -> list[str]:
    """The image files behind ``items``: an output must never land on one of them."""
    return [f for key in items["key"] for f in key_files(key, CHANNEL_SETS[channels])]


def explain_files(pred, paths, out, classes=None, threshold: float | None = None, tta: str | None = None,
                  bs: int = 8) -> pd.DataFrame:
    """``explain`` image files (for RGBY: any one stain file of an image, or the common ``{id}``
    prefix) and write the results into ``out``."""
    if isinstance(pred, Ensemble):
        explain(pred, pd.DataFrame(columns=["id", "key"]))  # the one clear error
    items = items_for_paths(paths, pred.channels)
    check_output_folder(out, "--out", [], image_inputs(items, pred.channels), [pred.source])
    return write_explanations(pred, explain(pred, items, classes, threshold, tta, bs), out, threshold,
                              inputs=image_inputs(items, pred.channels))


def explain_data(pred, data, out, threshold: float | None = None, tta: str | None = None, bs: int = 8,
                 flag: str = "--cam") -> pd.DataFrame:
    """``explain`` what ``predict`` predicts for ``data`` (a competition folder's test images, a
    folder of images, or one image) and write the results into ``out``."""
    from .submission import prediction_items

    items, _ = prediction_items(pred, data)
    check_output_folder(out, flag, [], image_inputs(items, pred.channels), [pred.source])
    return write_explanations(pred, explain(pred, items, None, threshold, tta, bs), out, threshold, flag,
                              image_inputs(items, pred.channels))
