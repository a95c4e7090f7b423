"""``run.py serve``: a Gradio page on a trained model's safe export. A person drops one RGB image, or
the four stain files of one HPA image, and sees the predicted labels with their names, every
class's probability and threshold, and a class activation map per predicted class; TTA on or off.

What the page does with an upload is ``answer`` (plain Python, tested without a browser); Gradio
only lays it out. Bad input (the wrong number of files, a text file, a 16-bit image, a huge image)
becomes one message on the page, and the server goes on serving. Uploads are bounded in bytes by
Gradio and in pixels here, from the image header, before anything is decoded. Every text that comes
from a file (class names, file names) is escaped before it reaches the page's Markdown.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from .. import plots
from ..config import MAX_SIZE
from ..data.layouts import CHANNELS, scan_images
from ..errors import HPAError

logger = logging.getLogger(__name__)

GRADIO_VERSION = "6.31.0"
INSTALL = (f"pip install -e '.[serve]' && pip install --no-deps gradio=={GRADIO_VERSION}  "
           "(gradio declares pillow<13; it runs with this project's pillow 13)")
MAX_UPLOAD_BYTES = 64 * 1024 * 1024  # a 4096 px RGB PNG of noise is 50 MB; real HPA stain files are 1-3 MB
MAX_SIDE = MAX_SIZE  # pixels a side, read from the header before decoding
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


@dataclass
class Answer:
    """What the page shows for one upload: a Markdown verdict, the probabilities (top ones for a
    bar chart, and a table of every class), and heatmap panels with captions."""
    verdict: str
    top: dict = field(default_factory=dict)
    table: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(
        columns=["class", "name", "probability", "threshold", "predicted"]))
    heatmaps: list = field(default_factory=list)


def md_escape(text) -> str:
    """``text`` shown literally in Markdown: HTML escaped, and every Markdown punctuation mark
    backslash-escaped (a class name or file name must not become a link, an image or a heading)."""
    text = str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|~])", r"\\\1", text)


def check_upload(path: Path, name: str) -> None:
    """One uploaded file, from its size and header only: a readable image of at most ``MAX_SIDE``
    pixels a side. Mode and stain checks follow when the image is read."""
    size = path.stat().st_size
    if size > MAX_UPLOAD_BYTES:
        raise HPAError(f"{name}: {size / 2**20:.0f} MiB; the app takes files up to {MAX_UPLOAD_BYTES // 2**20} MiB")
    try:
        with Image.open(path) as im:
            width, height = im.size
    except Image.DecompressionBombError:
        raise HPAError(f"{name}: too many pixels to decode safely; the app reads images up to {MAX_SIDE} pixels "
                       "a side") from None
    except (OSError, SyntaxError, ValueError):
        raise HPAError(f"{name}: not a readable image (PNG, JPEG or TIFF)") from None
    if max(width, height) > MAX_SIDE:
        raise HPAError(f"{name}: {width}x{height} pixels; the app reads images up to {MAX_SIDE} pixels a side "
                       "(resize it first)")


def uploaded_items(files, channels: str, workdir: Path) -> pd.DataFrame:
    """The one image the uploaded ``files`` make for a model of ``channels``: copied into
    ``workdir`` under their own names, checked, and read as ``predict`` reads a folder."""
    files = [Path(f) for f in (files or [])]
    names = [f.name for f in files]
    if not files:
        raise HPAError("no image: drop one RGB image, or the four stain files of one HPA image")
    if channels == "rgb" and len(files) != 1:
        raise HPAError(f"this model reads one RGB image at a time; got {len(files)} files ({', '.join(names)})")
    if channels == "rgby" and len(files) != 4:
        raise HPAError(f"this model reads the four stain files of one HPA image ({{id}}_red, _green, _blue and "
                       f"_yellow); got {len(files)} file(s): {', '.join(names)}")
    if len(set(names)) != len(names):
        raise HPAError(f"two uploaded files have the same name ({', '.join(names)})")
    if channels == "rgby":
        parts = [f.stem.rpartition("_") for f in files]
        if len({image_id for image_id, _, _ in parts}) != 1 or {stain for _, _, stain in parts} != set(CHANNELS):
            raise HPAError(f"these files are not the four stains of one image ({{id}}_red, _green, _blue and "
                           f"_yellow): {', '.join(names)}")
    for f in files:
        check_upload(f, f.name)
        if f.suffix.lower() not in IMAGE_SUFFIXES:
            raise HPAError(f"{f.name}: not an image file name (.png, .jpg, .tif); rename it")
        shutil.copyfile(f, workdir / f.name)
    items = scan_images(workdir, channels)
    if len(items) != 1:
        raise HPAError(f"these files are not the four stains of one image: {', '.join(names)}")
    return items


def answer(pred, files, tta: bool = False) -> Answer:
    """Labels, probabilities and heatmaps for an upload, or the reason it cannot be read."""
    from ..inference.cam import explain

    with tempfile.TemporaryDirectory(prefix="hpa-serve-") as tmp:
        workdir = Path(tmp)
        try:
            items = uploaded_items(files, pred.channels, workdir)
            (e,) = explain(pred, items, tta="mean" if tta else None, bs=1)
        except HPAError as err:  # messages name the copy in the scratch folder: show the file's own name
            message = str(err).replace(str(workdir) + os.sep, "")
            return Answer(f"**Cannot read this input.** {md_escape(message)}")
    names, thresholds = pred.names, pred.thresholds
    order = np.argsort(-e.probs, kind="stable")
    table = pd.DataFrame({"class": order, "name": [names[c] for c in order],
                          "probability": e.probs[order].round(4), "threshold": thresholds[order].round(3),
                          "predicted": ["yes" if c in e.predicted else "" for c in order]})
    if e.predicted:
        lines = [f"- **{md_escape(names[c])}** (class {c}): probability {e.probs[c]:.2f}, threshold "
                 f"{thresholds[c]:.2f}" for c in sorted(e.predicted, key=lambda c: -e.probs[c])]
        verdict = f"### Predicted for {md_escape(e.id)}{' (TTA)' if tta else ''}\n" + "\n".join(lines)
    else:
        c = e.classes[0]
        verdict = (f"### No class reaches its threshold for {md_escape(e.id)}\nThe most probable is "
                   f"**{md_escape(names[c])}** (class {c}): probability {e.probs[c]:.2f}, threshold {thresholds[c]:.2f}.")
    heatmaps = [(plots.cam_panel(e.image, plots.heatmap_overlay(e.image, heat), f"{names[c]} (class {c})\n"
                                 f"p = {e.probs[c]:.2f}, threshold {thresholds[c]:.2f}"),
                 f"{names[c]}: where the model saw it")
                for c, heat in zip(e.classes, e.heatmaps)]
    top = {f"{c} {names[c]}": float(e.probs[c]) for c in order[:5]}
    return Answer(verdict, top, table, heatmaps)


def describe(pred) -> str:
    meta = pred.meta
    stains = "one RGB image" if pred.channels == "rgb" else "the four stain files of one image ({id}_red, _green, " \
                                                            "_blue, _yellow)"
    return (f"**Model** {md_escape(meta['arch'])}, {md_escape(meta['format'])} classes ({len(pred.names)}), "
            f"{md_escape(pred.channels)} at {meta['size']} px, from {md_escape(pred.source)}.  \n"
            f"**Drop** {md_escape(stains)}, then press Predict.")


def build_app(pred):
    """The Gradio page for ``pred``."""
    import gradio as gr

    def on_predict(files, tta):
        result = answer(pred, files, tta)
        return result.verdict, result.top or None, result.table, result.heatmaps

    with gr.Blocks(title="hpa_fastai", analytics_enabled=False) as app:
        gr.Markdown("## Human Protein Atlas: where is the protein?")
        gr.Markdown(describe(pred), elem_id="model")
        with gr.Row():
            with gr.Column(scale=1):
                files = gr.File(label="image, or the four stain files", file_count="multiple", elem_id="upload")
                tta = gr.Checkbox(label="TTA: average over the 8 flips and rotations", value=False, elem_id="tta")
                button = gr.Button("Predict", variant="primary", elem_id="predict")
            with gr.Column(scale=2):
                verdict = gr.Markdown("No image yet.", elem_id="verdict")
                top = gr.Label(label="most probable classes", num_top_classes=5, elem_id="top")
        heatmaps = gr.Gallery(label="class activation maps (Grad-CAM)", columns=2, height="auto", object_fit="contain",
                              elem_id="heatmaps")
        table = gr.Dataframe(label="every class: probability and threshold", interactive=False, elem_id="table")
        button.click(on_predict, [files, tta], [verdict, top, table, heatmaps])
    return app


def serve(learner, host: str = "127.0.0.1", port: int = 7860) -> None:
    """Load ``learner``'s safe export and serve the page until Ctrl-C."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no usage reports from a local tool
    try:
        import gradio as gr
    except ImportError:
        raise HPAError(f"run.py serve needs gradio: {INSTALL}") from None
    from ..inference.loading import load_predictor
    from ..inference.predictor import Ensemble

    pred = load_predictor(learner)  # the safe export; an export.pkl is refused (no --trust here)
    if isinstance(pred, Ensemble):
        raise HPAError(f"--learner {learner}: serve shows one model's heatmaps; pass one run folder, e.g. "
                       f"{pred.members[0].source}")
    app = build_app(pred)
    logger.info(f"serving {pred.source} ({pred.meta['arch']}, {pred.channels}) at http://{host}:{port} (Ctrl-C stops)")
    # system fonts: the default theme would fetch its font from the internet on every page load
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    app.queue(default_concurrency_limit=1)  # one prediction at a time: the model is shared
    try:
        app.launch(server_name=host, server_port=port, max_file_size=MAX_UPLOAD_BYTES, share=False, theme=theme,
                   show_error=True, footer_links=[])
    except OSError as e:  # gradio's "Cannot find empty port", or an address this machine does not have
        reason = (str(e).splitlines() or [type(e).__name__])[0].split(". You can")[0]
        raise HPAError(f"--host {host} --port {port}: cannot listen there ({reason}); choose another --port") from None

