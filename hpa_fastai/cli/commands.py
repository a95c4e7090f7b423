"""Each command: its config -> one library call -> what the console shows. The library modules are
imported inside each command, so that ``run.py runs`` or ``--help`` never pay for torch."""
from __future__ import annotations

import contextlib
import math
import signal
import threading
from pathlib import Path

import pandas as pd

from ..config import (DedupConfig, DownloadHPAv18Config, EvaluateConfig, ExplainConfig, ExportConfig,
                      PredictConfig, PreprocessConfig, ReportConfig, RunsConfig, ServeConfig, SynthConfig,
                      TrainConfig, TuneConfig)
from ..console import console, log, table
from ..errors import HPAError


def train(cfg: TrainConfig) -> Path | None:
    from ..training import train as train_run
    from .epochs import EpochProgress

    result = train_run(cfg, cbs=[EpochProgress()])
    if result is None:  # a process other than the first of a distributed run
        return None
    return show_run(result, cfg.per_class)


def show_run(result, per_class: bool = False) -> Path:
    """What the console shows after a run, and the report it writes: report.html (and the TensorBoard
    summary), the scores, with ``per_class`` the per-class table. Returns the run folder."""
    if per_class:
        _show_per_class(f"validation, per class (tuned thresholds; {result.metrics['valid_images']} images)",
                        result.metrics["per_class"])
    _report(result.run_dir, result.metrics)
    _show_run_summary(result)
    log(f"artifacts in {result.run_dir} (exported model: export.pkl, model.safetensors + model.json; per class: "
        f"report.html, per_class.csv{'' if per_class else ', or --per-class on the console'})")
    return result.run_dir


def _report(run_dir: Path, metrics: dict) -> None:
    """report.html of a finished run; with --log tensorboard its TensorBoard summary, with --log mlflow
    or wandb the report in those runs too."""
    from ..config import trackers
    from ..reporting import log_report_to_trackers, log_tensorboard_summary, write_report
    from ..runs.files import read_config

    log(f"report {write_report(run_dir)}")
    names = trackers(read_config(run_dir).get("log"))
    if "tensorboard" in names:
        log_tensorboard_summary(run_dir, metrics)
    if added := log_report_to_trackers(run_dir):
        log(f"report and scores recorded in {' and '.join(added)}")


def _show_per_class(title: str, per_class) -> None:
    report = pd.DataFrame(per_class)
    console.print(table(title, report.assign(support=report["support"].astype(int))))


def _show_run_summary(result) -> None:
    metrics = result.metrics
    threshold = metrics["threshold"]
    at = "threshold 0.5" if threshold == 0.5 else f"threshold {threshold}"
    # tuned thresholds scored on the images they were tuned on (in-sample) flatter rare classes;
    # the split-half estimate (tuned on one half, scored on the other) is what new images will see
    nan = float("nan")
    summary = pd.DataFrame([
        {"": "macro F1", at: metrics["f1_macro"], "tuned, out-of-sample": metrics.get("f1_macro_tuned_oos", nan),
         "tuned, in-sample": metrics["f1_macro_tuned"]},
        {"": "samples F1", at: metrics["f1_samples"], "tuned, out-of-sample": metrics.get("f1_samples_tuned_oos", nan),
         "tuned, in-sample": metrics["f1_samples_tuned"]},
    ])
    console.print(table(f"best epoch {metrics['best_epoch']} of {metrics['epochs_run']} ({result.status}), "
                        f"{metrics['seconds']:.0f}s", summary))
    log("tuned thresholds, out-of-sample: tuned on one half of the validation images and scored on the other, "
        "both ways, averaged; in-sample: tuned and scored on the same images")


def lr_find(cfg: TrainConfig) -> Path:
    from ..runs.folder import LR_FIND_PLOT
    from ..training import lr_find as find

    result = find(cfg)
    console.print(table("lr_find suggestions (--lr auto takes auto; --lr valley fastai's valley)", pd.DataFrame(
        {"method": list(result.suggestions),
         "lr": [f"{v:.3e}" if math.isfinite(v) else "none found" for v in result.suggestions.values()]})))
    log(f"plot: {result.run_dir / LR_FIND_PLOT}")
    return result.run_dir


def cv(cfg: TrainConfig) -> Path:
    from ..reporting import write_report
    from ..runs.folder import LATEST
    from ..training import cross_validate
    from .epochs import EpochProgress

    result = cross_validate(cfg, cbs=[EpochProgress()])
    for fold in result.trained:
        _report(fold.run_dir, fold.metrics)
    _show_cv(result.summary, cfg.per_class)
    log(f"report {write_report(result.cv_dir)}")
    log(f"out-of-fold predictions and scores in {result.cv_dir}; {result.cv_dir.parent / LATEST} now points at it")
    log(f"predict with the {result.summary['n_folds']}-model ensemble: hpa-fastai predict --learner {result.cv_dir}")
    return result.cv_dir


def _show_cv(result: dict, per_class: bool = False) -> None:
    oof = result["oof"]
    if per_class and oof.get("per_class"):
        _show_per_class(f"out-of-fold, per class (thresholds tuned on all folds; {oof['images']} images)",
                        oof["per_class"])
    at = "threshold 0.5" if result["threshold"] == 0.5 else f"threshold {result['threshold']}"
    nan = float("nan")
    rows = [{"": f["run"], "images": f["images"], f"macro F1, {at}": f["f1_macro"],
             "tuned, in-sample": f["f1_macro_tuned"], "tuned, split-half": nan} for f in result["folds"]]
    fold_scores = pd.DataFrame(rows)
    rows.append({"": "mean of folds", "images": int(fold_scores["images"].sum()),
                 f"macro F1, {at}": float(fold_scores[f"macro F1, {at}"].mean()),
                 "tuned, in-sample": float(fold_scores["tuned, in-sample"].mean()), "tuned, split-half": nan})
    rows.append({"": "out-of-fold", "images": oof["images"], f"macro F1, {at}": oof["f1_macro"],
                 "tuned, in-sample": oof["f1_macro_tuned"], "tuned, split-half": oof.get("f1_macro_tuned_oos", nan)})
    console.print(table(f"{result['n_folds']}-fold cross-validation, macro F1 (tuned: per-class thresholds from the "
                        "out-of-fold predictions of all folds; split-half: tuned on one half of them, scored on the "
                        "other, both ways: the score to quote)", pd.DataFrame(rows)))


def tune(cfg: TuneConfig, given=frozenset()) -> Path:
    import logging

    import optuna

    from ..reporting import write_tune_report
    from ..runs.folder import BEST_RUN, LATEST, STUDY_JOURNAL, TRIALS, is_study_dir, study_dir
    from ..search import tune as run_search
    from .progress import TrialProgress

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # the console gets one line per trial from here
    # each trial's own messages (its folder, data, model) stay in its run folder's files; the console
    # keeps to one line per trial
    quiet = {name: logging.getLogger(name) for name in ("hpa_fastai.training", "hpa_fastai.data")}
    levels = {name: logger.level for name, logger in quiet.items()}
    for logger in quiet.values():
        logger.setLevel(logging.WARNING)
    try:
        with TrialProgress(cfg.n_trials) as progress:
            result = run_search(cfg, fixed=given, on_trial=progress)
    except KeyboardInterrupt:
        folder = study_dir(cfg.out, cfg.study)
        if is_study_dir(folder):
            log(f"the study is kept in {folder}; the same command continues it (report {write_tune_report(folder)})")
        raise
    finally:
        for name, logger in quiet.items():
            logger.setLevel(levels[name])
    _show_tune(result)
    log(f"report {write_tune_report(result.study_dir)}; trials in {result.study_dir / TRIALS}")
    if result.best_run is not None:
        log(f"{result.study_dir / BEST_RUN} and {Path(cfg.out) / LATEST} point at {result.best_run}; predict with "
            f"python run.py predict --learner {result.best_run}")
    log(f"live view of the study: optuna-dashboard {result.study_dir / STUDY_JOURNAL}"
        if cfg.storage is None else "live view of the study: optuna-dashboard <the --storage URL>")
    return result.study_dir


def _show_tune(result) -> None:
    trials = result.trials
    counts = trials["state"].value_counts().to_dict() if len(trials) else {}
    log(f"study {result.study}: " + ", ".join(f"{n} {state}" for state, n in counts.items()))
    if result.best is None:
        log("no trial completed, so there is no best configuration yet")
        return
    best = result.best
    rows = [{"setting": k, "value": f"{v:.4g}" if isinstance(v, float) else str(v)} for k, v in best["params"].items()]
    console.print(table(f"best trial {best['number']}: {result.objective} {best['value']:.4f}", pd.DataFrame(rows)))
    confirmation = result.confirmation
    if confirmation:
        runs = pd.DataFrame([{"run": r["run"], "seed": r["seed"], result.objective: r["value"],
                              "status": r["status"]} for r in confirmation["runs"]])
        console.print(table(f"the best configuration with new seeds (search: {confirmation['search_value']:.4f})",
                            runs))
        if confirmation["mean"] is not None:
            spread = f" +- {confirmation['std']:.4f} (sd)" if confirmation["std"] is not None else ""
            log(f"confirmed {result.objective}: {confirmation['mean']:.4f}{spread} over {len(runs)} new seed(s), "
                f"against {confirmation['search_value']:.4f} in the search, where the best of many noisy runs was "
                "picked (the difference is the winner's curse)")


def _tta(cfg) -> str | None:
    return "max" if getattr(cfg, "tta_max", False) else "mean" if cfg.tta else None


def _log_precision(precision: str, requested: str) -> None:
    if precision != "fp32" and requested == "auto":
        log(f"predicting in {precision} mixed precision, as the model trained (--precision fp32 for full precision)")


PREDICTIONS_SHOWN_ALL = 20  # a folder of up to this many images is shown whole; a larger one, its first rows
PREDICTIONS_SHOWN = 10


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
        shown = written.table if len(written.table) <= PREDICTIONS_SHOWN_ALL else written.table.head(PREDICTIONS_SHOWN)
        title = "predictions" if len(shown) == len(written.table) else \
            f"predictions, the first {len(shown)} of {len(written.table)} images (all of them in {written.out})"
        console.print(table(title, shown))
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

    serve_app(cfg.learner, cfg.host, cfg.port, cfg.examples)


def evaluate(cfg: EvaluateConfig) -> Path:
    from ..inference.loading import load_predictor
    from ..outputs import check_output
    from ..paths import SAMPLE_DIR
    from ..inference.evaluate import evaluate as evaluate_model

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
    from ..modelfile import export_onnx
    from ..outputs import check_output
    from ..runs.folder import ONNX

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
    result = export_onnx(predictor.learn.model, predictor.meta, out)
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
    df = collect_runs(folder, cfg.sort, cfg.folds)
    if cfg.csv is not None:
        check_output(cfg.csv, "--csv", run_dirs=df["path"])
    if df.empty:
        why = "the folder does not exist" if not folder.exists() else "no run folders in it"
        log(f"no runs in {folder} ({why}); train one with: hpa-fastai --out {folder}")
        return df
    t = table(f"{len(df)} run(s) in {folder}, by {cfg.sort}", display_frame(df))
    for column in t.columns:
        if column.header in NUMERIC:
            column.justify = "right"
    thresholds = sorted(set(df["threshold"].dropna()))
    t.caption = (f"macro F1 on the validation images at threshold {', '.join(f'{x:g}' for x in thresholds) or '0.5'}"
                 " and with per-class tuned thresholds: tuned on the same images (in-sample, optimistic) and"
                 " split-half (tuned on one half, scored on the other, both ways: out-of-sample); a row with folds"
                 " is a cross-validation, scored on the out-of-fold predictions of all its folds"
                 + ("" if cfg.folds or not df["folds"].notna().any() else " (--folds lists them)"))
    console.print(t)
    if cfg.csv is not None:
        write_csv(cfg.csv, for_spreadsheet(df))  # values from run files, for a spreadsheet
        log(f"wrote {cfg.csv}")
    return df


def report(cfg: ReportConfig) -> Path:
    from ..outputs import check_output
    from ..reporting import write_comparison, write_report
    from ..runs.files import check_report_dir
    from ..runs.folder import REPORT

    runs = [check_report_dir(r) for r in cfg.runs]
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

    return make_cache(cfg.data, cfg.size, cfg.channels, cfg.workers, cfg.cache)


def dedup(cfg: DedupConfig) -> Path:
    from ..config import HASH_BITS
    from ..data.dedup import dedup as find_duplicates, duplicates_to_read
    from ..paths import resolve_data_dir

    out, dups, n_images = find_duplicates(cfg.data, cfg.max_distance, cfg.out, cfg.cache)
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
    found = duplicates_to_read(data_dir, cache=cfg.cache)
    cache = f" --cache {cfg.cache}" if cfg.cache is not None else ""
    if found is not None and found.resolve() == out.resolve():
        log(f"training on {data_dir}{cache} now keeps each group on one side of the split")
    else:
        log(f"to keep the groups together, train with --duplicates {out}")
    return out


def synth(cfg: SynthConfig) -> Path:
    from ..synth import make_dataset
    from .progress import ConsoleProgress

    with ConsoleProgress("images") as progress:
        out = make_dataset(cfg.out, cfg.format, cfg.n_train, cfg.n_test, cfg.size, cfg.seed, cfg.easy,
                           progress=progress, plant_duplicates=cfg.plant_duplicates)
    log(f"wrote {cfg.n_train + cfg.plant_duplicates + cfg.n_test} images ({cfg.format}, {cfg.size}px) to {out}")
    return out


def download_hpav18(cfg: DownloadHPAv18Config) -> Path:
    from ..tools.hpav18_download import FAILED_CSV, download
    from .progress import ConsoleProgress

    with ConsoleProgress("HPAv18 files") as progress, _sigterm_as_ctrl_c():
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
        f"hpa-fastai --data <HPA 2018 folder> --extra-data {result.out}")
    return result.out


@contextlib.contextmanager
def _sigterm_as_ctrl_c():
    """SIGTERM (kill, a scheduler's time limit) stops the block as Ctrl-C does, so that what the
    command does on Ctrl-C (the download writes train.csv of the complete images) happens too;
    Python's default for SIGTERM ends the process at once. The first SIGTERM interrupts; later ones
    are ignored while the block finishes (Ctrl-C still stops it). A SIGTERM the parent process set
    to be ignored stays ignored."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGTERM) == signal.SIG_IGN:  # signal's rule; the parent's choice
        yield
        return

    def interrupt(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # what the interrupt starts (writing train.csv) ends
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        # None: a handler set outside Python, which cannot be put back; the default is the nearest
        signal.signal(signal.SIGTERM, before if before is not None else signal.SIG_DFL)


# commands that also take the config fields whose flags the user gave (tune holds them fixed)
TAKES_GIVEN_FLAGS = {"tune"}

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
    "tune": (TuneConfig, "hyperparameter search: trials of training runs drawn by Optuna, the flags given held "
                         "fixed, then the best configuration retrained with new seeds", tune),
    "preprocess": (PreprocessConfig, "write a resized copy of a data set that training reads directly", preprocess),
    "dedup": (DedupConfig, "find near-duplicate images by perceptual hash; splits keep each group together", dedup),
    "synth": (SynthConfig, "write a synthetic HPA-like data set in a competition's layout", synth),
    "download-hpav18": (DownloadHPAv18Config, "fetch the HPAv18 external images from the Atlas, resumable, for "
                                              "--extra-data", download_hpav18),
}
