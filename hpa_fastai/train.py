"""Training: resolve the config, check the data, build the learner, fit one-cycle, export.

Everything a run produces goes into one run folder (``runs/<time>-<arch>``, with ``runs/latest``
pointing at the newest): config, history, plots, metrics, best weights and the exported model.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from fastai.callback.progress import ProgressCallback
from fastai.callback.schedule import minimum, slide, steep, valley
from fastai.learner import Learner
from fastai.optimizer import Adam
from fastai.torch_core import set_seed

from . import distributed
from . import metrics as M
from .callbacks import AtomicSaveModel, Checkpoint, NaNGuard, StopOnSignal, WarmupEarlyStopping, load_checkpoint, load_opt_state, set_rng_state
from . import plots
from ._io import atomic_path, write_csv, write_json
from .config import TrainConfig
from .console import EpochLogger, console, log, table
from .data import bound_workers, channel_stats, check_workers, default_workers, make_dls, make_splitter, native_size
from .dedup import duplicate_groups
from .errors import HPAError
from .formats import detect_format, read_items, verify_images, with_extra_items
from .models import create_model, splitter
from .preprocess import cached_items
from .vocab import class_names, vocab_for

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "data" / "sample"
MAX_AUTO_SIZE = 256


def resolve_data_dir(data) -> Path:
    if data is None:
        if not (SAMPLE_DIR / "train.csv").is_file():
            raise HPAError(f"no --data given and the bundled sample {SAMPLE_DIR} is missing; "
                           "make one with: python run.py synth --out data/sample")
        return SAMPLE_DIR
    return Path(data)


def _check_types(cfg: TrainConfig) -> None:
    """A hand-edited config.json (``--resume``) or the Python API can put any value in a field."""
    import typing

    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        value, flag = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        allowed = typing.get_args(hints[f.name]) or (hints[f.name],)
        types = tuple(t for t in allowed if t is not type(None))
        if value is None:
            ok = type(None) in allowed
        elif isinstance(value, bool):
            ok = bool in types
        else:
            ok = isinstance(value, types) or (float in types and isinstance(value, int))
        if not ok:
            raise HPAError(f"{flag} must be {' or '.join(t.__name__ for t in types)} (got {value!r:.80})")
        if "choices" in f.metadata and value not in f.metadata["choices"]:
            raise HPAError(f"{flag} must be one of {', '.join(f.metadata['choices'])} (got {value!r:.80})")


MAX_SIZE = 4096  # a larger --size would only exhaust memory (a 100000 px side is 30 GB per image)
MIN_SIZE = 8  # fastai's augmentation divides by zero on 1 px images; below 8 px no model sees anything


def validate(cfg: TrainConfig) -> None:
    """Flag checks that need no data; each message names its flag."""
    _check_types(cfg)
    if cfg.epochs < 1:
        raise HPAError(f"--epochs must be at least 1 (got {cfg.epochs})")
    if cfg.bs < 1:
        raise HPAError(f"--bs must be at least 1 (got {cfg.bs})")
    if cfg.size is not None and cfg.size < MIN_SIZE:
        raise HPAError(f"--size must be at least {MIN_SIZE} pixels (got {cfg.size})")
    if cfg.size is not None and cfg.size > MAX_SIZE:
        raise HPAError(f"--size must be at most {MAX_SIZE} pixels (got {cfg.size})")
    if cfg.lr != "auto":
        try:
            lr = float(cfg.lr)
        except ValueError:
            raise HPAError(f"--lr must be a number or 'auto' (got {cfg.lr!r})") from None
        if not (lr > 0 and math.isfinite(lr)):
            raise HPAError(f"--lr must be positive (got {cfg.lr})")
    if not 0 < cfg.valid_pct < 1:
        raise HPAError(f"--valid-pct must be between 0 and 1 (got {cfg.valid_pct})")
    if cfg.n_folds == 1 or cfg.n_folds < 0:
        raise HPAError(f"--n-folds must be 0 (random split) or at least 2 (got {cfg.n_folds})")
    if cfg.n_folds and not 0 <= cfg.fold < cfg.n_folds:
        raise HPAError(f"--fold must be in 0..{cfg.n_folds - 1} (got {cfg.fold})")
    if not 0 < cfg.threshold < 1:
        raise HPAError(f"--threshold must be between 0 and 1 (got {cfg.threshold})")
    if cfg.patience < 1:
        raise HPAError(f"--patience must be at least 1 (got {cfg.patience})")
    check_workers(cfg.workers)
    if not cfg.out.strip():
        raise HPAError("--out is empty: give the folder that holds the run folders")
    if not 0 <= cfg.seed < 2**32:  # numpy's seed range
        raise HPAError(f"--seed must be in 0..{2**32 - 1} (got {cfg.seed})")
    if not (math.isfinite(cfg.focal_gamma) and cfg.focal_gamma >= 0):
        raise HPAError(f"--focal-gamma must be 0 or more (got {cfg.focal_gamma})")
    if cfg.freeze_epochs < 0:
        raise HPAError(f"--freeze-epochs must be 0 or more (got {cfg.freeze_epochs})")
    if cfg.lr_find_iters is not None and cfg.lr_find_iters < 1:
        raise HPAError(f"--lr-find-iters must be at least 1 (got {cfg.lr_find_iters})")
    from .models import check_arch

    try:
        check_arch(cfg.arch)
    except ValueError as e:
        raise HPAError(f"--arch: {e}") from None
    if cfg.weights is not None and not Path(cfg.weights).is_file():
        raise HPAError(f"--weights {cfg.weights}: file not found")
    if cfg.log == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise HPAError("--log tensorboard needs the tensorboard package: "
                           "pip install 'hpa_fastai[tensorboard]'") from None


@dataclass
class Prepared:
    """The resolved config and the checked data of a run, before any model is built."""
    cfg: TrainConfig
    data_dir: Path
    fmt: str
    items: pd.DataFrame
    vocab: list
    names: list
    mean: list
    std: list
    device: torch.device


def prepare(cfg: TrainConfig, stats: tuple | None = None) -> Prepared:
    """Check the flags and the data; ``stats`` (mean, std) skips measuring the channel statistics."""
    validate(cfg)
    data_dir = resolve_data_dir(cfg.data)
    fmt = detect_format(data_dir)
    channels = fmt.default_channels if cfg.channels == "auto" else cfg.channels
    if channels == "rgby" and not fmt.channel_files:
        raise HPAError(f"--channels rgby needs one file per stain (HPA 2018 layout); {data_dir} is "
                       "Zero-to-GANs RGB: use --channels rgb")
    items = read_items(data_dir, fmt, "train", skip_bad=cfg.skip_bad, channels=channels, log=log)
    items = with_extra_items(items, cfg.extra_data, fmt, channels, skip_bad=cfg.skip_bad, log=log)
    bad = verify_images(items, channels, deep=cfg.skip_bad)
    if bad:
        if not cfg.skip_bad:
            first = next(iter(bad.values()))
            raise HPAError(first + (f" (and {len(bad) - 1} more; --skip-bad drops them)" if len(bad) > 1 else ""))
        log(f"skipped {len(bad)} unreadable image(s):")
        for msg in bad.values():
            log(f"  {msg}")
        items = items[~items["key"].isin(bad)].reset_index(drop=True)
    if len(items) < 2:
        raise HPAError(f"{data_dir}: at least 2 usable images are needed, found {len(items)}")
    groups = duplicate_groups(data_dir, items["id"], log)  # the splits keep near-duplicates together
    if groups is not None:
        items = items.assign(group=groups)
    size = cfg.size or min(native_size(items["key"].iloc[0], channels), MAX_AUTO_SIZE)
    if size < MIN_SIZE:  # the automatic size: --size itself was checked by validate()
        raise HPAError(f"{data_dir}: the images are {size}x{size} pixels (image {items['id'].iloc[0]!r}), below the "
                       f"minimum of {MIN_SIZE}; pass --size {MIN_SIZE} or more to enlarge them")
    items = cached_items(items, channels, size)  # `run.py preprocess` copies, where they exist
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    workers = bound_workers(cfg.workers, len(items), default_workers(device.type == "cuda"), log)
    resolved = dataclasses.replace(cfg, data=str(data_dir), channels=channels, size=size, workers=workers)
    mean, std = stats or channel_stats(items["key"], channels, size, seed=cfg.seed)
    return Prepared(resolved, data_dir, fmt.name, items, vocab_for(fmt.name), class_names(fmt.name),
                    mean, std, device)


def make_run_dir(out, arch: str, name: str | None = None) -> Path:
    """A new run folder under ``out`` (named ``name``, default ``<time>-<arch>``); fails early,
    before training, if ``out`` is not writable."""
    out = Path(out)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    name = name or f"{stamp}-{arch.replace(':', '-').replace('/', '-')}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        run_dir, n = out / name, 1
        while True:  # mkdir is the test: two runs started in the same second cannot both get a name
            try:
                run_dir.mkdir()
                break
            except FileExistsError:
                n += 1
                if n > 10_000:
                    raise
                run_dir = out / f"{name}-{n}"
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise HPAError(f"--out {out}: not writable ({e.strerror or e})") from None
    return run_dir


def point_latest(run_dir: Path) -> None:
    latest = run_dir.parent / "latest"
    tmp = run_dir.parent / f".latest.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run_dir.name, target_is_directory=True)
    os.replace(tmp, latest)


def build_learner(prep: Prepared, run_dir: Path | None, quiet: bool = False):
    cfg = prep.cfg
    splitter_fn = make_splitter(prep.items, len(prep.vocab), cfg.valid_pct, cfg.seed, cfg.n_folds, cfg.fold)
    dls = make_dls(prep.items, prep.vocab, cfg.channels, cfg.size, prep.mean, prep.std, splitter_fn,
                   bs=cfg.bs, workers=cfg.workers, seed=cfg.seed, device=prep.device)
    if len(dls.train) == 0:
        raise HPAError(f"--bs {cfg.bs} is larger than the {len(dls.train_ds)} training images; lower --bs")
    if len(dls.valid_ds) == 0:  # training would crash after its first epoch, with nothing to score
        raise HPAError(f"--valid-pct {cfg.valid_pct} leaves none of the {len(prep.items)} images for validation; "
                       "raise --valid-pct")
    set_seed(cfg.seed, reproducible=True)
    model, used_pretrained = create_model(cfg.arch, len(cfg.channels), len(prep.vocab), cfg.pretrained,
                                          cfg.weights, log=log)
    history = run_dir / "history.csv" if run_dir is not None else None
    learn = Learner(dls, model, loss_func=M.make_loss(cfg.loss, cfg.focal_gamma, cfg.threshold),
                    opt_func=Adam, metrics=[M.f1_metric("macro", cfg.threshold), M.f1_metric("samples", cfg.threshold)],
                    splitter=splitter, path=run_dir or Path("."), model_dir=".",
                    cbs=[EpochLogger(history)])
    learn.remove_cbs(learn.cbs.filter(lambda c: isinstance(c, ProgressCallback)))
    learn.logger = lambda *_: None
    learn._hpa_quiet = quiet
    precision = cfg.precision
    if prep.device.type == "cuda":
        if precision == "auto":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if precision == "fp16":
            learn.to_fp16()
        elif precision == "bf16":
            learn.to_bf16()
    else:
        if precision != "fp32":
            log(f"note: training on CPU in fp32 (mixed precision needs CUDA; --precision {cfg.precision})")
        precision = "fp32"
    learn.hpa_precision = precision
    return learn, used_pretrained


SUGGESTIONS = {"valley": valley, "slide": slide, "minimum": minimum, "steep": steep}


def find_lr(learn, run_dir: Path, iters: int) -> dict:
    """Run fastai's LR finder, save the plot with the four suggestions, print them as a table."""
    with learn.no_logging():
        learn.lr_find(num_it=iters, show_plot=False, suggest_funcs=None)
    lrs = [float(x) for x in learn.recorder.lrs]
    losses = [float(x) for x in learn.recorder.losses]
    # fastai's suggestion functions, on the slice lr_find itself uses; computed here one by one
    # because `slide` raises IndexError on short runs (few batches) instead of giving no answer.
    lo, hi = iters // 10, max(len(lrs) - 5, iters // 10 + 2)
    t_lrs, t_losses = torch.tensor(lrs[lo:hi]), torch.tensor(losses[lo:hi])
    finite = torch.isfinite(t_losses)
    if not finite.all():
        cut = int((~finite).nonzero()[0])
        t_lrs, t_losses = t_lrs[:cut], t_losses[:cut]
    suggestions = {}
    for name, func in SUGGESTIONS.items():
        try:
            suggestions[name] = float(func(t_lrs, t_losses, iters)[0])
        except (IndexError, RuntimeError, ValueError):
            suggestions[name] = float("nan")
    shown = {k: v for k, v in suggestions.items() if math.isfinite(v)}
    skip = 5 if len(lrs) > 10 else 0
    plots.lr_find_plot(run_dir / "lr_find.png", lrs[: len(lrs) - skip], losses[: len(losses) - skip], shown)
    write_json(run_dir / "lr_find.json", {"suggestions": suggestions, "lrs": lrs, "losses": losses})
    console.print(table("lr_find suggestions", pd.DataFrame(
        {"method": list(suggestions), "lr": [f"{v:.3e}" for v in suggestions.values()]})))
    if not (math.isfinite(suggestions["valley"]) and suggestions["valley"] > 0):
        raise HPAError("lr_find found no usable learning rate (the loss never decreased); pass --lr")
    return suggestions


def model_meta(prep: Prepared, thresholds) -> dict:
    cfg = prep.cfg
    return {"arch": cfg.arch, "format": prep.fmt, "channels": cfg.channels, "n_in": len(cfg.channels),
            "size": cfg.size, "mean": prep.mean, "std": prep.std, "vocab": prep.vocab, "names": prep.names,
            "thresholds": [float(t) for t in thresholds], "loss": cfg.loss, "focal_gamma": cfg.focal_gamma}


def export_model(learn, meta: dict, run_dir: Path) -> None:
    """Two exports: fastai's pickled learner (export.pkl), and weights-only safetensors plus a JSON
    description (model.safetensors + model.json) that loads without unpickling anything."""
    from safetensors.torch import save_file

    learn.hpa_meta = meta
    with atomic_path(run_dir / "export.pkl", durable=True) as tmp:
        learn.export(tmp)
    state = {k: v.detach().cpu().contiguous() for k, v in learn.model.state_dict().items()}
    with atomic_path(run_dir / "model.safetensors", durable=True) as tmp:
        save_file(state, str(tmp))
    write_json(run_dir / "model.json", meta, durable=True)


def evaluate_valid(learn, prep: Prepared, run_dir: Path, history: pd.DataFrame, t_start: float,
                   valid_preds) -> dict:
    probs, targs = valid_preds
    probs, targs = probs.float().numpy(), targs.numpy().astype(bool)
    cfg = prep.cfg
    thresholds = M.tune_thresholds(probs, targs, default=cfg.threshold)
    at_default = M.summary(probs, targs, np.full(len(prep.vocab), cfg.threshold))
    tuned = M.summary(probs, targs, thresholds)
    report = M.per_class_report(probs, targs, thresholds, prep.names)
    mon = cfg.monitor
    best_idx = int(history[mon].idxmax() if cfg.monitor_higher_is_better else history[mon].idxmin())
    stopped_early = len(history) < cfg.epochs + (cfg.freeze_epochs if learn.hpa_pretrained else 0)
    result = {
        "best_epoch": int(history["epoch"].iloc[best_idx]),
        "epochs_run": int(len(history)),
        "stopped_early": bool(stopped_early),
        "monitor": mon,
        "valid_images": int(len(targs)),
        "f1_macro": at_default["macro"], "f1_micro": at_default["micro"], "f1_samples": at_default["samples"],
        "f1_macro_tuned": tuned["macro"], "f1_micro_tuned": tuned["micro"], "f1_samples_tuned": tuned["samples"],
        "threshold": cfg.threshold,
        "seconds": round(time.time() - t_start, 1),
        "per_class": report.to_dict("records"),
    }
    write_json(run_dir / "metrics.json", result)
    write_csv(run_dir / "per_class.csv", report)
    # the report's image grid reads these instead of predicting the validation images again
    valid = learn.dls.valid.items
    write_csv(run_dir / "valid_predictions.csv", pd.DataFrame({
        "id": valid["id"].to_numpy(), "key": valid["key"].to_numpy(), "labels": valid["labels"].to_numpy(),
        "predicted": [" ".join(map(str, np.flatnonzero(row))) for row in M.decode(probs, thresholds)],
        "probs": [" ".join(f"{p:.4f}" for p in row) for row in probs]}))
    plots.f1_bars_plot(run_dir / "per_class_f1.png", report)
    console.print(table(f"validation, per class (tuned thresholds; {len(targs)} images)",
                        report.assign(support=report["support"].astype(int))))
    return {**result, "thresholds": thresholds, "probs": probs, "targets": targs}


def _phases(cfg: TrainConfig, lr: float, pretrained: bool) -> list[tuple[str, int, object]]:
    """(phase, epochs, learning rate) of each one-cycle fit: a pretrained body first trains
    frozen, then everything with discriminative rates (as fastai's fine_tune does)."""
    if pretrained and cfg.freeze_epochs > 0:
        return [("frozen", cfg.freeze_epochs, lr), ("unfrozen", cfg.epochs, slice(lr / 100, lr / 2))]
    return [("train", cfg.epochs, lr)]


CHECKPOINT_KEYS = {"model", "opt", "phase", "epochs_done", "rng", "smooth_loss", "history"}


def _start(cfg: TrainConfig, run_name: str | None = None):
    """A new run, or the run folder of ``--resume`` with its saved config and checkpoint."""
    if not cfg.resume:
        prep = prepare(cfg)
        prep.device = distributed.init(prep.device)
        if distributed.world_size() > 1:
            # only rank 0 writes the run folder; the other ranks write into a scratch folder
            run_dir = distributed.share(make_run_dir(prep.cfg.out, prep.cfg.arch, run_name)
                                        if distributed.is_main() else None)
            return prep, (run_dir if distributed.is_main() else Path(tempfile.mkdtemp(prefix="hpa-rank-"))), None
        return prep, make_run_dir(prep.cfg.out, prep.cfg.arch, run_name), None
    run_dir = Path(cfg.resume)
    ckpt_path = run_dir / "checkpoint.pth"
    if not (run_dir / "config.json").is_file():
        raise HPAError(f"--resume {run_dir}: not a run folder (no config.json)")
    if not ckpt_path.is_file():
        raise HPAError(f"--resume {run_dir}: no checkpoint.pth (the run ended before its first epoch); start it again")
    try:
        saved = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise HPAError(f"{run_dir / 'config.json'}: unreadable run config ({str(e)[:150]})") from None
    if not isinstance(saved, dict) or not {"lr_used", "pretrained_used"} <= set(saved):
        raise HPAError(f"{run_dir / 'config.json'}: not the config of a run that trained an epoch "
                       "(no lr_used, pretrained_used); start it again")
    try:
        ckpt = load_checkpoint(ckpt_path)
    except Exception as e:  # torch.load raises many types for a damaged file, some with no message
        reason = (str(e).splitlines() or [type(e).__name__])[0][:150]
        raise HPAError(f"{ckpt_path}: unreadable checkpoint ({reason})") from None
    missing = CHECKPOINT_KEYS - set(ckpt) if isinstance(ckpt, dict) else CHECKPOINT_KEYS
    if missing:
        raise HPAError(f"{ckpt_path}: not a checkpoint of this project (missing {', '.join(sorted(missing))})")
    stats = (saved["mean"], saved["std"]) if "mean" in saved and "std" in saved else None
    prep = prepare(dataclasses.replace(TrainConfig.from_json(run_dir / "config.json"), resume=None), stats)
    prep.device = distributed.init(prep.device)
    if not distributed.is_main():
        run_dir = Path(tempfile.mkdtemp(prefix="hpa-rank-"))
    return prep, run_dir, (saved, ckpt)


def train(cfg: TrainConfig, run_name: str | None = None) -> Path:
    """Train one model as ``cfg`` says (or continue ``cfg.resume``); returns the run folder
    (``cfg.out/run_name`` if given, else ``cfg.out/<time>-<arch>``)."""
    t_start = time.time()
    prep, run_dir, resumed = _start(cfg, run_name)
    main = distributed.is_main()
    console.quiet = not main
    cfg = prep.cfg
    log(f"{'resuming' if resumed else 'run folder'} {run_dir}")
    log(f"data {prep.data_dir} ({prep.fmt}, {len(prep.items)} images, {cfg.channels}, {cfg.size}px)")
    if not resumed:
        write_json(run_dir / "config.json", cfg.to_json())
    write_json(run_dir / "status.json", {"status": "running", "started": datetime.now().isoformat(timespec="seconds")})
    try:
        learn, used_pretrained = build_learner(prep, run_dir)
        if resumed:
            used_pretrained = resumed[0]["pretrained_used"]
        learn.hpa_pretrained = used_pretrained
        log(f"model {cfg.arch} ({'ImageNet weights' if used_pretrained else cfg.weights or 'random init'}), "
            f"{len(learn.dls.train_ds)} train / {len(learn.dls.valid_ds)} valid images, "
            f"device {prep.device.type}, precision {learn.hpa_precision}")
        lr = _learning_rate(cfg, learn, run_dir, resumed)
    except BaseException as e:  # --bs too large, --weights that do not fit, a library error: never left "running"
        write_json(run_dir / "status.json", {"status": "interrupted", "epochs_done": 0} if isinstance(
            e, KeyboardInterrupt) else {"status": "failed", "reason": _reason(e), "epochs_done": 0})
        raise
    if not resumed:
        write_json(run_dir / "config.json", {**cfg.to_json(), "lr_used": lr, "pretrained_used": used_pretrained,
                                             "precision_used": learn.hpa_precision, "mean": prep.mean, "std": prep.std})
    comp = np.greater if cfg.monitor_higher_is_better else np.less
    checkpoint, stopper = Checkpoint(run_dir / "checkpoint.pth", skip_last=not cfg.keep_checkpoint), StopOnSignal()
    fit_cbs = [WarmupEarlyStopping(monitor=cfg.monitor, comp=comp, patience=cfg.patience),
               AtomicSaveModel(monitor=cfg.monitor, comp=comp, fname="best", reset_on_fit=False),
               checkpoint, NaNGuard(), stopper]
    if cfg.log == "tensorboard":
        from fastai.callback.tensorboard import TensorBoardCallback
        fit_cbs.append(TensorBoardCallback(log_dir=run_dir / "tensorboard", trace_model=False))
    logger = learn.cbs.filter(lambda c: isinstance(c, EpochLogger))[0]
    phases = _phases(cfg, lr, used_pretrained)
    names = [p[0] for p in phases]
    skip_to, start_epoch = (names.index(resumed[1]["phase"]), resumed[1]["epochs_done"]) if resumed else (0, 0)
    # under several processes a signal reaches each at a different batch; let the launcher handle it
    previous_handlers = _catch_signals(stopper.handle) if distributed.world_size() == 1 else {}
    try:
        with distributed.context(learn, prep.device):
            _fit_phases(learn, phases, fit_cbs, resumed, skip_to, checkpoint, logger, stopper, run_dir, lr)
    except HPAError as e:
        write_json(run_dir / "status.json", {"status": "failed", "reason": str(e), "epochs_done": len(logger.rows)})
        raise
    except KeyboardInterrupt:
        write_json(run_dir / "status.json", {"status": "interrupted", "epochs_done": len(logger.rows)})
        log(f"interrupted after {len(logger.rows)} complete epoch(s); continue with: "
            f"python run.py --resume {run_dir}")
        raise
    except Exception as e:  # out of memory, a bug: the run folder must not claim to be running
        write_json(run_dir / "status.json", {"status": "failed", "reason": f"{type(e).__name__}: {e}"[:500],
                                             "epochs_done": len(logger.rows)})
        raise
    finally:
        _restore_signals(previous_handlers)
        if not main:
            shutil.rmtree(run_dir, ignore_errors=True)
    if not main:
        return None
    history = pd.DataFrame(logger.rows)
    plots.curves_plot(run_dir / "curves.png", history)
    save = next(cb for cb in fit_cbs if isinstance(cb, AtomicSaveModel))
    valid_preds = save.best_preds if distributed.world_size() == 1 else None
    if valid_preds is None or len(valid_preds[0]) != len(learn.dls.valid_ds):  # the best epoch was before a --resume, or each process saw a share
        with distributed.single_process():
            valid_preds = learn.get_preds(dl=learn.dls.valid)
    result = evaluate_valid(learn, prep, run_dir, history, t_start, valid_preds)
    learn.remove_cb(logger)
    export_model(learn, model_meta(prep, result["thresholds"]), run_dir)
    status = "stopped early" if result["stopped_early"] else "finished"
    write_json(run_dir / "status.json", {"status": status, "finished": datetime.now().isoformat(timespec="seconds"),
                                         "seconds": round(time.time() - t_start, 1)})
    if cfg.keep_checkpoint:
        save.write()
    else:
        remove_resume_files(run_dir)
    from .report import log_tensorboard_summary, write_report

    log(f"report {write_report(run_dir)}")
    if cfg.log == "tensorboard":
        log_tensorboard_summary(run_dir, result)
    point_latest(run_dir)
    at = "threshold 0.5" if cfg.threshold == 0.5 else f"threshold {cfg.threshold}"
    summary = pd.DataFrame([
        {"": "macro F1", at: result["f1_macro"], "tuned thresholds": result["f1_macro_tuned"]},
        {"": "samples F1", at: result["f1_samples"], "tuned thresholds": result["f1_samples_tuned"]},
    ])
    console.print(table(f"best epoch {result['best_epoch']} of {result['epochs_run']} ({status}), "
                        f"{result['seconds']:.0f}s", summary))
    log(f"artifacts in {run_dir} (exported model: export.pkl, model.safetensors + model.json)")
    return run_dir


RESUME_FILES = ("checkpoint.pth", "best.pth")


def remove_resume_files(run_dir: Path) -> None:
    """A finished run is exported: what only --resume needs (three times the model's size) goes."""
    for name in RESUME_FILES:
        (run_dir / name).unlink(missing_ok=True)


def _reason(e: BaseException) -> str:
    return str(e) if isinstance(e, HPAError) else f"{type(e).__name__}: {e}"[:500]


def _learning_rate(cfg: TrainConfig, learn, run_dir: Path, resumed) -> float:
    if resumed:
        return resumed[0]["lr_used"]
    if cfg.lr != "auto":
        return float(cfg.lr)
    # rank 0 alone, before the processes are joined; the others wait for its answer
    lr = distributed.share(find_lr(learn, run_dir, cfg.lr_find_iters or auto_lr_find_iters(learn))["valley"]
                           if distributed.is_main() else None)
    log(f"learning rate {lr:.3e} (lr_find valley)")
    return lr


def _fit_phases(learn, phases, fit_cbs, resumed, skip_to, checkpoint, logger, stopper, run_dir, lr) -> None:
    """The one-cycle fits of the run's phases, from where a resumed run left off."""
    for i, (phase, n_epochs, phase_lr) in enumerate(phases):
        if i < skip_to:
            continue
        logger.phase = checkpoint.phase = phase
        checkpoint.final_phase = i == len(phases) - 1
        if phase == "frozen":
            learn.freeze()
        elif phase == "unfrozen":
            learn.unfreeze()
        first = 0
        if resumed and i == skip_to:
            first = _restore(learn, resumed[1], checkpoint, logger)
            log(f"continuing phase {phase} after epoch {first} of {n_epochs}")
        learn.fit_one_cycle(n_epochs, phase_lr, cbs=fit_cbs, start_epoch=first)
        if stopper.requested:
            raise KeyboardInterrupt
        if getattr(learn, "hpa_nan", None):
            nan = learn.hpa_nan
            raise HPAError(f"training stopped: the loss became {nan['loss']} at epoch {len(logger.rows) + 1}, "
                           f"batch {nan['batch'] + 1}; nothing was exported. Last good checkpoint: "
                           f"{run_dir / 'checkpoint.pth'}. Lower --lr (now {lr:.3g}) or check the data")


def _restore(learn, ckpt: dict, checkpoint: Checkpoint, logger: EpochLogger) -> int:
    """Put model, optimizer, trackers, history and RNG back as they were after the checkpoint's epoch."""
    try:
        learn.model.load_state_dict(ckpt["model"])
        if learn.opt is None:
            learn.create_opt()
        load_opt_state(learn.opt, ckpt["opt"])
    except (RuntimeError, AssertionError, KeyError, ValueError) as e:
        raise HPAError(f"checkpoint.pth does not fit this run's model ({str(e).splitlines()[0][:150]})") from None
    logger.rows = list(ckpt["history"])
    checkpoint.restore = ckpt
    set_rng_state(learn, ckpt["rng"])
    return ckpt["epochs_done"]


def _catch_signals(handler) -> dict:
    """Route Ctrl-C and SIGTERM to ``handler`` while training (main thread only: signal's rule)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}


def _restore_signals(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def auto_lr_find_iters(learn) -> int:
    """100 iterations (fastai's default) on a real data set; on a tiny one, about five epochs' worth."""
    return int(min(100, max(20, 5 * len(learn.dls.train))))


def lr_find_only(cfg: TrainConfig) -> Path:
    prep = prepare(cfg)
    run_dir = make_run_dir(prep.cfg.out, f"lr_find-{prep.cfg.arch}")
    learn, _ = build_learner(prep, run_dir)
    write_json(run_dir / "config.json", prep.cfg.to_json())
    find_lr(learn, run_dir, prep.cfg.lr_find_iters or auto_lr_find_iters(learn))
    log(f"plot: {run_dir / 'lr_find.png'}")
    return run_dir
