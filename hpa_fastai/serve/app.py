"""``run.py serve``: a Gradio page on a trained model's safe export. A person drops one RGB image, or
the four stain files of one HPA image (or clicks one of the example images), sees it, and sees the
predicted labels with their names, every class's probability and threshold, and a class activation
map per predicted class; TTA on or off.

What the page does with an upload is ``answer`` (plain Python, tested without a browser); Gradio
only lays it out. Bad input (the wrong number of files, a text file, a 16-bit image, a huge image)
becomes one message on the page, styled as an error, that names the uploaded file by its own name,
and the server goes on serving. Uploads are bounded in bytes by Gradio and in pixels here, from the image header, before
anything is decoded. Every text that comes from a file (class names, file names) is escaped before
it reaches the page's Markdown.

What the server keeps on disk lives in its own temporary folder (``tempfolder``): an upload until it
is answered, the heatmaps a page shows until the page shows others or closes, all of it within a cap
(the oldest go first), and nothing after the server stops.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from .. import plots
from ..config import MAX_SIZE
from ..data.images import read_image
from ..data.layouts import CHANNEL_SETS, CHANNELS, key_files, scan_images
from ..errors import HPAError
from ..paths import SAMPLE_DIR
from .tempfolder import TempFolder, UploadCap

logger = logging.getLogger(__name__)

INSTALL = "pip install 'hpa_fastai[serve]'"
MAX_UPLOAD_BYTES = 64 * 1024 * 1024  # a 4096 px RGB PNG of noise is 50 MB; real HPA stain files are 1-3 MB
MAX_SIDE = MAX_SIZE  # pixels a side, read from the header before decoding
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
# What the server holds on disk at once (uploads and heatmaps): room for a few pages' worth of
# full-size HPA uploads (four stain files of at most 64 MiB) and their heatmaps.
MAX_HELD_BYTES = 512 * 2**20
MAX_HELD_FILES = 500
KEEP_SECONDS = 3600  # the longest any upload or heatmap stays
PREVIEW_SIDE = 256  # the side an uploaded image is shown at (small model inputs enlarged, large images reduced)
MAX_EXAMPLES = 8
TABLE_COLUMNS = ["class", "name", "probability", "threshold", "predicted"]
# the page's own styles: an error looks like one; an uploaded file's whole name shows (Gradio cuts a
# long name's end, where an HPA stain file says which stain it is)
CSS = """
#error .input-error { border: 1px solid #cf222e; border-radius: 6px; background: #ffebe9; color: #82071e; padding: .6em .9em; }
#upload .filename .stem { white-space: normal; overflow-wrap: anywhere; text-overflow: clip; }
"""


@dataclass
class Answer:
    """What the page shows for one upload: a Markdown verdict (``error``: why the input cannot be
    read), the probabilities (top ones for a bar chart, and a table of every class), heatmap panels
    with captions, and the image as the model saw it."""
    verdict: str
    top: dict = field(default_factory=dict)
    table: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=TABLE_COLUMNS))
    heatmaps: list = field(default_factory=list)
    error: str | None = None  # the plain text of why the input cannot be read
    image: np.ndarray | None = None


def md_escape(text) -> str:
    """``text`` shown literally in Markdown: HTML escaped, and every Markdown punctuation mark
    backslash-escaped (a class name or file name must not become a link, an image or a heading)."""
    text = str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|~])", r"\\\1", text)


def gone(name: str) -> HPAError:
    return HPAError(f"{name}: no longer on the server (an upload is deleted once it is answered, when its page "
                    "closes, after an hour, or when the server needs the room); drop it again")


def check_upload(path: Path, name: str) -> None:
    """One uploaded file, from its size and header only: a readable image of at most ``MAX_SIDE``
    pixels a side. Mode and stain checks follow when the image is read."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise gone(name) from None
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
    """The one image the uploaded ``files`` make for a model of ``channels``: checked, linked (or
    copied) into ``workdir`` under their own names, and read as ``predict`` reads a folder."""
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
        try:
            try:  # the uploads and the scratch folder share the app's temporary folder: no second copy
                os.link(f, workdir / f.name)
            except FileNotFoundError:
                raise
            except OSError:
                shutil.copyfile(f, workdir / f.name)
        except FileNotFoundError:
            raise gone(f.name) from None
    items = scan_images(workdir, channels)
    if len(items) != 1:
        raise HPAError(f"these files are not the four stains of one image: {', '.join(names)}")
    return items


def own_names(message: str, files, workdir: Path) -> str:
    """``message`` with every path of an uploaded file or of its scratch copy replaced by the file's
    own name: the page names only what the person uploaded."""
    paths = {}
    for f in map(Path, files or []):
        paths[str(f)] = paths[str(f.absolute())] = f.name
    for folder in {str(workdir), str(workdir.resolve())}:
        paths[folder + os.sep] = ""
    for path in sorted(paths, key=len, reverse=True):  # a folder's path is a prefix of its files'
        message = message.replace(path, paths[path])
    return message


def answer(pred, files, tta: bool = False, scratch: Path | None = None) -> Answer:
    """Labels, probabilities and heatmaps for an upload, or the reason it cannot be read. The files
    are linked or copied into a folder under ``scratch`` (the system temp folder by default), removed
    on return."""
    from ..inference.cam import explain

    with tempfile.TemporaryDirectory(prefix="hpa-upload-", dir=scratch, ignore_cleanup_errors=True) as tmp:
        workdir = Path(tmp)
        try:
            items = uploaded_items(files, pred.channels, workdir)
            (e,) = explain(pred, items, tta="mean" if tta else None, bs=1)
        except HPAError as err:
            message = own_names(str(err), files, workdir)
            return Answer(f"**Cannot read this input.** {md_escape(message)}", error=message)
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
    heatmaps = []
    for c, heat in zip(e.classes, e.heatmaps):
        # an all-zero map: nothing in the image speaks for the class (explain says the same)
        where = "where the model saw it" if heat.max() > 0 else "no region speaks for it"
        heatmaps.append((plots.cam_panel(e.image, plots.heatmap_overlay(e.image, heat), f"{names[c]} (class {c})\n"
                                         f"p = {e.probs[c]:.2f}, threshold {thresholds[c]:.2f}, {where}"),
                         f"{names[c]}: {where}"))
    top = {f"{c} {names[c]}": float(e.probs[c]) for c in order[:5]}
    return Answer(verdict, top, table, heatmaps, image=e.image)


def shown_size(rgb: np.ndarray, side: int = PREVIEW_SIDE) -> np.ndarray:
    """``rgb`` enlarged by whole pixels (a small model input stays sharp) or reduced to about ``side``."""
    image = Image.fromarray(rgb)
    longest = max(image.size)
    if longest < side:
        scale = -(-side // longest)
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    elif longest > side:
        image.thumbnail((side, side))
    return np.asarray(image)


def preview(pred, files, scratch: Path | None = None) -> np.ndarray | None:
    """The uploaded image as a person sees it (RGBY in false colour, yellow as red + green); None
    while the files do not make one image the model reads (three stains of four, a text file)."""
    with tempfile.TemporaryDirectory(prefix="hpa-preview-", dir=scratch, ignore_cleanup_errors=True) as tmp:
        try:
            items = uploaded_items(files, pred.channels, Path(tmp))
            image = read_image(items["key"].iloc[0], CHANNEL_SETS[pred.channels])
        except HPAError:
            return None
    return shown_size(plots.false_colour(image))


def example_images(folder, channels: str, limit: int = MAX_EXAMPLES) -> list[tuple[str, list[Path]]]:
    """(name, files) of up to ``limit`` images in ``folder`` that a model of ``channels`` reads: one
    file each for RGB, the four stain files for RGBY."""
    try:
        items = scan_images(Path(folder), channels)
    except HPAError:
        return []
    return [(str(image_id), [Path(f) for f in key_files(key, CHANNEL_SETS[channels])])
            for image_id, key in zip(items["id"][:limit], items["key"][:limit])]


def default_examples(pred):
    """The bundled sample's test images, for a model of Zero-to-GANs RGB images; None otherwise."""
    return SAMPLE_DIR / "test" if pred.format == "z2g" and pred.channels == "rgb" else None


def describe(pred) -> str:
    meta = pred.meta
    stains = "one RGB image" if pred.channels == "rgb" else "the four stain files of one image ({id}_red, _green, " \
                                                            "_blue, _yellow)"
    return (f"**Model** {md_escape(meta['arch'])}, {md_escape(meta['format'])} classes ({len(pred.names)}), "
            f"{md_escape(pred.channels)} at {meta['size']} px, from {md_escape(pred.source)}.  \n"
            f"**Drop** {md_escape(stains)}, then press Predict. The server deletes the files once it has answered.")


def heatmap_files(folder: TempFolder, heatmaps) -> list[tuple[str, str]] | None:
    """The heatmap panels written as PNG files into ``folder`` for the page's gallery, as (path,
    caption); None when the folder has no room for them. The app writes them itself, rather than
    handing Gradio the arrays, to know their paths: they are deleted when the page moves on."""
    encoded = []
    for panel, caption in heatmaps:
        buffer = io.BytesIO()
        Image.fromarray(panel).save(buffer, "PNG")
        encoded.append((buffer.getvalue(), caption))
    paths = folder.write("heatmaps", [data for data, _ in encoded], ".png")
    return None if paths is None else [(str(path), caption) for path, (_, caption) in zip(paths, encoded)]


def upload_paths(value) -> list[Path]:
    """The server-side paths in a ``gr.File`` value that Gradio did not preprocess (its FileData
    dicts)."""
    return [Path(f["path"] if isinstance(f, dict) else f) for f in value or []]


def error_html(message: str) -> str:
    """Why an input cannot be read, as the page's error box (the text escaped: it names files)."""
    import html

    return f'<div class="input-error" role="alert"><b>Cannot read this input.</b> {html.escape(message)}</div>'


def image_file(folder: TempFolder, kind: str, rgb: np.ndarray) -> str | None:
    """``rgb`` as a PNG written into ``folder`` (under ``kind``), for an image component; None without room."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "PNG")
    paths = folder.write(kind, [buffer.getvalue()], ".png")
    return None if paths is None else str(paths[0])


def build_app(pred, folder: TempFolder, keep_seconds: int = KEEP_SECONDS, examples=None):
    """The Gradio page for ``pred``, with the images of the folder ``examples`` to click. Gradio must
    write into ``folder`` (``GRADIO_TEMP_DIR``, see ``gradio_temp_dir``) when this is called and when
    the page is launched. Files older than ``keep_seconds`` are deleted, whether or not a page still
    shows them."""
    import gradio as gr

    offered = example_images(examples, pred.channels) if examples is not None else []

    def session_of(request) -> str | None:
        return getattr(request, "session_hash", None)

    def shown_image(session, rgb):
        """The page's image: written into the folder, held for the session (its earlier one goes)."""
        path = image_file(folder, "previews", rgb) if rgb is not None else None
        folder.hold_for(session, "previews", [path] if path else [])
        return path

    def on_files(value, request):
        session, uploads = session_of(request), upload_paths(value)
        folder.hold_for(session, "uploads", uploads)
        if not uploads:  # answered (the list is cleared) or emptied: the page keeps the image it shows
            return gr.update()
        with folder.in_use(uploads):
            return shown_image(session, preview(pred, uploads, folder.scratch_dir))

    def on_example(index, request):
        """The example's files copied into the folder as an upload of the page's own: answered and
        deleted as uploads are, while the originals stay where they are."""
        name, files = offered[int(index)]
        copies = folder.write("examples", [f.read_bytes() for f in files], names=[f.name for f in files])
        if copies is None:
            raise gr.Error("the server holds as much as it can right now; try again in a moment")
        return [str(path) for path in copies]

    def on_unload(request):
        folder.end_session(session_of(request))

    def on_predict(value, tta, request):
        session, uploads = session_of(request), upload_paths(value)
        try:
            with folder.in_use(uploads):
                result = answer(pred, uploads, bool(tta), scratch=folder.scratch_dir)
        finally:  # answered: the person's images leave the disk, and the page's upload list is cleared
            folder.delete(uploads)
        shown = heatmap_files(folder, result.heatmaps) if result.heatmaps else []
        if shown is None:
            shown = []
            result.verdict += "\n\n*(No heatmaps: the server holds as much as it can right now; try again later.)*"
        folder.hold_for(session, "heatmaps", [path for path, _ in shown])  # the page's earlier ones go
        image = shown_image(session, None if result.image is None else shown_size(result.image))
        if result.error is not None:  # shown as an error, not as an answer
            return "", error_html(result.error), None, result.table, [], None, image
        return result.verdict, "", result.top or None, result.table, shown, None, image

    # Gradio passes the request to a parameter annotated gr.Request; this module's annotations are
    # strings (from __future__) naming a gradio imported in this function, which it cannot resolve
    for handler in (on_files, on_example, on_unload, on_predict):
        handler.__annotations__ = {"request": gr.Request}
    # Gradio's own age-based cleanup catches what no page will clean up (a browser that vanished
    # without closing its page, a script's upload); the sessions and the cap cover the rest
    delete_cache = (min(60, keep_seconds), keep_seconds)
    with gr.Blocks(title="hpa_fastai", analytics_enabled=False, delete_cache=delete_cache) as app:
        gr.Markdown("## Human Protein Atlas: where is the protein?")
        gr.Markdown(describe(pred), elem_id="model")
        with gr.Row():
            with gr.Column(scale=1):
                files = gr.File(label="image, or the four stain files", file_count="multiple", elem_id="upload")
                if offered:
                    example_list = gr.Dataset(components=["textbox"], samples=[[n] for n, _ in offered],
                                              label="or click an example", type="index", elem_id="examples")
                tta = gr.Checkbox(label="TTA: average over the 8 flips and rotations", value=False, elem_id="tta")
                button = gr.Button("Predict", variant="primary", elem_id="predict")
            with gr.Column(scale=1):
                image = gr.Image(label="the image (RGBY in false colour)", type="filepath", interactive=False,
                                 elem_id="preview", height=PREVIEW_SIDE + 40)
            with gr.Column(scale=2):
                error = gr.HTML("", elem_id="error")
                verdict = gr.Markdown("No image yet.", elem_id="verdict")
                top = gr.Label(label="most probable classes", num_top_classes=5, elem_id="top")
        heatmaps = gr.Gallery(label="class activation maps (Grad-CAM)", columns=2, height="auto", object_fit="contain",
                              elem_id="heatmaps")
        table = gr.Dataframe(value=pd.DataFrame(columns=TABLE_COLUMNS), label="every class: probability and threshold",
                             interactive=False, elem_id="table")
        # preprocess=False: gr.File's own preprocessing (type="filepath") leaves an empty temporary
        # file in the cache for every file of every request (Gradio 6.31); its FileData carry the paths
        files.change(on_files, [files], [image], preprocess=False, queue=False, show_progress="hidden", api_name=False)
        if offered:
            example_list.click(on_example, [example_list], [files], queue=False, show_progress="hidden", api_name=False)
        button.click(on_predict, [files, tta], [verdict, error, top, table, heatmaps, files, image], preprocess=False,
                     api_name="predict", show_progress_on=[verdict])
        app.unload(on_unload)
    return app


@contextlib.contextmanager
def gradio_temp_dir(path: Path):
    """Gradio writes its uploads and cached files into ``path`` while this lasts; it reads
    ``GRADIO_TEMP_DIR`` when a component is made and when the server starts."""
    before = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(path)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = before


@contextlib.contextmanager
def stopped_by_signals():
    """SIGTERM and SIGHUP stop the server as Ctrl-C does (Gradio closes it on KeyboardInterrupt),
    so that the ``with`` blocks around it remove what it kept; Python's default would end the
    process on the spot."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise KeyboardInterrupt

    names = [name for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]
    before = {name: signal.signal(getattr(signal, name), stop) for name in names}
    try:
        yield
    finally:
        for name, handler in before.items():
            signal.signal(getattr(signal, name), handler)


def launch(app, folder: TempFolder, host: str, port: int, block: bool = True) -> None:
    """Serve ``app`` on ``host:port``; with ``block``, until Ctrl-C (or SIGTERM)."""
    import gradio as gr
    from starlette.middleware import Middleware

    # system fonts: the default theme would fetch its font from the internet on every page load
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    app.queue(default_concurrency_limit=1)  # one prediction at a time: the model is shared
    try:
        # quiet: Gradio's own start-up lines suggest share=True, which this app does not offer
        app.launch(server_name=host, server_port=port, max_file_size=MAX_UPLOAD_BYTES, share=False, theme=theme,
                   css=CSS, show_error=True, footer_links=[], prevent_thread_lock=not block, quiet=True,
                   app_kwargs={"middleware": [Middleware(UploadCap, folder=folder)]})
    except OSError as e:  # gradio's "Cannot find empty port", or an address this machine does not have
        reason = (str(e).splitlines() or [type(e).__name__])[0].split(". You can")[0]
        raise HPAError(f"--host {host} --port {port}: cannot listen there ({reason}); choose another --port") from None


def serve(learner, host: str = "127.0.0.1", port: int = 7860, examples=None) -> None:
    """Load ``learner``'s safe export and serve the page until Ctrl-C or SIGTERM, offering the images
    of the folder ``examples`` (default: the bundled sample's test images, where the model reads
    them); what it kept on disk is removed when it stops."""
    import importlib.util

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no usage reports from a local tool
    if importlib.util.find_spec("gradio") is None:
        raise HPAError(f"hpa-fastai serve needs gradio: {INSTALL}")
    if examples is not None and not Path(examples).is_dir():
        raise HPAError(f"--examples {examples}: not a folder of images")
    from ..inference.loading import load_predictor
    from ..inference.predictor import Ensemble

    pred = load_predictor(learner)  # the safe export; an export.pkl is refused (no --trust here)
    if isinstance(pred, Ensemble):
        raise HPAError(f"--learner {learner}: serve shows one model's heatmaps; pass one run folder, e.g. "
                       f"{pred.members[0].source}")
    # gradio is first imported here: some of its modules read GRADIO_TEMP_DIR on import. The signal
    # handlers are restored before the folder is removed, so a second SIGTERM cannot cut that short.
    examples = Path(examples) if examples is not None else default_examples(pred)
    with TempFolder(MAX_HELD_BYTES, MAX_HELD_FILES) as folder, stopped_by_signals(), gradio_temp_dir(folder.path):
        app = build_app(pred, folder, examples=examples)
        logger.info(f"serving {pred.source} ({pred.meta['arch']}, {pred.channels}) at http://{host}:{port} (Ctrl-C stops); "
            f"uploads and heatmaps are kept in {folder.path} and removed when it stops")
        launch(app, folder, host, port)
