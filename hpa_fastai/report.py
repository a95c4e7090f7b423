"""Run reports for people: a self-contained ``report.html`` per run, a page comparing runs, and a
summary of the finished run in TensorBoard.

The pages are plain HTML with an inline stylesheet and every image inlined as a base64 data URI:
one file that can be mailed, archived or opened offline, and that makes no network request.
Everything comes from the run folder's files; the validation image grid also reads the training
images named in ``valid_predictions.csv``, and says so on the page when they are gone.

A run folder can come from someone else, so nothing read from it reaches a page unescaped: pages
are built from ``Markup`` fragments whose ``format`` escapes every argument (Jinja's autoescaping,
without the templates), numbers from the files are shown only if they are numbers, and the image
grid reads only regular files inside the data folder that the run's config.json records.
"""
from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import stat
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from markupsafe import Markup
from PIL import Image

from . import plots
from ._io import write_text
from ._outputs import check_output
from .console import log
from .errors import HPAError
from .runs import format_seconds, read_json, run_summary

N_SAMPLES = 16
THUMBNAIL = 128
CONFIG_COLUMNS = 3
MAX_LABELS = 6  # labels listed under an image; an untrained model can predict dozens

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       color: #1f2328; background: #fff; margin: 0 auto; max-width: 1140px; padding: 1.5rem 2rem 4rem;
       line-height: 1.45; }
h1 { font-size: 1.6rem; margin: 0 0 .3rem; }
h2 { font-size: 1.25rem; margin: 2.2rem 0 .6rem; padding-bottom: .25rem; border-bottom: 1px solid #d0d7de; }
.sub { color: #59636e; margin: 0 0 1rem; }
.summary { background: #f6f8fa; border: 1px solid #d0d7de; border-radius: 6px; padding: .8rem 1rem;
           font-size: 1.05rem; }
.summary b { font-variant-numeric: tabular-nums; }
nav { margin: 1rem 0; font-size: .95rem; }
nav a { margin-right: 1rem; color: #0969da; text-decoration: none; }
table { border-collapse: collapse; font-size: .9rem; margin: .4rem 0 1rem; }
th, td { border: 1px solid #d0d7de; padding: .25rem .6rem; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #fbfcfd; }
tr.differs td { background: #fff8c5; }
tr.absent td { color: #8c959f; }
td.best { font-weight: 700; }
.note { color: #59636e; font-size: .9rem; }
img.plot { max-width: 100%; height: auto; border: 1px solid #d0d7de; border-radius: 4px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(190px, 1fr)); gap: .8rem; }
figure { margin: 0; border: 1px solid #d0d7de; border-radius: 6px; padding: .4rem; background: #fff; }
figure img { display: block; width: 176px; height: 176px; margin: 0 auto .3rem; }
figcaption { font-size: .78rem; line-height: 1.3; }
figcaption .id { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; color: #59636e; }
.ok { color: #1a7f37; }
.missed { color: #cf222e; text-decoration: line-through; }
.wrong { color: #bc4c00; font-weight: 600; }
"""


# --- small HTML helpers ------------------------------------------------------------------------

def num(value, spec: str = "") -> str:
    """A number read from a run file, formatted with ``spec``; "-" for anything else (text, a list,
    NaN), so a hand-edited file shows a gap instead of breaking the page."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-"
    try:
        return format(value, spec) if math.isfinite(value) else "-"
    except (OverflowError, ValueError):  # a huge JSON integer, or an integer spec for a float
        return "-"


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def img_tag(png: bytes, alt: str, cls: str = "plot") -> Markup:
    return Markup('<img class="{}" alt="{}" src="{}">').format(cls, alt, data_uri(png))


def array_png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def figure_png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def fmt_value(v) -> str:
    """A config or metric value as a short string: floats to 4 significant digits, lists inline."""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(fmt_value(x) for x in v) + "]"
    if v is None:
        return "-"
    return str(v)


def html_table(header: list[str], rows: list[list], numeric: set[int] = frozenset(),
               row_classes: list[str] | None = None) -> Markup:
    """A table; ``numeric`` column indices are right-aligned. Every cell is escaped, except the
    ``Markup`` fragments a caller built on purpose (a bold best value, a bar)."""
    out = [Markup("<table>"), Markup("<tr>{}</tr>").format(Markup("").join(
        Markup("<th>{}</th>").format(h) for h in header))]
    for r, row in enumerate(rows):
        cls = Markup(' class="{}"').format(row_classes[r]) if row_classes and row_classes[r] else ""
        cells = Markup("").join(Markup("<td{}>{}</td>").format(Markup(" class=num") if i in numeric else "", c)
                                for i, c in enumerate(row))
        out.append(Markup("<tr{}>{}</tr>").format(cls, cells))
    out.append(Markup("</table>"))
    return Markup("\n").join(out)


def page(title: str, body: Markup) -> str:
    return str(Markup("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
                      "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
                      "<title>{}</title>\n<style>{}</style>\n</head>\n<body>\n{}\n</body>\n</html>\n")
               .format(title, Markup(CSS), body))


def section(anchor: str, title: str, content: Markup) -> Markup:
    return Markup('<h2 id="{}">{}</h2>\n{}').format(anchor, title, content)


def note(text: str) -> Markup:
    return Markup('<p class="note">{}</p>').format(text)


# --- reading a run ----------------------------------------------------------------------------

def check_run_dir(path) -> Path:
    """``path`` as a run folder, or an HPAError naming it."""
    path = Path(path)
    if not path.exists():
        raise HPAError(f"{path}: run folder not found")
    if not path.is_dir():
        raise HPAError(f"{path}: not a run folder (a file)")
    if not (path / "config.json").is_file():
        raise HPAError(f"{path}: not a run folder (no config.json)")
    try:
        json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise HPAError(f"{path / 'config.json'}: unreadable ({e})") from None
    return path


def run_label(run_dir: Path) -> str:
    """The run's name (the link ``latest`` resolved to the folder it points at)."""
    return run_dir.resolve().name


def read_history(run_dir: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(run_dir / "history.csv")
    except (OSError, ValueError):
        return pd.DataFrame()


def read_valid_predictions(run_dir: Path) -> pd.DataFrame:
    path = run_dir / "valid_predictions.csv"
    if not path.is_file():
        raise HPAError(f"{path} not found (runs trained before this file existed have no image grid)")
    # dtype=str: a single label such as "3" must stay text, like "3 7"
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def valid_samples(run_dir, n: int = N_SAMPLES, size: int = THUMBNAIL) -> list[dict]:
    """The ``n`` validation images the model got most wrong, worst first: each a dict with id, an RGB
    thumbnail (false colour for RGBY), the true and predicted class indices and the probabilities.

    "Most wrong" counts the labels the prediction gets wrong (missed or extra), then, among equal
    counts, how far the probabilities are from the truth; with fewer mistakes than ``n`` the grid
    fills up with the least certain correct ones."""
    from .data import labels_matrix, read_image  # torch and fastai: only when images are wanted
    from .formats import CHANNEL_SETS

    run_dir = Path(run_dir)
    preds_df = read_valid_predictions(run_dir)
    if preds_df.empty:
        return []
    config = read_json(run_dir / "config.json")
    channels = config.get("channels", "rgb")
    channels = CHANNEL_SETS.get(channels) if isinstance(channels, str) else None
    if channels is None:
        raise HPAError(f"{run_dir / 'config.json'}: 'channels' is not rgb or rgby, so no image is read")
    roots = image_folders(run_dir, config)
    try:
        probs = np.array([[float(p) for p in row.split()] for row in preds_df["probs"]], dtype=float)
        n_classes = probs.shape[1]
        targets = labels_matrix(preds_df["labels"], n_classes).astype(bool)
        preds = labels_matrix(preds_df["predicted"], n_classes).astype(bool)
        keys, ids = preds_df["key"], preds_df["id"]
    except (KeyError, ValueError, IndexError, AttributeError) as e:
        raise HPAError(f"{run_dir / 'valid_predictions.csv'}: not the validation predictions of a run "
                       f"({type(e).__name__}: {str(e)[:100]})") from None
    wrong = (preds != targets).sum(1) + np.abs(probs - targets).sum(1) / (n_classes + 1)
    order = np.argsort(-wrong, kind="stable")[:n]
    for i in order:  # every file checked before any is read
        check_image_files(keys.iloc[i], channels, roots)
    samples = []
    for i in order:
        rgb = plots.false_colour(read_image(keys.iloc[i], channels, size=size))
        samples.append({"id": ids.iloc[i], "image": rgb, "true": np.flatnonzero(targets[i]).tolist(),
                        "predicted": np.flatnonzero(preds[i]).tolist(), "probs": probs[i],
                        "mistakes": int((preds[i] != targets[i]).sum())})
    return samples


def image_folders(run_dir: Path, config: dict) -> list[Path]:
    """The folders the run read its images from, as its config.json records them: --data and any
    --extra-data. The image grid reads nothing outside them."""
    data, extra = config.get("data"), config.get("extra_data") or []
    folders = [data] + ([extra] if isinstance(extra, str) else extra if isinstance(extra, list) else [])
    if not isinstance(data, str) or not data:
        raise HPAError(f"{run_dir / 'config.json'}: records no data folder, so no image is read")
    return [Path(f).resolve() for f in folders if isinstance(f, str) and f]


def check_image_files(key, channels, roots: list[Path]) -> None:
    """Refuse an item key of valid_predictions.csv unless each of its files is a regular file inside
    one of ``roots``. The checks stat the files and never open them: opening a FIFO would block
    forever, and a key may name any readable file (a private image, a device)."""
    from .formats import key_files

    for f in key_files(str(key), channels):
        real = Path(f).resolve()  # links followed: a link inside the data folder may point out of it
        try:
            mode = os.stat(real).st_mode
        except FileNotFoundError:
            raise HPAError(f"{f}: image file not found") from None
        except OSError as e:
            raise HPAError(f"{f}: cannot read ({e.strerror or e})") from None
        if not any(real == root or root in real.parents for root in roots):
            raise HPAError(f"{f}: outside the data folder {roots[0]} that config.json records; not shown")
        if not stat.S_ISREG(mode):
            raise HPAError(f"{f}: not a regular file; not shown")


def class_names(run_dir: Path, metrics: dict) -> list[str]:
    per_class = metrics.get("per_class")
    if per_class and isinstance(per_class, list):
        return [str(row.get("name", "?")) if isinstance(row, dict) else "?" for row in per_class]
    names = read_json(run_dir / "model.json").get("names")
    if isinstance(names, list) and names:
        return [str(name) for name in names]
    from .vocab import NAMES

    return list(NAMES.get(str(read_json(run_dir / "model.json").get("format", "z2g")), NAMES["z2g"]))


# --- one run -------------------------------------------------------------------------------------

def summary_line(summary: dict, metrics: dict) -> Markup:
    if not metrics:
        after = Markup(" after {} epoch(s).").format(summary["epochs"]) if summary["epochs"] else "."
        return Markup("No validation metrics: the run is <b>{}</b>{}").format(summary["status"], after)
    return Markup("Best epoch <b>{}</b> of {} · macro F1 <b>{}</b> at threshold {}, <b>{}</b> with per-class "
                  "tuned thresholds · samples F1 {} / {} · status <b>{}</b> · {}").format(
        num(metrics.get("best_epoch")), num(metrics.get("epochs_run")), num(metrics.get("f1_macro"), ".4f"),
        num(metrics.get("threshold", 0.5), "g"), num(metrics.get("f1_macro_tuned"), ".4f"),
        num(metrics.get("f1_samples"), ".4f"), num(metrics.get("f1_samples_tuned"), ".4f"), summary["status"],
        format_seconds(summary["time"]))


def config_section(config: dict) -> Markup:
    # three setting/value pairs per row: the page opens on results, not on a screen of settings
    pairs = [[k, fmt_value(v)] for k, v in config.items()]
    pairs += [["", ""]] * (-len(pairs) % CONFIG_COLUMNS)
    rows = [sum(pairs[i:i + CONFIG_COLUMNS], []) for i in range(0, len(pairs), CONFIG_COLUMNS)]
    return section("config", "Configuration", note("As resolved by training (config.json): re-run with the "
                                                   "same values to reproduce the run.")
                   + html_table(["setting", "value"] * CONFIG_COLUMNS, rows))


def lr_find_section(run_dir: Path, config: dict) -> Markup:
    png = run_dir / "lr_find.png"
    if not png.is_file():
        return section("lr-find", "Learning-rate finder",
                       note(f"Not run: the learning rate was given (--lr {fmt_value(config.get('lr', '?'))})."))
    suggestions = read_json(run_dir / "lr_find.json").get("suggestions", {})
    rows = [[name, num(lr, ".3e")] for name, lr in suggestions.items()] if isinstance(suggestions, dict) else []
    used = config.get("lr_used")
    text = note(f"Loss against learning rate over a short mock training; the run used "
                f"{num(used, '.3e')} (the valley suggestion)." if isinstance(used, float) else "")
    return section("lr-find", "Learning-rate finder",
                   text + img_tag(png.read_bytes(), "lr_find plot") + html_table(["suggestion", "lr"], rows, {1}))


def curves_section(run_dir: Path, history: pd.DataFrame) -> Markup:
    parts = []
    png = run_dir / "curves.png"
    if png.is_file():
        parts.append(img_tag(png.read_bytes(), "loss and F1 per epoch"))
    else:
        parts.append(note("No curves.png: the run has not finished."))
    if len(history):
        specs = {"lr": "{:.2e}", "seconds": "{:.1f}"}
        cols = list(history.columns)
        rows = [[specs.get(c, "{:.4f}").format(v) if isinstance(v, float) else str(v) for c, v in zip(cols, r)]
                for r in history.itertuples(index=False)]
        parts.append(html_table(cols, rows, {i for i, c in enumerate(cols) if c != "phase"}))
    return section("curves", "Loss and F1 per epoch", Markup("\n").join(parts))


def per_class_rows(metrics: dict) -> list[dict]:
    """metrics.json's per-class rows, each with the keys the pages show (a value that is missing or
    not of its type is None, and shown as "-")."""
    rows = metrics.get("per_class")
    return [{"class": r.get("class"), "name": r.get("name"), **{k: r.get(k) if num(r.get(k)) != "-" else None
             for k in ("threshold", "precision", "recall", "f1", "support")}}
            for r in (rows if isinstance(rows, list) else []) if isinstance(r, dict)]


def per_class_section(run_dir: Path, metrics: dict) -> Markup:
    if not per_class_rows(metrics):
        return section("per-class", "Per class", note("No metrics.json: the run has not finished."))
    rows, classes = [], []
    for r in per_class_rows(metrics):
        pct = max(0.0, min(100.0, 100 * (r["f1"] or 0.0)))
        bar = Markup('<span style="display:inline-block;width:{}px;height:.7em;background:#54aeff"></span>').format(
            f"{pct:.0f}")
        rows.append([fmt_value(r["class"]), fmt_value(r["name"]), num(r["threshold"], ".3f"),
                     num(r["precision"], ".3f"), num(r["recall"], ".3f"), num(r["f1"], ".3f"), bar,
                     num(r["support"], ".0f")])
        classes.append("absent" if r["support"] == 0 else "")
    table = html_table(["class", "name", "threshold", "precision", "recall", "F1", "", "support"], rows,
                       {0, 2, 3, 4, 5, 7}, classes)
    text = note(f"On the {fmt_value(metrics.get('valid_images', '?'))} validation images, each class at its own "
                "tuned threshold. Support is the number of validation images with the class; greyed rows have "
                "none, so their scores say nothing.")
    png = run_dir / "per_class_f1.png"
    bars = img_tag(png.read_bytes(), "per-class F1 bars") if png.is_file() else ""
    return section("per-class", "Per class: precision, recall, F1", text + table + bars)


def samples_section(run_dir: Path, names: list[str], rgby: bool) -> Markup:
    try:
        samples = valid_samples(run_dir)
    except HPAError as e:
        return section("samples", "Validation images", note(f"Not available: {e}"))
    if not samples:
        return section("samples", "Validation images", note("No validation images."))

    def labels(indices, other, cls_in, cls_out, probs=None, most=MAX_LABELS):
        if probs is not None:  # right ones first, then most probable first: a cut list keeps what matters
            indices = sorted(indices, key=lambda c: (c not in other, -probs[c]))
        spans = []
        for c in indices[:most]:
            p = f" {probs[c]:.2f}" if probs is not None else ""
            cls = cls_in if c in other else cls_out
            spans.append(Markup('<span class="{}">{}{}</span>').format(cls, names[c] if c < len(names) else c, p))
        more = f" and {len(indices) - most} more" if len(indices) > most else ""
        return (Markup(", ").join(spans) or "-") + more

    figures = []
    for s in samples:
        caption = Markup('<span class="id">{}</span> · {} label(s) wrong<br>true: {}<br>predicted: {}').format(
            s["id"], s["mistakes"], labels(s["true"], s["predicted"], "ok", "missed"),
            labels(s["predicted"], s["true"], "ok", "wrong", s["probs"]))
        figures.append(Markup("<figure>{}<figcaption>{}</figcaption></figure>").format(
            img_tag(array_png(s["image"]), str(s["id"]), "thumb"), caption))
    colour = "; RGBY in false colour, yellow as red + green" if rgby else ""
    text = Markup('<p class="note">The validation images the model got most wrong, worst first (tuned thresholds'
                  '{}). Labels: <span class="ok">correct</span>, <span class="missed">missed</span> (true, not '
                  'predicted), <span class="wrong">wrong</span> (predicted, not true); predicted labels show '
                  'their probability.</p>').format(colour)
    return section("samples", "Validation images, worst mistakes first",
                   text + Markup('<div class="grid">{}</div>').format(Markup("\n").join(figures)))


def render_report(run_dir: Path) -> str:
    config = read_json(run_dir / "config.json")
    metrics = read_json(run_dir / "metrics.json")
    summary = run_summary(run_dir)
    name = run_label(run_dir)
    history = read_history(run_dir)
    sub = Markup("{} on {} · {}, {} px · {} validation images").format(*(fmt_value(v) for v in (
        config.get("arch", "?"), config.get("data", "?"), config.get("channels", "?"), config.get("size", "?"),
        metrics.get("valid_images", "?"))))
    nav = Markup("").join(Markup('<a href="#{}">{}</a>').format(a, t) for a, t in [
        ("config", "Configuration"), ("lr-find", "Learning rate"), ("curves", "Curves"),
        ("per-class", "Per class"), ("samples", "Images")])
    tb = (note("TensorBoard logs: tensorboard/ in the run folder (tensorboard --logdir <run folder>).")
          if (run_dir / "tensorboard").is_dir() else "")
    body = Markup("\n").join([
        Markup("<h1>Run {}</h1>").format(name),
        Markup('<p class="sub">{}</p>').format(sub),
        Markup('<p class="summary">{}</p>').format(summary_line(summary, metrics)),
        tb,
        Markup("<nav>{}</nav>").format(nav),
        config_section(config),
        lr_find_section(run_dir, config),
        curves_section(run_dir, history),
        per_class_section(run_dir, metrics),
        samples_section(run_dir, class_names(run_dir, metrics), config.get("channels") == "rgby"),
    ])
    return page(f"Run {name}", body)


def write_report(run_dir, out=None) -> Path:
    """Write the run's report (default ``run_dir/report.html``); returns its path."""
    run_dir = check_run_dir(run_dir)
    return write_text(Path(out) if out else run_dir / "report.html", render_report(run_dir))


# --- several runs --------------------------------------------------------------------------------

def unique_labels(run_dirs: list[Path]) -> list[str]:
    labels = [run_label(d) for d in run_dirs]
    if len(set(labels)) < len(labels):  # same name in different folders: add the parent
        labels = [f"{d.resolve().parent.name}/{run_label(d)}" for d in run_dirs]
    return labels


def overlay_plot(histories: dict[str, pd.DataFrame]) -> bytes:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for label, h in histories.items():
        if "epoch" not in h:
            continue
        # numbers only: a hand-edited history.csv may hold text
        epoch, label = pd.to_numeric(h["epoch"], errors="coerce"), plots.plain_text(label)
        if "valid_loss" in h:
            ax1.plot(epoch, pd.to_numeric(h["valid_loss"], errors="coerce"), marker="o", label=label)
        if "f1_macro" in h:
            ax2.plot(epoch, pd.to_numeric(h["f1_macro"], errors="coerce"), marker="o", label=label)
    ax1.set(xlabel="epoch", ylabel="validation loss", title="validation loss")
    ax2.set(xlabel="epoch", ylabel="macro F1 (validation)", title="macro F1", ylim=(0, 1))
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=.3)
        if ax.lines:
            ax.legend(fontsize=8)
    return figure_png(fig)


def render_comparison(run_dirs: list[Path]) -> str:
    labels = unique_labels(run_dirs)
    summaries = [run_summary(d) for d in run_dirs]
    configs = [read_json(d / "config.json") for d in run_dirs]
    metrics = [read_json(d / "metrics.json") for d in run_dirs]

    best_f1 = max((s["f1_tuned"] for s in summaries if s["f1_tuned"] is not None), default=None)
    rows = [[label, fmt_value(s["data"]), fmt_value(s["arch"]), fmt_value(s["channels"]), fmt_value(s["size"]),
             fmt_value(s["epochs"]), fmt_value(s["best_epoch"]), num(s["f1"], ".4f"),
             Markup("<b>{}</b>").format(num(s["f1_tuned"], ".4f"))
             if best_f1 is not None and s["f1_tuned"] == best_f1 else num(s["f1_tuned"], ".4f"),
             format_seconds(s["time"]), s["status"]] for label, s in zip(labels, summaries)]
    summary = html_table(["run", "data", "arch", "channels", "size", "epochs", "best", "macro F1", "tuned", "time",
                          "status"], rows, {4, 5, 6, 7, 8, 9})

    keys = list(dict.fromkeys(k for c in configs for k in c))
    cfg_rows, cfg_classes = [], []
    for k in keys:
        values = [fmt_value(c[k]) if k in c else "(absent)" for c in configs]
        cfg_rows.append([k, *values])
        cfg_classes.append("differs" if len(set(values)) > 1 else "")
    n_diff = cfg_classes.count("differs")
    cfg_table = (note(f"{n_diff} setting(s) differ, highlighted.") + html_table(["setting", *labels], cfg_rows,
                                                                                  row_classes=cfg_classes))

    curves = img_tag(overlay_plot({lb: read_history(d) for lb, d in zip(labels, run_dirs)}),
                     "validation loss and macro F1 per epoch, all runs")

    classes: dict[tuple, list] = {}
    for i, m in enumerate(metrics):
        for r in per_class_rows(m):
            classes.setdefault((fmt_value(r["class"]), fmt_value(r["name"])), [None] * len(metrics))[i] = r
    pc_rows = []
    for (c, name), per_run in classes.items():
        f1s = [r["f1"] for r in per_run if r is not None and r["f1"] is not None]
        top = max(f1s) if f1s else None
        cells = []
        for r in per_run:
            if r is None:
                cells.append("-")
            else:
                text = Markup("{} <span class=note>(n={})</span>").format(num(r["f1"], ".3f"),
                                                                          num(r["support"], ".0f"))
                best = r["f1"] is not None and r["f1"] == top and len(f1s) > 1 and top > 0
                cells.append(Markup("<b>{}</b>").format(text) if best else text)
        pc_rows.append([c, name, *cells])
    per_class = (note("F1 of each class at each run's tuned thresholds; n is the class's validation support. "
                      "Best per class in bold.")
                 + html_table(["class", "name", *labels], pc_rows, set(range(2, 2 + len(labels))))
                 if pc_rows else note("No run has per-class metrics yet."))

    body = Markup("\n").join([
        Markup("<h1>Comparison of {} runs</h1>").format(len(run_dirs)),
        Markup('<p class="sub">{}</p>').format(", ".join(labels)),
        Markup('<nav><a href="#summary">Summary</a><a href="#config">Configuration</a><a href="#curves">Curves</a>'
               '<a href="#per-class">Per class</a></nav>'),
        section("summary", "Summary", summary),
        section("config", "Configuration side by side", cfg_table),
        section("curves", "Validation loss and macro F1 per epoch", curves),
        section("per-class", "Per-class F1 side by side", per_class),
    ])
    return page(f"Comparison of {len(run_dirs)} runs", body)


def write_comparison(run_dirs, out="comparison.html") -> Path:
    """Write a page comparing ``run_dirs``; returns its path."""
    run_dirs = [check_run_dir(d) for d in run_dirs]
    return write_text(Path(out), render_comparison(run_dirs))


def report_command(cfg) -> Path:
    runs = [check_run_dir(r) for r in cfg.runs]
    if len(runs) == 1:  # a run's report.html is this command's own output; the rest of the folder is not
        out = None if cfg.out is None else check_output(cfg.out, "--out", run_dirs=runs, own={"report.html"})
        path = write_report(runs[0], out)
    else:
        path = write_comparison(runs, check_output(Path.cwd() / "comparison.html" if cfg.out is None else cfg.out,
                                                   "--out", run_dirs=runs))
    log(f"wrote {path}")
    return path


# --- TensorBoard ---------------------------------------------------------------------------------

def _tag(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def log_tensorboard_summary(run_dir, metrics: dict | None = None, samples: list[dict] | None = None,
                            n_images: int = 8) -> None:
    """Add what fastai's TensorBoardCallback does not log to the run's TensorBoard folder: the final
    macro/micro/samples F1, per-class F1 (one scalar per class, plus a table) and the worst
    validation mistakes as one image with their true and predicted labels. Step: epochs run."""
    from torch.utils.tensorboard import SummaryWriter

    run_dir = Path(run_dir)
    metrics = metrics if metrics is not None else read_json(run_dir / "metrics.json")
    epochs = metrics.get("epochs_run", 0)
    step = int(epochs) if num(epochs, "d") != "-" else 0
    names = class_names(run_dir, metrics)
    with SummaryWriter(log_dir=str(run_dir / "tensorboard")) as writer:
        for key in ("f1_macro", "f1_micro", "f1_samples", "f1_macro_tuned", "f1_micro_tuned", "f1_samples_tuned"):
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
                log(f"note: no sample images in TensorBoard: {e}")
                samples = []
        if samples:
            def label_text(indices):
                return ", ".join(names[c] for c in indices) or "-"
            titles = [f"{s['id']}\ntrue: {label_text(s['true'])}\npred: {label_text(s['predicted'])}" for s in samples]
            with tempfile.TemporaryDirectory() as tmp:
                grid = plots.sample_grid_plot(Path(tmp) / "samples.png", [s["image"] for s in samples], titles)
                image = np.asarray(Image.open(grid).convert("RGB"))
            writer.add_image("valid/worst_mistakes", image, step, dataformats="HWC")

