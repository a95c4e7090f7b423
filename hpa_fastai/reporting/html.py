"""The HTML pages of the run reports: ``report.html`` per run and a page comparing runs.

Each page is one file that can be mailed, archived or opened offline and makes no network request:
the templates in ``templates/`` carry the stylesheet inline, and every image is a base64 data URI.
Everything comes from the run folder's files; the validation image grid also reads the training
images named in ``valid_predictions.csv`` (see ``samples``), and says so on the page when they are gone.

A run folder can come from someone else, so this module only turns its files into plain values
(strings already formatted, numbers shown only if they are numbers) and the templates are rendered
with autoescaping: nothing read from a file is ever marked safe.
"""
from __future__ import annotations

import base64
import io
import math
from pathlib import Path

import numpy as np
import pandas as pd
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from PIL import Image

from .. import plots
from ..atomic import write_text
from ..errors import HPAError
from ..runs.files import check_report_dir, read_cv_summary, read_history, read_json, read_lr_find, read_metrics
from ..runs.folder import (CONFIG, CURVES, LR_FIND_PLOT, MODEL_JSON, PER_CLASS_PLOT, REPORT, TENSORBOARD, is_cv_dir,
                           is_run_dir)
from ..runs.table import cv_summary, fold_dirs, format_seconds, run_summary
from .heatmaps import mistake_heatmaps
from .samples import valid_samples

CONFIG_COLUMNS = 3
MAX_LABELS = 6  # labels listed under an image; an untrained model can predict dozens

TEMPLATES = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"), autoescape=True,
                        undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)


# --- values as the pages show them ------------------------------------------------------------

def num(value, spec: str = "") -> str:
    """A number read from a run file, formatted with ``spec``; "-" for anything else (text, a list,
    NaN), so a hand-edited file shows a gap instead of breaking the page."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-"
    try:
        return format(value, spec) if math.isfinite(value) else "-"
    except (OverflowError, ValueError):  # a huge JSON integer, or an integer spec for a float
        return "-"


def fmt_value(v) -> str:
    """A config or metric value as a short string: floats to 4 significant digits, lists inline."""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(fmt_value(x) for x in v) + "]"
    if v is None:
        return "-"
    return str(v)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def array_png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def png_uri(path: Path) -> str | None:
    """The PNG file at ``path`` as a data URI; None when there is none."""
    return data_uri(path.read_bytes()) if path.is_file() else None


# --- reading a run ----------------------------------------------------------------------------

def run_label(run_dir: Path) -> str:
    """The run's name (the link ``latest`` resolved to the folder it points at)."""
    return run_dir.resolve().name


def class_names(run_dir: Path, metrics: dict) -> list[str]:
    per_class = metrics.get("per_class")
    if per_class and isinstance(per_class, list):
        return [str(row.get("name", "?")) if isinstance(row, dict) else "?" for row in per_class]
    names = read_json(run_dir / MODEL_JSON).get("names")
    if isinstance(names, list) and names:
        return [str(name) for name in names]
    from ..data.vocab import NAMES

    return list(NAMES.get(str(read_json(run_dir / MODEL_JSON).get("format", "z2g")), NAMES["z2g"]))


def per_class_rows(metrics: dict) -> list[dict]:
    """metrics.json's per-class rows, each with the keys the pages show (a value that is missing or
    not of its type is None, and shown as "-")."""
    rows = metrics.get("per_class")
    return [{"class": r.get("class"), "name": r.get("name"), **{k: r.get(k) if num(r.get(k)) != "-" else None
             for k in ("threshold", "precision", "recall", "f1", "support")}}
            for r in (rows if isinstance(rows, list) else []) if isinstance(r, dict)]


# --- one run: the values of each section of report.html ------------------------------------------

def summary_values(summary: dict, metrics: dict) -> dict:
    if not metrics:
        return {"has_metrics": False, "status": summary["status"], "epochs": summary["epochs"]}
    return {"has_metrics": True, "status": summary["status"], "time": format_seconds(summary["time"]),
            "best_epoch": num(metrics.get("best_epoch")), "epochs_run": num(metrics.get("epochs_run")),
            "f1_macro": num(metrics.get("f1_macro"), ".4f"), "threshold": num(metrics.get("threshold", 0.5), "g"),
            "f1_macro_tuned": num(metrics.get("f1_macro_tuned"), ".4f"),
            # absent from run folders written before the split-half estimate existed: shown as "-"
            "f1_macro_tuned_oos": num(metrics.get("f1_macro_tuned_oos"), ".4f"),
            "f1_samples": num(metrics.get("f1_samples"), ".4f"),
            "f1_samples_tuned": num(metrics.get("f1_samples_tuned"), ".4f")}


def training_values(config: dict) -> dict:
    """The loss, oversampling, progressive resizing, starting weights and training tricks of a run, for
    the line under its title (run folders written before these options existed trained with BCE and
    none of the others)."""
    progressive = config.get("progressive_size")
    start = config.get("start_weights")
    tricks = [name for key, name in (("ema", "EMA of the weights"), ("swa", "SWA"), ("mixup", "MixUp"),
                                     ("cutmix", "CutMix")) if config.get(key) is True]
    if isinstance(config.get("accumulate"), int) and config["accumulate"] > 1:
        tricks.append(f"gradients accumulated over {fmt_value(config['accumulate'])} batches")
    return {"loss": fmt_value(config.get("loss", "bce")),
            "oversample": fmt_value(config.get("oversample_cap", "?")) if config.get("oversample") is True else None,
            "progressive": fmt_value(progressive) if progressive is not None else None,
            "start": fmt_value(start) if config.get("pretrained_used") is True and isinstance(start, str) else None,
            "tricks": tricks}


def config_values(config: dict) -> dict:
    # three setting/value pairs per row: the page opens on results, not on a screen of settings
    pairs = [[k, fmt_value(v)] for k, v in config.items()]
    pairs += [["", ""]] * (-len(pairs) % CONFIG_COLUMNS)
    return {"columns": CONFIG_COLUMNS,
            "rows": [sum(pairs[i:i + CONFIG_COLUMNS], []) for i in range(0, len(pairs), CONFIG_COLUMNS)]}


def lr_find_values(run_dir: Path, config: dict) -> dict:
    """The finder's plot and suggestions, or (no plot) the learning rate that was given instead."""
    plot = png_uri(run_dir / LR_FIND_PLOT)
    suggestions = read_lr_find(run_dir).get("suggestions", {}) if plot else {}
    used = config.get("lr_used")
    return {"plot": plot, "lr": fmt_value(config.get("lr", "?")),
            "used": num(used, ".3e") if isinstance(used, float) else None,
            "suggestions": [[name, num(lr, ".3e")] for name, lr in suggestions.items()]
            if isinstance(suggestions, dict) else []}


def curves_values(run_dir: Path, history: pd.DataFrame) -> dict:
    table = None
    if len(history):
        specs = {"lr": "{:.2e}", "seconds": "{:.1f}"}
        cols = list(history.columns)
        table = {"columns": cols, "numeric": [i for i, c in enumerate(cols) if c != "phase"],
                 "rows": [[specs.get(c, "{:.4f}").format(v) if isinstance(v, float) else str(v)
                           for c, v in zip(cols, r)] for r in history.itertuples(index=False)]}
    return {"plot": png_uri(run_dir / CURVES), "table": table}


def per_class_values(run_dir: Path, metrics: dict) -> dict:
    rows = []
    for r in per_class_rows(metrics):
        bar = max(0.0, min(100.0, 100 * (r["f1"] or 0.0)))  # width in px of the F1 bar
        rows.append({"class": fmt_value(r["class"]), "name": fmt_value(r["name"]),
                     "threshold": num(r["threshold"], ".3f"), "precision": num(r["precision"], ".3f"),
                     "recall": num(r["recall"], ".3f"), "f1": num(r["f1"], ".3f"), "bar": f"{bar:.0f}",
                     "support": num(r["support"], ".0f"), "absent": r["support"] == 0})
    return {"rows": rows, "valid_images": fmt_value(metrics.get("valid_images", "?")),
            "plot": png_uri(run_dir / PER_CLASS_PLOT) if rows else None}


def label_spans(indices, other, cls_in: str, cls_out: str, names: list[str], probs=None,
                most: int = MAX_LABELS) -> dict:
    """Labels under an image: each with its class (``cls_in`` if also in ``other``) and, with
    ``probs``, its probability; at most ``most`` of them, and how many more there are."""
    if probs is not None:  # right ones first, then most probable first: a cut list keeps what matters
        indices = sorted(indices, key=lambda c: (c not in other, -probs[c]))

    def text(c) -> str:
        name = names[c] if c < len(names) else c
        return f"{name} {probs[c]:.2f}" if probs is not None else str(name)

    spans = [{"class": cls_in if c in other else cls_out, "text": text(c)} for c in indices[:most]]
    return {"spans": spans, "more": f" and {len(indices) - most} more" if len(indices) > most else ""}


def samples_values(run_dir: Path, names: list[str], rgby: bool) -> dict:
    try:
        samples = valid_samples(run_dir)
    except HPAError as e:
        return {"error": str(e), "rgby": rgby, "figures": [], "heatmap_note": None}
    heat, note = mistake_heatmaps(run_dir, samples)
    return {"error": None, "rgby": rgby, "heatmap_note": note, "figures": [
        {"id": str(s["id"]), "image": data_uri(array_png(s["image"])), "mistakes": s["mistakes"],
         "true": label_spans(s["true"], s["predicted"], "ok", "missed", names),
         "predicted": label_spans(s["predicted"], s["true"], "ok", "wrong", names, s["probs"]),
         "heatmap": None if h is None else {
             "image": data_uri(array_png(h["image"])), "how": h["how"], "prob": num(h["prob"], ".2f"),
             "name": names[h["class"]] if h["class"] < len(names) else str(h["class"])}}
        for s, h in zip(samples, heat)]}


def report_values(run_dir: Path) -> dict:
    """What report.html shows, section by section."""
    config = read_json(run_dir / CONFIG)
    metrics = read_metrics(run_dir)
    return {
        "name": run_label(run_dir),
        "sub": {**{k: fmt_value(config.get(k, "?")) for k in ("arch", "data", "channels", "size")},
                "valid_images": fmt_value(metrics.get("valid_images", "?")), **training_values(config)},
        "summary": summary_values(run_summary(run_dir), metrics),
        "tensorboard": (run_dir / TENSORBOARD).is_dir(),
        "config": config_values(config),
        "lr_find": lr_find_values(run_dir, config),
        "curves": curves_values(run_dir, read_history(run_dir)),
        "per_class": per_class_values(run_dir, metrics),
        "samples": samples_values(run_dir, class_names(run_dir, metrics), config.get("channels") == "rgby"),
    }


def render_report(run_dir: Path) -> str:
    if is_cv(run_dir):
        return TEMPLATES.get_template("cv.html").render(cv_report_values(Path(run_dir)))
    return TEMPLATES.get_template("run.html").render(report_values(run_dir))


def write_report(run_dir, out=None) -> Path:
    """Write the report of a run or of a cross-validation (default ``report.html`` in its folder);
    returns its path."""
    run_dir = check_report_dir(run_dir)
    return write_text(Path(out) if out else run_dir / REPORT, render_report(run_dir))


# --- a cross-validation: report.html of its folder -----------------------------------------------

def cv_report_values(cv_dir: Path) -> dict:
    """What a cross-validation's report.html shows: its out-of-fold scores, each fold, the per-class
    table of the out-of-fold predictions, the command that predicts with the ensemble, its config."""
    config, summary, row = read_json(cv_dir / CONFIG), read_cv_summary(cv_dir), cv_summary(cv_dir)
    oof = summary.get("oof") if isinstance(summary.get("oof"), dict) else {}
    threshold = num(summary.get("threshold", config.get("threshold", 0.5)), "g")
    listed = summary.get("folds") if isinstance(summary.get("folds"), list) else []
    by_name = {f.get("run"): f for f in listed if isinstance(f, dict)}
    folds = []
    for fold_dir in fold_dirs(cv_dir):
        scores, own, metrics = by_name.get(fold_dir.name, {}), run_summary(fold_dir), read_metrics(fold_dir)
        folds.append({"run": fold_dir.name, "report": f"{fold_dir.name}/{REPORT}" if (fold_dir / REPORT).is_file()
                      else None, "images": num(scores.get("images"), ".0f"),
                      "f1": num(scores.get("f1_macro"), ".4f"), "f1_tuned": num(scores.get("f1_macro_tuned"), ".4f"),
                      "own_oos": num(metrics.get("f1_macro_tuned_oos"), ".4f"),
                      "best_epoch": num(own["best_epoch"]), "epochs": num(own["epochs"]), "status": own["status"],
                      "time": format_seconds(own["time"])})
    mean = {}
    if listed:
        for key in ("f1_macro", "f1_macro_tuned"):
            values = [f.get(key) for f in listed if isinstance(f, dict) and num(f.get(key)) != "-"]
            mean[key] = num(float(np.mean(values)) if values else None, ".4f")
    per_class = per_class_values(cv_dir, {"per_class": oof.get("per_class"), "valid_images": oof.get("images")})
    per_class["plot"] = None
    return {
        "name": run_label(cv_dir),
        "sub": {**{k: fmt_value(config.get(k, "?")) for k in ("arch", "data", "channels", "size")},
                "n_folds": fmt_value(summary.get("n_folds", config.get("n_folds", "?"))), **training_values(config)},
        "status": row["status"], "time": format_seconds(row["time"]), "threshold": threshold,
        "has_oof": bool(oof), "oof": {"images": num(oof.get("images"), ".0f"), "f1": num(oof.get("f1_macro"), ".4f"),
                                      "f1_tuned": num(oof.get("f1_macro_tuned"), ".4f"),
                                      "f1_oos": num(oof.get("f1_macro_tuned_oos"), ".4f"),
                                      "samples": num(oof.get("f1_samples"), ".4f"),
                                      "samples_tuned": num(oof.get("f1_samples_tuned"), ".4f"),
                                      "samples_oos": num(oof.get("f1_samples_tuned_oos"), ".4f")},
        "folds": folds, "mean": mean,
        "per_class": per_class,
        "predict": f"python run.py predict --learner {cv_dir} --data <folder of images or competition folder>",
        "resume": f"python run.py cv --resume {cv_dir}",
        "config": config_values(config),
    }


# --- several runs --------------------------------------------------------------------------------

def unique_labels(run_dirs: list[Path]) -> list[str]:
    labels = [run_label(d) for d in run_dirs]
    if len(set(labels)) < len(labels):  # same name in different folders: add the parent
        labels = [f"{d.resolve().parent.name}/{run_label(d)}" for d in run_dirs]
    return labels


def overlay_plot(histories: dict[str, pd.DataFrame]) -> bytes:
    from matplotlib.ticker import MaxNLocator

    fig, (ax1, ax2) = plots.subplots(1, 2, figsize=(11, 4))
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


def score_to_believe(summary: dict) -> tuple[float | None, str]:
    """The score a comparison ranks runs by, and its name: macro F1 with per-class thresholds tuned
    split-half (out-of-sample), or, for a run without it (written before it existed), F1 at the
    run's threshold. Never the in-sample tuned score, which flatters rare classes."""
    if summary.get("f1_oos") is not None:
        return summary["f1_oos"], "tuned, split-half"
    return summary.get("f1"), "at the threshold"


def comparison_summary_rows(labels: list[str], summaries: list[dict]) -> list[dict]:
    scores = [score_to_believe(s)[0] for s in summaries]
    best = max((v for v in scores if v is not None), default=None)
    return [{"run": label, **{k: fmt_value(s[k]) for k in ("data", "arch", "channels", "size", "epochs", "best_epoch")},
             "rank": i + 1, "score": num(score, ".4f"), "score_kind": score_to_believe(s)[1],
             "f1": num(s["f1"], ".4f"), "f1_tuned": num(s["f1_tuned"], ".4f"), "f1_oos": num(s.get("f1_oos"), ".4f"),
             "best": best is not None and score == best, "time": format_seconds(s["time"]),
             "status": s["status"] + (f" ({s['folds']} folds, out-of-fold)" if s.get("folds") else "")}
            for i, (label, s, score) in enumerate(zip(labels, summaries, scores))]


def is_cv(path: Path) -> bool:
    """A cross-validation's folder (not a run that happens to hold a cv.json)."""
    return is_cv_dir(path) and not is_run_dir(path)


def summary_of(path: Path) -> dict:
    return cv_summary(path) if is_cv(path) else run_summary(path)


def metrics_of(path: Path) -> dict:
    """metrics.json of a run; for a cross-validation, its out-of-fold per-class table."""
    if is_cv(path):
        oof = read_cv_summary(path).get("oof")
        return {"per_class": oof.get("per_class")} if isinstance(oof, dict) else {}
    return read_metrics(path)


def ranked(run_dirs: list[Path]) -> list[Path]:
    """The runs best first by the score to believe (``score_to_believe``), runs without one last."""
    scores = [score_to_believe(summary_of(d))[0] for d in run_dirs]
    order = sorted(range(len(run_dirs)), key=lambda i: (scores[i] is None, -(scores[i] or 0.0), i))
    return [run_dirs[i] for i in order]


def comparison_config_values(configs: list[dict]) -> dict:
    """Every setting of any run, side by side; the rows whose values differ are marked."""
    rows = []
    for k in dict.fromkeys(k for c in configs for k in c):
        values = [fmt_value(c[k]) if k in c else "(absent)" for c in configs]
        rows.append({"setting": k, "run_values": values, "differs": len(set(values)) > 1})
    return {"rows": rows, "n_differ": sum(r["differs"] for r in rows)}


def comparison_per_class_rows(metrics: list[dict]) -> list[dict]:
    """One row per class found in any run: each run's F1 and support, or None where the run lacks the
    class; the best F1 of a class is marked when more than one run has it and it is above 0."""
    classes: dict[tuple, list] = {}
    for i, m in enumerate(metrics):
        for r in per_class_rows(m):
            classes.setdefault((fmt_value(r["class"]), fmt_value(r["name"])), [None] * len(metrics))[i] = r
    rows = []
    for (c, name), per_run in classes.items():
        f1s = [r["f1"] for r in per_run if r is not None and r["f1"] is not None]
        top = max(f1s) if f1s else None
        rows.append({"class": c, "name": name, "runs": [
            None if r is None else {"f1": num(r["f1"], ".3f"), "support": num(r["support"], ".0f"),
                                    "best": r["f1"] is not None and r["f1"] == top and len(f1s) > 1 and top > 0}
            for r in per_run]})
    return rows


def comparison_values(run_dirs: list[Path]) -> dict:
    """What the comparison page shows, section by section, the runs ranked by the score to believe."""
    run_dirs = ranked(run_dirs)
    labels = unique_labels(run_dirs)
    return {
        "labels": labels,
        "summary": comparison_summary_rows(labels, [summary_of(d) for d in run_dirs]),
        "config": comparison_config_values([read_json(d / CONFIG) for d in run_dirs]),
        "curves": data_uri(overlay_plot({lb: read_history(d) for lb, d in zip(labels, run_dirs)})),
        "per_class": comparison_per_class_rows([metrics_of(d) for d in run_dirs]),
    }


def render_comparison(run_dirs: list[Path]) -> str:
    return TEMPLATES.get_template("comparison.html").render(comparison_values(run_dirs))


def write_comparison(run_dirs, out="comparison.html") -> Path:
    """Write a page comparing ``run_dirs`` (runs or cross-validations); returns its path."""
    run_dirs = [check_report_dir(d) for d in run_dirs]
    return write_text(Path(out), render_comparison(run_dirs))
