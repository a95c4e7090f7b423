"""Each command: its config -> one library call -> what the console shows. The library modules are
imported inside each command, so that ``run.py runs`` or ``--help`` never pay for torch."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..config import (DedupConfig, DownloadHPAv18Config, EvaluateConfig, ExplainConfig, ExportConfig,
                      PredictConfig, PreprocessConfig, ReportConfig, RunsConfig, ServeConfig, SynthConfig,
                      TrainConfig)
from ..console import console, log, table
from ..errors import HPAError


def train(cfg: TrainConfig):
    from ..workflows import train as train_run

    return train_run(cfg)


def lr_find(cfg: TrainConfig) -> Path:
    from ..workflows import lr_find as lr_find_run

    return lr_find_run(cfg)


def cv(cfg: TrainConfig) -> Path:
    from ..workflows import cross_validate

    return cross_validate(cfg)


def _tta(cfg) -> str | None:
    return "max" if getattr(cfg, "tta_max", False) else "mean" if cfg.tta else None


def _log_precision(precision: str, requested: str) -> None:
    if precision != "fp32" and requested == "auto":
        log(f"predicting in {precision} mixed precision, as the model trained (--precision fp32 for full precision)")


def predict(cfg: PredictConfig) -> Path:
    from ..inference.loading import load_predictors
    from ..inference.predictor import Ensemble
    from ..inference.submission import write_predictions
    from ..outputs import check_output, check_output_folder
    from ..paths import SAMPLE_DIR

    check_output(cfg.out, "--out")  # an empty --out, before a model is loaded
    if cfg.cam is not None:
        check_output_folder(cfg.cam, "--cam", [])
    pred = load_predictors(cfg.learner, cfg.trust)
    if isinstance(pred, Ensemble):
        if cfg.cam is not None:
            raise HPAError(f"--cam needs one model, not an ensemble of {len(pred.members)}; pass one --learner")
        log(f"ensemble of {len(pred.members)} models ({pred.source}): mean probabilities")
    _log_precision(pred.set_precision(cfg.precision), cfg.precision)
    data = Path(cfg.data) if cfg.data else SAMPLE_DIR
    written = write_predictions(pred, data, cfg.out, cfg.threshold, _tta(cfg), cfg.bs, cfg.workers)
    if cfg.cam is not None:
        from ..inference.cam import explain_data

        cams = explain_data(pred, data, cfg.cam, cfg.threshold, _tta(cfg), min(cfg.bs, 8))
        log(f"wrote {len(cams)} heatmap(s) of {cams['image'].nunique()} image(s) to {cfg.cam} "
            "(explanations.csv lists them)")
    if written.submission is not None:
        fmt = written.submission
        log(f"wrote {written.out}: {len(written.table)} rows, {fmt.name} submission "
            f"({fmt.id_col},{fmt.submission_label_col})")
    else:
        if len(written.table) <= 20:
            console.print(table("predictions", written.table))
        log(f"wrote {written.out}: {len(written.table)} images")
    return written.out


def explain(cfg: ExplainConfig) -> Path:
    from ..inference.cam import explain_files
    from ..inference.loading import load_predictor
    from ..outputs import check_output_folder

    check_output_folder(cfg.out, "--out", [])  # an empty --out or a file there, before a model is loaded
    pred = load_predictor(cfg.learner, cfg.trust)
    cams = explain_files(pred, cfg.images, cfg.out, cfg.classes, cfg.threshold, _tta(cfg), cfg.bs)
    if len(cams) <= 40:
        console.print(table("class activation maps", cams.drop(columns=["file"])))
    log(f"wrote {len(cams)} heatmap(s) of {cams['image'].nunique()} image(s) to {cfg.out} "
        "(explanations.csv lists them)")
    return Path(cfg.out)


def serve(cfg: ServeConfig) -> None:
    from ..serve.app import serve as serve_app

    serve_app(cfg.learner, cfg.host, cfg.port)


def evaluate(cfg: EvaluateConfig) -> Path:
    from ..inference.loading import load_predictor
    from ..outputs import check_output
    from ..paths import SAMPLE_DIR
    from ..runs.evaluate import evaluate as evaluate_model

    if cfg.out is not None:
        check_output(cfg.out, "--out")  # an empty --out, before a model is loaded
    pred = load_predictor(cfg.learner, cfg.trust)
    _log_precision(pred.set_precision(cfg.precision), cfg.precision)
    data = Path(cfg.data) if cfg.data else SAMPLE_DIR
    result = evaluate_model(pred, data, cfg.out, cfg.threshold, _tta(cfg), cfg.bs, cfg.workers)
    report = result["report"]
    console.print(table(f"per class ({result['images']} images)", report.assign(support=report["support"].astype(int))))
    console.print(table("F1", pd.DataFrame([{"average": k, "F1": v} for k, v in result["f1"].items()])))
    log(f"report in {result['out']}")
    return result["out"]


def export(cfg: ExportConfig) -> Path:
    from ..inference.loading import load_predictor
    from ..outputs import check_output
    from ..rundir import ONNX
    from ..runs.export import export_onnx

    if not cfg.onnx:
        raise HPAError("nothing to export: pass --onnx (the run folder already holds export.pkl and "
                       "model.safetensors + model.json)")
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise HPAError("--onnx needs the onnx package: pip install 'hpa_fastai[onnx]'") from None
    if cfg.out is not None:
        check_output(cfg.out, "--out")  # an empty --out, before the model is loaded
    predictor = load_predictor(cfg.learner, cpu=True)
    out = check_output(predictor.source / ONNX if cfg.out is None else cfg.out, "--out",
                       run_dirs=[predictor.source], own={ONNX})
    result = export_onnx(predictor, out)
    if result["checked"]:
        log(f"wrote {out} (onnxruntime vs PyTorch: max abs difference {result['max_abs_diff']:.2e})")
        if result["max_abs_diff"] > 1e-4:
            raise HPAError(f"{out}: ONNX output differs from PyTorch by {result['max_abs_diff']:.2e} (> 1e-4)")
    else:
        log(f"wrote {out}")
    return out


def runs(cfg: RunsConfig) -> pd.DataFrame:
    from ..atomic import write_csv
    from ..outputs import check_output, for_spreadsheet
    from ..runs.table import NUMERIC, collect_runs, display_frame

    folder = Path(cfg.dir)
    df = collect_runs(folder, cfg.sort)
    if cfg.csv is not None:
        check_output(cfg.csv, "--csv", run_dirs=df["path"])
    if df.empty:
        why = "the folder does not exist" if not folder.exists() else "no run folders in it"
        log(f"no runs in {folder} ({why}); train one with: python run.py --out {folder}")
        return df
    t = table(f"{len(df)} run(s) in {folder}, by {cfg.sort}", display_frame(df))
    for column in t.columns:
        if column.header in NUMERIC:
            column.justify = "right"
    thresholds = sorted(set(df["threshold"].dropna()))
    t.caption = (f"macro F1 on the validation images at threshold {', '.join(f'{x:g}' for x in thresholds) or '0.5'}"
                 " and with per-class tuned thresholds: tuned on the same images (in-sample, optimistic) and"
                 " split-half (tuned on one half, scored on the other, both ways: out-of-sample)")
    console.print(t)
    if cfg.csv is not None:
        write_csv(cfg.csv, for_spreadsheet(df))  # values from run files, for a spreadsheet
        log(f"wrote {cfg.csv}")
    return df


def report(cfg: ReportConfig) -> Path:
    from ..outputs import check_output
    from ..reporting import write_comparison, write_report
    from ..rundir import REPORT, check_run_dir

    runs = [check_run_dir(r) for r in cfg.runs]
    if len(runs) == 1:  # a run's report.html is this command's own output; the rest of the folder is not
        out = None if cfg.out is None else check_output(cfg.out, "--out", run_dirs=runs, own={REPORT})
        path = write_report(runs[0], out)
    else:
        path = write_comparison(runs, check_output(Path.cwd() / "comparison.html" if cfg.out is None else cfg.out,
                                                   "--out", run_dirs=runs))
    log(f"wrote {path}")
    return path


def preprocess(cfg: PreprocessConfig) -> Path:
    from ..data.cache import preprocess as make_cache

    return make_cache(cfg.data, cfg.size, cfg.channels, cfg.workers)


def dedup(cfg: DedupConfig) -> Path:
    from ..config import HASH_BITS
    from ..data.dedup import DUPLICATES_CSV, dedup as find_duplicates
    from ..paths import resolve_data_dir

    out, dups, n_images = find_duplicates(cfg.data, cfg.max_distance, cfg.out)
    n_groups = dups["group"].nunique()
    if n_groups:
        first_ids = lambda s: " ".join(s.iloc[:4]) + (" ..." if len(s) > 4 else "")  # noqa: E731
        sizes = dups.groupby("group", sort=False).agg(images=("id", "size"), max_distance=("distance", "max"),
                                                       ids=("id", first_ids))
        shown = sizes.sort_values("images", ascending=False, kind="stable").head(20).reset_index()
        console.print(table(f"largest near-duplicate groups (of {n_groups})", shown))
    log(f"{len(dups)} of {n_images} images fall in {n_groups} near-duplicate group(s) "
        f"(Hamming distance <= {cfg.max_distance} of {HASH_BITS} bits); wrote {out}")
    data_dir = resolve_data_dir(cfg.data)
    if out.resolve() == (data_dir / DUPLICATES_CSV).resolve():
        log("training splits of this folder now keep each group on one side")
    else:
        log(f"training reads only {data_dir / DUPLICATES_CSV}; copy the file there to keep the groups together")
    return out


def synth(cfg: SynthConfig) -> Path:
    from ..synth import make_dataset
    from .progress import ConsoleProgress

    with ConsoleProgress("images") as progress:
        out = make_dataset(cfg.out, cfg.format, cfg.n_train, cfg.n_test, cfg.size, cfg.seed, cfg.easy,
                           progress=progress)
    log(f"wrote {cfg.n_train + cfg.n_test} images ({cfg.format}, {cfg.size}px) to {out}")
    return out


def download_hpav18(cfg: DownloadHPAv18Config) -> Path:
    from ..tools.hpav18_download import FAILED_CSV, download
    from .progress import ConsoleProgress

    with ConsoleProgress("HPAv18 files") as progress:
        result = download(cfg.labels, cfg.out, size=cfg.size, format=cfg.format, ids=cfg.ids, classes=cfg.classes,
                          base_url=cfg.base_url, connections=cfg.connections, retries=cfg.retries,
                          backoff=cfg.backoff, timeout=cfg.timeout, progress=progress)
    for problem, what in ((result.missing, "not on the server (HTTP 404)"), (result.failed, "failed after every retry")):
        if problem:
            task, reason = problem[0]
            log(f"{len(problem)} file(s) {what}, e.g. {task.url}: {reason}")
    if result.missing or result.failed:
        log(f"listed in {result.out / FAILED_CSV}; run the same command again to retry them")
    log(f"fetched {result.fetched} files ({result.bytes / 1e6:.1f} MB) in {result.seconds:.0f} s; "
        f"{result.complete} complete images in {result.out / 'train.csv'}; train with: "
        f"python run.py --data <HPA 2018 folder> --extra-data {result.out}")
    return result.out


# name -> (config class, help, the function that runs it)
COMMANDS = {
    "train": (TrainConfig, "train a model (the default command)", train),
    "lr-find": (TrainConfig, "run only the learning-rate finder and save its plot", lr_find),
    "predict": (PredictConfig, "predict labels: a Kaggle submission, or labels for a folder of images", predict),
    "explain": (ExplainConfig, "class activation maps: where in each image the model saw each class", explain),
    "serve": (ServeConfig, "a local web app: drop an image, see its labels, probabilities and heatmaps", serve),
    "evaluate": (EvaluateConfig, "score a trained model on a labelled folder: table, CSV and plots", evaluate),
    "export": (ExportConfig, "export a trained model, e.g. to ONNX", export),
    "runs": (RunsConfig, "a table of all runs under runs/", runs),
    "report": (ReportConfig, "rebuild a run's report.html, or compare several runs", report),
    "cv": (TrainConfig, "K-fold cross-validation: one run per fold, out-of-fold thresholds and scores", cv),
    "preprocess": (PreprocessConfig, "write a resized copy of a data set that training reads directly", preprocess),
    "dedup": (DedupConfig, "find near-duplicate images by perceptual hash; splits keep each group together", dedup),
    "synth": (SynthConfig, "write a synthetic HPA-like data set in a competition's layout", synth),
    "download-hpav18": (DownloadHPAv18Config, "fetch the HPAv18 external images from the Atlas, resumable, for "
                                              "--extra-data", download_hpav18),
}
