"""PNG plots of a run: lr_find, training curves, per-class F1, a grid of sample images; class
activation maps over an image and a chart of its class probabilities.

Figures are matplotlib ``Figure`` objects drawn straight to PNG, never through pyplot: no backend is
chosen or changed, nothing is kept open, and a notebook's own plots are left as they are.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .atomic import save_figure


def subplots(*args, **kwargs):
    """``pyplot.subplots`` without pyplot: a new ``Figure`` and its axes."""
    fig = Figure(figsize=kwargs.pop("figsize", None))
    return fig, fig.subplots(*args, **kwargs)


def plain_text(text) -> str:
    """``text`` drawn as it is: matplotlib reads a pair of ``$`` as maths and raises on what its
    parser rejects (an id like ``a$^$b``), so ids and names from files get their ``$`` escaped."""
    return str(text).replace("$", r"\$")


def lr_find_plot(path, lrs, losses, suggestions: dict):
    fig, ax = subplots(figsize=(6, 4))
    ax.plot(lrs, losses)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    lrs_arr = np.asarray(lrs)
    for (name, lr), color in zip(suggestions.items(), ["C1", "C2", "C3", "C4"]):
        i = int(np.argmin(np.abs(np.log(lrs_arr) - np.log(lr))))
        ax.plot(lr, losses[i], "o", color=color, label=f"{name} {lr:.2e}")
    ax.legend(loc="best")
    ax.set_title("lr_find")
    return save_figure(path, fig)


def _epoch_lines(ax, history: pd.DataFrame, columns, ylabel: str) -> None:
    for col in columns:
        if col in history:
            ax.plot(history["epoch"], history[col], marker="o", label=col)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.legend()


def curves_plot(path, history: pd.DataFrame):
    fig, (ax1, ax2) = subplots(1, 2, figsize=(10, 4))
    _epoch_lines(ax1, history, ("train_loss", "valid_loss"), "loss")
    _epoch_lines(ax2, history, ("f1_macro", "f1_samples"), "F1 (validation)")
    ax2.set_ylim(0, 1)
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return save_figure(path, fig)


def f1_bars_plot(path, report: pd.DataFrame):
    fig, ax = subplots(figsize=(8, 0.3 * len(report) + 1.5))
    labels = [plain_text(f"{c} {n}") for c, n in zip(report["class"], report["name"])]
    ax.barh(labels, report["f1"], color="C0")
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("F1")
    for i, (f, s) in enumerate(zip(report["f1"], report["support"])):
        ax.text(min(f + 0.01, 0.9), i, f"{f:.2f} (n={s})", va="center", fontsize=8)
    return save_figure(path, fig)


def false_colour(arr: np.ndarray) -> np.ndarray:
    """An (H, W, C) uint8 image as RGB for display; RGBY shows yellow as red + green, as the
    Human Protein Atlas does."""
    if arr.shape[-1] == 3:
        return arr
    r, g, b, y = (arr[..., i].astype(np.float32) for i in range(4))
    rgb = np.stack([r + y / 2, g + y / 2, b], -1)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def sample_grid_plot(path, images, titles, cols: int = 4):
    rows = max(1, int(np.ceil(len(images) / cols)))
    fig, axes = subplots(rows, cols, figsize=(3 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, title in zip(axes.flat, images, titles):
        ax.imshow(false_colour(img))
        ax.set_title(plain_text(title), fontsize=7)
    fig.tight_layout()
    return save_figure(path, fig)


def heatmap_overlay(rgb: np.ndarray, heat: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """A class activation map (H, W) in 0..1 over an (H, W, 3) uint8 image, as uint8: the jet colour
    map, more opaque where the map is stronger, so the stains stay visible where it is weak."""
    from matplotlib import colormaps

    colours = colormaps["jet"](np.clip(heat, 0, 1))[..., :3] * 255
    weight = alpha * np.clip(heat, 0, 1)[..., None]
    return np.clip(rgb * (1 - weight) + colours * weight, 0, 255).round().astype(np.uint8)


CAM_PANEL_SIDE = 256  # the smallest side the stains and the heatmap are shown at


def cam_panel(rgb: np.ndarray, overlay: np.ndarray, title: str, side: int = CAM_PANEL_SIDE) -> np.ndarray:
    """The stains as the model saw them (false colour for RGBY) beside the same image under a class's
    heatmap, with ``title`` (one or more lines) above and the colour scale below, as one (H, W, 3) uint8 image. Drawn
    with PIL rather than matplotlib: a folder of test images gets several per image, and a figure
    costs about 50 times as long."""
    from matplotlib import colormaps
    from PIL import Image, ImageDraw, ImageFont

    h, w = rgb.shape[:2]
    scale = max(1, -(-side // max(h, w)))  # whole-pixel enlargement: small models' inputs stay sharp
    size = (w * scale, h * scale)
    pad, font = 8, ImageFont.load_default(size=14)
    bar_h, text_h, lines = 12, 20, str(title).splitlines() or [""]
    canvas = Image.new("RGB", (2 * size[0] + 3 * pad, size[1] + (len(lines) + 1) * text_h + bar_h + 3 * pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((pad, pad + i * text_h), line, fill="black", font=font)
    top = pad + len(lines) * text_h
    for i, image in enumerate((rgb, overlay)):
        canvas.paste(Image.fromarray(image).resize(size, Image.NEAREST), (pad + i * (size[0] + pad), top))
    ramp = (colormaps["jet"](np.linspace(0, 1, size[0]))[:, :3] * 255).astype(np.uint8)
    bar_top = top + size[1] + pad
    canvas.paste(Image.fromarray(np.repeat(ramp[None], bar_h, 0)), (2 * pad + size[0], bar_top))
    draw.text((pad, bar_top - 2), "stains", fill="black", font=font)
    draw.text((2 * pad + size[0], bar_top + bar_h + 2), "0  Grad-CAM activation  1", fill="black", font=font)
    return np.asarray(canvas)


def probability_plot(path, probs, names, thresholds, title: str = ""):
    """Each class's probability as a bar, its threshold as a tick; bars at or over the threshold
    (the predicted classes) in a strong colour."""
    probs, thresholds = np.asarray(probs, float), np.asarray(thresholds, float)
    fig, ax = subplots(figsize=(7, 0.25 * len(probs) + 1.2))
    labels = [plain_text(f"{c} {n}") for c, n in enumerate(names)]
    predicted = probs >= thresholds
    ax.barh(labels, probs, color=np.where(predicted, "C3", "C7"))
    ax.scatter(thresholds, range(len(probs)), marker="|", s=120, color="k", label="threshold", zorder=3)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("probability")
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(loc="lower right", fontsize=7)
    if title:
        ax.set_title(plain_text(title), fontsize=9)
    return save_figure(path, fig)
