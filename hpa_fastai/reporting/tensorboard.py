"""A finished run's summary in TensorBoard: what fastai's TensorBoardCallback does not log."""
from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from .. import plots
from ..errors import HPAError
from ..runs.files import read_metrics
from .html import class_names, fmt_value, num, per_class_rows
from .samples import valid_samples


logger = logging.getLogger(__name__)


def _tag(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def log_tensorboard_summary(run_dir, metrics: dict | None = None, samples: list[dict] | None = None,
                            n_images: int = 8) -> None:
    """Add what fastai's TensorBoardCallback does not log to the run's TensorBoard folder: the final
    macro/micro/samples F1, per-class F1 (one scalar per class, plus a table) and the worst
    validation mistakes as one image with their true and predicted labels. Step: epochs run."""
    from torch.utils.tensorboard import SummaryWriter

    run_dir = Path(run_dir)
    metrics = metrics if metrics is not None else read_metrics(run_dir)
    epochs = metrics.get("epochs_run", 0)
    step = int(epochs) if num(epochs, "d") != "-" else 0
    names = class_names(run_dir, metrics)
    with SummaryWriter(log_dir=str(run_dir / "tensorboard")) as writer:
        for key in ("f1_macro", "f1_micro", "f1_samples", "f1_macro_tuned", "f1_micro_tuned", "f1_samples_tuned",
                    "f1_macro_tuned_oos", "f1_micro_tuned_oos", "f1_samples_tuned_oos"):
            if num(metrics.get(key)) != "-":
                writer.add_scalar(f"final/{key}", metrics[key], step)
        rows = ["| class | name | threshold | precision | recall | F1 | support |", "|---|---|---|---|---|---|---|"]
        for r in per_class_rows(metrics):
            cls, name = fmt_value(r["class"]), fmt_value(r["name"]).replace("|", "\\|")
            if r["f1"] is not None:
                writer.add_scalar(f"per_class_f1/{num(r['class'], '02d')}_{_tag(name)}", r["f1"], step)
            rows.append(f"| {cls} | {name} | {num(r['threshold'], '.3f')} | {num(r['precision'], '.3f')} | "
                        f"{num(r['recall'], '.3f')} | {num(r['f1'], '.3f')} | {num(r['support'], '.0f')} |")
        writer.add_text("per_class", "\n".join(rows), step)
        if samples is None:
            try:
                samples = valid_samples(run_dir, n_images)
            except HPAError as e:
                logger.info(f"note: no sample images in TensorBoard: {e}")
                samples = []
        if samples:
            def label_text(indices):
                return ", ".join(names[c] for c in indices) or "-"
            titles = [f"{s['id']}\ntrue: {label_text(s['true'])}\npred: {label_text(s['predicted'])}" for s in samples]
            with tempfile.TemporaryDirectory() as tmp:
                grid = plots.sample_grid_plot(Path(tmp) / "mistakes.png", [s["image"] for s in samples], titles)
                image = np.asarray(Image.open(grid).convert("RGB"))
            writer.add_image("valid/worst_mistakes", image, step, dataformats="HWC")
