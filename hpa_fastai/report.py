"""Run reports for people: a self-contained ``report.html`` per run, a page comparing runs, and a
summary of the finished run in TensorBoard.

The pages are plain HTML with an inline stylesheet and every image inlined as a base64 data URI:
one file that can be mailed, archived or opened offline, and that makes no network request.
Everything comes from the run folder's files; the validation image grid also reads the training
images named in ``valid_predictions.csv``, and says so on the page when they are gone.
"""
from __future__ import annotations

import base64
import html
import io
import json
import re
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from . import plots
from ._io import write_text
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

def esc(value) -> str:
    return html.escape(str(value), quote=True)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def img_tag(png: bytes, alt: str, cls: str = "plot") -> str:
    return f'<img class="{cls}" alt="{esc(alt)}" src="{data_uri(png)}">'


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
               row_classes: list[str] | None = None, cell_html: bool = False) -> str:
    """A table; ``numeric`` column indices are right-aligned. Cells are escaped unless ``cell_html``."""
    out = ["<table>", "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"]
    for r, row in enumerate(rows):
        cls = f' class="{row_classes[r]}"' if row_classes and row_classes[r] else ""
        cells = "".join(f'<td{" class=num" if i in numeric else ""}>{c if cell_html else esc(c)}</td>'
                        for i, c in enumerate(row))
        out.append(f"<tr{cls}>{cells}</tr>")
    out.append("</table>")
    return "\n".join(out)


def page(title: str, body: str) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


def section(anchor: str, title: str, content: str) -> str:
    return f'<h2 id="{anchor}">{esc(title)}</h2>\n{content}'


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


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
    probs = np.array([[float(p) for p in row.split()] for row in preds_df["probs"]])
    n_classes = probs.shape[1]
    targets = labels_matrix(preds_df["labels"], n_classes).astype(bool)
    preds = labels_matrix(preds_df["predicted"], n_classes).astype(bool)
    wrong = (preds != targets).sum(1) + np.abs(probs - targets).sum(1) / (n_classes + 1)
    order = np.argsort(-wrong, kind="stable")[:n]
    channels = CHANNEL_SETS[config.get("channels", "rgb")]
    samples = []
    for i in order:
        rgb = plots.false_colour(read_image(preds_df["key"].iloc[i], channels, size=size))
        samples.append({"id": preds_df["id"].iloc[i], "image": rgb, "true": np.flatnonzero(targets[i]).tolist(),
                        "predicted": np.flatnonzero(preds[i]).tolist(), "probs": probs[i],
                        "mistakes": int((preds[i] != targets[i]).sum())})
    return samples


def class_names(run_dir: Path, metrics: dict) -> list[str]:
    if metrics.get("per_class"):
        return [row["name"] for row in metrics["per_class"]]
    names = read_json(run_dir / "model.json").get("names")
    if names:
        return names
    from .vocab import class_names as vocab_names

    return vocab_names(read_json(run_dir / "model.json").get("format", "z2g"))


# --- one run -------------------------------------------------------------------------------------

def summary_line(summary: dict, metrics: dict) -> str:
    if not metrics:
        return (f"No validation metrics: the run is <b>{esc(summary['status'])}</b>"
                + (f" after {summary['epochs']} epoch(s)." if summary["epochs"] else "."))
    thr = metrics.get("threshold", 0.5)
    return (f"Best epoch <b>{metrics['best_epoch']}</b> of {metrics['epochs_run']} · "
            f"macro F1 <b>{metrics['f1_macro']:.4f}</b> at threshold {thr:g}, "
            f"<b>{metrics['f1_macro_tuned']:.4f}</b> with per-class tuned thresholds · "
            f"samples F1 {metrics['f1_samples']:.4f} / {metrics['f1_samples_tuned']:.4f} · "
            f"status <b>{esc(summary['status'])}</b> · {esc(format_seconds(summary['time']))}")


def config_section(config: dict) -> str:
    # three setting/value pairs per row: the page opens on results, not on a screen of settings
    pairs = [[k, fmt_value(v)] for k, v in config.items()]
    pairs += [["", ""]] * (-len(pairs) % CONFIG_COLUMNS)
    rows = [sum(pairs[i:i + CONFIG_COLUMNS], []) for i in range(0, len(pairs), CONFIG_COLUMNS)]
    return section("config", "Configuration", note("As resolved by training (config.json): re-run with the "
                                                   "same values to reproduce the run.")
                   + html_table(["setting", "value"] * CONFIG_COLUMNS, rows))


def lr_find_section(run_dir: Path, config: dict) -> str:
    png = run_dir / "lr_find.png"
    if not png.is_file():
        return section("lr-find", "Learning-rate finder",
                       note(f"Not run: the learning rate was given (--lr {config.get('lr', '?')})."))
    suggestions = read_json(run_dir / "lr_find.json").get("suggestions", {})
    rows = [[name, f"{lr:.3e}" if isinstance(lr, float) and np.isfinite(lr) else "-"] for name, lr in suggestions.items()]
    used = config.get("lr_used")
    text = note(f"Loss against learning rate over a short mock training; the run used "
                f"{used:.3e} (the valley suggestion)." if isinstance(used, float) else "")
    return section("lr-find", "Learning-rate finder",
                   text + img_tag(png.read_bytes(), "lr_find plot") + html_table(["suggestion", "lr"], rows, {1}))


def curves_section(run_dir: Path, history: pd.DataFrame) -> str:
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
    return section("curves", "Loss and F1 per epoch", "\n".join(parts))


def per_class_section(run_dir: Path, metrics: dict) -> str:
    if not metrics.get("per_class"):
        return section("per-class", "Per class", note("No metrics.json: the run has not finished."))
    rows, classes = [], []
    for r in metrics["per_class"]:
        pct = max(0.0, min(100.0, 100 * r["f1"]))
        bar = f'<span style="display:inline-block;width:{pct:.0f}px;height:.7em;background:#54aeff"></span>'
        rows.append([esc(r["class"]), esc(r["name"]), f"{r['threshold']:.3f}", f"{r['precision']:.3f}",
                     f"{r['recall']:.3f}", f"{r['f1']:.3f}", bar, esc(int(r["support"]))])
        classes.append("absent" if int(r["support"]) == 0 else "")
    table = html_table(["class", "name", "threshold", "precision", "recall", "F1", "", "support"], rows,
                       {0, 2, 3, 4, 5, 7}, classes, cell_html=True)
    text = note(f"On the {metrics.get('valid_images', '?')} validation images, each class at its own tuned "
                "threshold. Support is the number of validation images with the class; greyed rows have none, "
                "so their scores say nothing.")
    png = run_dir / "per_class_f1.png"
    bars = img_tag(png.read_bytes(), "per-class F1 bars") if png.is_file() else ""
    return section("per-class", "Per class: precision, recall, F1", text + table + bars)


def samples_section(run_dir: Path, names: list[str], rgby: bool) -> str:
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
            spans.append(f'<span class="{cls}">{esc(names[c] if c < len(names) else c)}{p}</span>')
        more = f" and {len(indices) - most} more" if len(indices) > most else ""
        return (", ".join(spans) or "-") + more

    figures = []
    for s in samples:
        caption = (f'<span class="id">{esc(s["id"])}</span> · {s["mistakes"]} label(s) wrong<br>'
                   f'true: {labels(s["true"], s["predicted"], "ok", "missed")}<br>'
                   f'predicted: {labels(s["predicted"], s["true"], "ok", "wrong", s["probs"])}')
        figures.append(f"<figure>{img_tag(array_png(s['image']), str(s['id']), 'thumb')}"
                       f"<figcaption>{caption}</figcaption></figure>")
    colour = "; RGBY in false colour, yellow as red + green" if rgby else ""
    text = ('<p class="note">The validation images the model got most wrong, worst first (tuned thresholds'
            f'{colour}). Labels: <span class="ok">correct</span>, '
            '<span class="missed">missed</span> (true, not predicted), <span class="wrong">wrong</span> '
            '(predicted, not true); predicted labels show their probability.</p>')
    return section("samples", "Validation images, worst mistakes first",
                   text + '<div class="grid">' + "\n".join(figures) + "</div>")


def render_report(run_dir: Path) -> str:
    config = read_json(run_dir / "config.json")
    metrics = read_json(run_dir / "metrics.json")
    summary = run_summary(run_dir)
    name = run_label(run_dir)
    history = read_history(run_dir)
    sub = (f"{esc(config.get('arch', '?'))} on {esc(config.get('data', '?'))} · {esc(config.get('channels', '?'))}, "
           f"{esc(config.get('size', '?'))} px · {esc(metrics.get('valid_images', '?'))} validation images")
    nav = "".join(f'<a href="#{a}">{t}</a>' for a, t in [
        ("config", "Configuration"), ("lr-find", "Learning rate"), ("curves", "Curves"),
        ("per-class", "Per class"), ("samples", "Images")])
    tb = (note("TensorBoard logs: tensorboard/ in the run folder (tensorboard --logdir <run folder>).")
          if (run_dir / "tensorboard").is_dir() else "")
    body = "\n".join([
        f"<h1>Run {esc(name)}</h1>",
        f'<p class="sub">{sub}</p>',
        f'<p class="summary">{summary_line(summary, metrics)}</p>',
        tb,
        f"<nav>{nav}</nav>",
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
        if "valid_loss" in h:
            ax1.plot(h["epoch"], h["valid_loss"], marker="o", label=label)
        if "f1_macro" in h:
            ax2.plot(h["epoch"], h["f1_macro"], marker="o", label=label)
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
    rows = [[esc(label), esc(s["data"]), esc(s["arch"]), esc(s["channels"]), esc(s["size"]), esc(fmt_value(s["epochs"])),
             esc(fmt_value(s["best_epoch"])),
             "-" if s["f1"] is None else f"{s['f1']:.4f}",
             "-" if s["f1_tuned"] is None else (f"<b>{s['f1_tuned']:.4f}</b>" if s["f1_tuned"] == best_f1
                                               else f"{s['f1_tuned']:.4f}"),
             esc(format_seconds(s["time"])), esc(s["status"])] for label, s in zip(labels, summaries)]
    summary = html_table(["run", "data", "arch", "channels", "size", "epochs", "best", "macro F1", "tuned", "time",
                          "status"], rows, {4, 5, 6, 7, 8, 9}, cell_html=True)

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
        for r in m.get("per_class", []):
            classes.setdefault((r["class"], r["name"]), [None] * len(metrics))[i] = r
    pc_rows = []
    for (c, name), per_run in classes.items():
        f1s = [r["f1"] for r in per_run if r is not None]
        top = max(f1s) if f1s else None
        cells = []
        for r in per_run:
            if r is None:
                cells.append("-")
            else:
                text = f"{r['f1']:.3f} <span class=note>(n={int(r['support'])})</span>"
                cells.append(f"<b>{text}</b>" if r["f1"] == top and len(f1s) > 1 and top > 0 else text)
        pc_rows.append([esc(c), esc(name), *cells])
    per_class = (note("F1 of each class at each run's tuned thresholds; n is the class's validation support. "
                      "Best per class in bold.")
                 + html_table(["class", "name", *labels], pc_rows, set(range(2, 2 + len(labels))), cell_html=True)
                 if pc_rows else note("No run has per-class metrics yet."))

    body = "\n".join([
        f"<h1>Comparison of {len(run_dirs)} runs</h1>",
        f'<p class="sub">{esc(", ".join(labels))}</p>',
        '<nav><a href="#summary">Summary</a><a href="#config">Configuration</a><a href="#curves">Curves</a>'
        '<a href="#per-class">Per class</a></nav>',
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
    if len(runs) == 1:
        path = write_report(runs[0], cfg.out)
    else:
        path = write_comparison(runs, cfg.out or Path.cwd() / "comparison.html")
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
    step = int(metrics.get("epochs_run", 0))
    names = class_names(run_dir, metrics)
    with SummaryWriter(log_dir=str(run_dir / "tensorboard")) as writer:
        for key in ("f1_macro", "f1_micro", "f1_samples", "f1_macro_tuned", "f1_micro_tuned", "f1_samples_tuned"):
            if key in metrics:
                writer.add_scalar(f"final/{key}", metrics[key], step)
        rows = ["| class | name | threshold | precision | recall | F1 | support |", "|---|---|---|---|---|---|---|"]
        for r in metrics.get("per_class", []):
            writer.add_scalar(f"per_class_f1/{r['class']:02d}_{_tag(r['name'])}", r["f1"], step)
            rows.append(f"| {r['class']} | {r['name']} | {r['threshold']:.3f} | {r['precision']:.3f} | "
                        f"{r['recall']:.3f} | {r['f1']:.3f} | {int(r['support'])} |")
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

