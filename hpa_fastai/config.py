"""One configuration object per command: the single source of every default and of the CLI's flags.

Each field's metadata carries its help text; ``cli.py`` turns fields into flags one-to-one and
the run folder stores the resolved training config as ``config.json``.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path


def opt(default, help: str, **argparse_kwargs):
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass
class TrainConfig:
    data: str | None = opt(None, "competition folder (train.csv + train/); default: the bundled sample in data/sample")
    # str | list: the command line gives a list (nargs); from Python one folder may be a str
    extra_data: str | list | None = opt(None, "external labelled folder(s) trained on together with --data, "
                                              "e.g. HPAv18 images: train.csv (Id,Target) + train/{Id}_{stain}.jpg "
                                              "or .png at any resolution", nargs="+")
    arch: str = opt("resnet34", "cnn, resnet18, resnet34, resnet50, or timm:<name> (e.g. timm:convnext_tiny)")
    epochs: int = opt(10, "training epochs (after the frozen epochs of a pretrained model)")
    size: int | None = opt(None, "image side in pixels; default: the images' own size, at most 256")
    bs: int = opt(32, "batch size")
    lr: str = opt("auto", "learning rate: a number, or 'auto' for lr_find's valley suggestion")
    lr_find_iters: int | None = opt(None, "iterations of the learning-rate finder; default: 100, fewer on a tiny data set")
    seed: int = opt(42, "random seed: split, initialisation, augmentation order")
    out: str = opt("runs", "parent folder of the run folders")
    channels: str = opt("auto", "rgb or rgby; default: rgby for HPA 2018 data, rgb for Zero-to-GANs",
                        choices=["auto", "rgb", "rgby"])
    pretrained: bool = opt(True, "start from ImageNet weights when they are cached or downloadable")
    weights: str | None = opt(None, "start from this local checkpoint (.pth state dict or safetensors)")
    loss: str = opt("bce", "loss function", choices=["bce", "focal"])
    focal_gamma: float = opt(2.0, "gamma of the focal loss")
    valid_pct: float = opt(0.2, "share of images held out for validation (random split)")
    n_folds: int = opt(0, "multi-label stratified K-fold split: number of folds (0 = random split)")
    fold: int = opt(0, "which fold is the validation set when --n-folds is set")
    patience: int = opt(5, "early stopping: epochs without improvement of --monitor")
    monitor: str = opt("f1_macro", "metric for early stopping and best-epoch selection",
                       choices=["f1_macro", "f1_samples", "valid_loss"])
    threshold: float = opt(0.5, "probability threshold of the F1 metrics during training")
    precision: str = opt("auto", "auto: mixed precision on CUDA (bf16 where supported), fp32 on CPU",
                         choices=["auto", "fp32", "fp16", "bf16"])
    workers: int | None = opt(None, "DataLoader worker processes, at most 64 and no more than the cores or images; "
                                    "default: 0 on CPU, up to 8 on GPU")
    freeze_epochs: int = opt(1, "epochs with the pretrained body frozen before unfreezing")
    skip_bad: bool = opt(False, "drop bad rows and unreadable images (listed in the log) instead of stopping")
    keep_checkpoint: bool = opt(False, "keep checkpoint.pth and best.pth once the run has finished and exported "
                                       "(failed, stopped and interrupted runs always keep them for --resume)")
    log: str = opt("none", "extra logger", choices=["none", "tensorboard"])
    resume: str | None = opt(None, "continue the interrupted run in this folder from its last complete epoch "
                                   "(its saved config is used; other flags are ignored)")

    @property
    def monitor_higher_is_better(self) -> bool:
        return self.monitor != "valid_loss"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, path) -> "TrainConfig":
        data = json.loads(Path(path).read_text())
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class PredictConfig:
    learner: str | list = opt("runs/latest", "run folder, model.json, or export.pkl of a trained model; "
                                             "several (--learner A B), or a cv folder (run.py cv), average "
                                             "their probabilities as an ensemble", nargs="+")
    data: str | None = opt(None, "competition folder, folder of images, or one image; default: the bundled sample")
    out: str = opt("submission.csv", "output CSV")
    threshold: float | None = opt(None, "one global threshold instead of the tuned per-class ones")
    tta: bool = opt(False, "average over the 8 flips and 90-degree rotations")
    tta_max: bool = opt(False, "like --tta, but take the maximum over the 8 orientations")
    bs: int = opt(32, "batch size")
    workers: int | None = opt(None, "DataLoader worker processes, at most 64 and no more than the cores or images")
    trust: bool = opt(False, "allow unpickling an export.pkl, which can run any code: only for files you made")


@dataclass
class EvaluateConfig:
    learner: str = opt("runs/latest", "run folder, model.json, or export.pkl of a trained model")
    data: str | None = opt(None, "labelled competition folder; default: the bundled sample")
    out: str | None = opt(None, "report folder; default: <run folder>/evaluate")
    threshold: float | None = opt(None, "one global threshold instead of the tuned per-class ones")
    tta: bool = opt(False, "average over the 8 flips and 90-degree rotations")
    bs: int = opt(32, "batch size")
    workers: int | None = opt(None, "DataLoader worker processes, at most 64 and no more than the cores or images")
    trust: bool = opt(False, "allow unpickling an export.pkl, which can run any code: only for files you made")


@dataclass
class SynthConfig:
    out: str = opt("data/synthetic", "folder to write the data set to")
    format: str = opt("z2g", "layout to write", choices=["z2g", "hpa2018"])
    n_train: int = opt(200, "labelled training images")
    n_test: int = opt(40, "unlabelled test images")
    size: int = opt(512, "image side in pixels")
    seed: int = opt(0, "random seed")
    easy: bool = opt(False, "stronger signal and less noise (for quick experiments)")


@dataclass
class RunsConfig:
    dir: str = opt("runs", "folder of run folders", positional=True, nargs="?")
    sort: str = opt("date", "column to sort by", choices=["date", "arch", "size", "epochs", "f1", "f1_tuned", "time", "status", "disk"])
    csv: str | None = opt(None, "also write the table to this CSV file")


@dataclass
class ReportConfig:
    runs: list = opt(None, "run folder(s); with several, a comparison page", positional=True, nargs="+")
    out: str | None = opt(None, "output HTML file; default: report.html in the run folder (comparison.html for several)")


@dataclass
class ExportConfig:
    learner: str = opt("runs/latest", "run folder or model.json of a trained model")
    onnx: bool = opt(False, "also write model.onnx with the normalisation inside the graph")
    out: str | None = opt(None, "output file; default: model.onnx in the run folder")


@dataclass
class PreprocessConfig:
    data: str | None = opt(None, "competition folder to cache; default: the bundled sample")
    size: int = opt(256, "image side of the cached copy")
    channels: str = opt("auto", "rgb or rgby; default: rgby for HPA 2018 data, rgb for Zero-to-GANs",
                        choices=["auto", "rgb", "rgby"])
    workers: int | None = opt(None, "parallel worker processes, at most 64 and no more than the cores or images; "
                                    "default: all cores")


@dataclass
class DedupConfig:
    data: str | None = opt(None, "competition folder to search; default: the bundled sample")
    max_distance: int = opt(8, "largest Hamming distance (of 64 bits) between perceptual hashes that counts as a duplicate")
    out: str | None = opt(None, "output CSV; default: duplicates.csv in the data folder")
