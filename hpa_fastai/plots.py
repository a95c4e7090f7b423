"""PNG plots of a run: lr_find, training curves, per-class F1 and a grid of sample images."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .atomic import save_figure  # noqa: E402


def plain_text(text) -> str:
    """``text`` drawn as it is: matplotlib reads a pair of ``$`` as maths and raises on what its
    parser rejects (an id like ``a$^$b``), so ids and names from files get their ``$`` escaped."""
    return str(text).replace("$", r"\$")


def lr_find_plot(path, lrs, losses, suggestions: dict):
    fig, ax = plt.subplots(figsize=(6, 4))
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


def curves_plot(path, history: pd.DataFrame):
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for col in ("train_loss", "valid_loss"):
        if col in history:
            ax1.plot(history["epoch"], history[col], marker="o", label=col)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.legend()
    for col in ("f1_macro", "f1_samples"):
        if col in history:
            ax2.plot(history["epoch"], history[col], marker="o", label=col)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("F1 (validation)")
    ax2.set_ylim(0, 1)
    ax2.legend()
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return save_figure(path, fig)


def f1_bars_plot(path, report: pd.DataFrame):
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(report) + 1.5))
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
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, title in zip(axes.flat, images, titles):
        ax.imshow(false_colour(img))
        ax.set_title(plain_text(title), fontsize=7)
    fig.tight_layout()
    return save_figure(path, fig)
