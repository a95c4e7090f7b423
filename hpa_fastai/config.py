"""One configuration object per command: every default, every constraint on it, and the CLI's flags.

Each field's metadata carries its help text and its constraint (``check``); ``cli/flags.py`` turns
fields into flags one-to-one, ``validate`` applies the constraints (to flags, to a config made
from Python, to a hand-edited config.json), and the run folder stores the resolved training
config as ``config.json``. What only the model registry knows (which architectures exist) is
checked by ``models.check_arch``.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field

from .errors import HPAError

MIN_SIZE = 8  # fastai's augmentation divides by zero on 1 px images; below 8 px no model sees anything
MAX_SIZE = 4096  # a larger --size would only exhaust memory (a 100000 px side is 30 GB per image)
MAX_WORKERS = 64  # more worker processes than this only exhaust memory and process tables
LOSSES = ("bce", "focal", "asl")  # the names of the losses.py registry, for the --loss flag


def opt(default, help: str, check=None, **argparse_kwargs):
    """A config field: its default, its ``--help`` text, and ``check(value) -> problem or None``."""
    return field(default=default, metadata={"help": help, "check": check, **argparse_kwargs})


# --- constraints: each returns what is wrong with a value, or None -------------------------------

def at_least(low, unit: str = ""):
    return lambda v: None if v >= low else f"must be at least {low}{unit} (got {v})"


def in_range(low, high, unit: str = ""):
    def check(v):
        if v < low:
            return f"must be at least {low}{unit} (got {v})"
        if v > high:
            return f"must be at most {high}{unit} (got {v})"
        return None
    return check


def finite_in_range(low, high):
    return lambda v: None if math.isfinite(v) and low <= v <= high else f"must be {low} to {high} (got {v})"


def strictly_between(low, high):
    return lambda v: None if low < v < high else f"must be between {low} and {high} (got {v})"


def finite_at_least(low):
    return lambda v: None if math.isfinite(v) and v >= low else f"must be {low} or more (got {v})"


def learning_rate(v):
    if v in ("auto", "valley"):
        return None
    try:
        lr = float(v)
    except ValueError:
        return f"must be a number, 'auto' or 'valley' (got {v!r:.40})"
    return None if lr > 0 and math.isfinite(lr) else f"must be positive (got {v})"


def fold_count(v):
    return None if v == 0 or v >= 2 else f"must be 0 (random split) or at least 2 (got {v})"


def not_empty(v):
    return None if v.strip() else "is empty: give the folder that holds the run folders"


def not_blank(v):
    return None if v.strip() and v.isprintable() else f"must be a path (got {v!r:.80})"


TRACKERS = ("tensorboard", "mlflow", "wandb")  # --log: training/trackers.py starts each


def trackers(log) -> list[str]:
    """The known trackers a ``log`` value names, in order, each once (``none``: none); anything else
    in it (a hand-edited config.json) names none."""
    names = [log] if isinstance(log, str) else list(log) if isinstance(log, (list, tuple)) else []
    return [name for name in dict.fromkeys(n for n in names if isinstance(n, str)) if name in TRACKERS]


def tracker_names(v):
    names = [v] if isinstance(v, str) else v
    if not names or not all(isinstance(n, str) for n in names):
        return f"must be tracker names (got {v!r:.80})"
    bad = next((n for n in names if n not in ("none", *TRACKERS)), None)
    if bad is not None:
        return f"must be none or any of {', '.join(TRACKERS)} (got {bad!r:.40})"
    if "none" in names and len(names) > 1:
        return "none cannot be combined with a tracker"
    return None


def callback_specs(v):
    specs = [v] if isinstance(v, str) else v
    for spec in specs:
        if not isinstance(spec, str):
            return f"must be module:Class (got {spec!r:.80})"
        module, _, name = spec.rpartition(":")
        if not module or not name.isidentifier() or not spec.isprintable():
            return f"must be module:Class or path/to/file.py:Class (got {spec!r:.80})"
    return None


def size_check(low=MIN_SIZE):
    return in_range(low, MAX_SIZE, " pixels")


WORKERS = in_range(0, MAX_WORKERS)
SEED = in_range(0, 2**32 - 1)  # numpy's seed range


@dataclass
class TrainConfig:
    data: str | None = opt(None, "competition folder (train.csv + train/); default: the bundled sample")
    # str | list: the command line gives a list (nargs); from Python one folder may be a str
    extra_data: str | list | None = opt(None, "external labelled folder(s) trained on together with --data, "
                                              "e.g. HPAv18 images: train.csv (Id,Target) + train/{Id}_{stain}.jpg "
                                              "or .png at any resolution", nargs="+")
    arch: str = opt("resnet34", "cnn, resnet18, resnet34, resnet50, resnet101, resnet152, densenet121, seresnext50, "
                                "inception_v3, or timm:<name> (e.g. timm:convnext_tiny)")
    epochs: int = opt(10, "training epochs (after the frozen epochs of a pretrained model)", at_least(1))
    size: int | None = opt(None, "image side in pixels; default: the images' own size, at most 256", size_check())
    bs: int = opt(32, "batch size", at_least(1))
    lr: str = opt("auto", "learning rate: a number; 'auto': a tenth of where lr_find's smoothed loss is lowest "
                          "(1e-3 when lr_find ran fewer than 50 iterations or its curve is flat); 'valley': "
                          "fastai's valley suggestion", learning_rate)
    wd: float = opt(0.01, "weight decay (decoupled, AdamW's) of the weight matrices and convolution kernels",
                    finite_in_range(0, 1))
    lr_find_iters: int | None = opt(None, "iterations of the learning-rate finder; default: 100, fewer on a tiny "
                                          "data set", at_least(1))
    seed: int = opt(42, "random seed: split, initialisation, augmentation order", SEED)
    out: str = opt("runs", "parent folder of the run folders", not_empty)
    channels: str = opt("auto", "rgb or rgby; default: rgby for HPA 2018 data, rgb for Zero-to-GANs",
                        choices=["auto", "rgb", "rgby"])
    pretrained: bool = opt(True, "start from ImageNet weights when they are cached or downloadable")
    weights: str | None = opt(None, "start from these weights: an ImageNet file of --arch as torchvision or timm "
                                    "publish it (.pth, .safetensors), an earlier run (its folder, model.json or "
                                    "model.safetensors; other stains and classes are adapted), or a state dict of "
                                    "this model")
    loss: str = opt("bce", "loss function: bce, focal, or asl (the asymmetric loss, for imbalanced multi-label data)",
                    choices=list(LOSSES))
    focal_gamma: float = opt(2.0, "gamma of the focal loss", finite_at_least(0))
    asl_gamma_neg: float = opt(4.0, "asymmetric loss: focusing exponent of the negative labels (easy negatives "
                                    "count less)", finite_at_least(0))
    asl_gamma_pos: float = opt(0.0, "asymmetric loss: focusing exponent of the positive labels", finite_at_least(0))
    asl_clip: float = opt(0.05, "asymmetric loss: probability margin below which a negative label costs nothing",
                          in_range(0, 0.5))
    # on by default, capped at 3: on skewed synthetic data it gained 0.08-0.09 out-of-sample macro F1
    # over no oversampling (two seeds), and it lost nothing on balanced data (bench/quality.py)
    oversample: bool = opt(True, "draw training images more often the rarer their rarest label is (same number "
                                 "of images per epoch); --no-oversample draws each image once per epoch")
    oversample_cap: float = opt(3.0, "oversampling: the most an image is drawn more often than one whose labels "
                                     "are all of the most common class", in_range(1, 1000))
    progressive_size: int | None = opt(None, "progressive resizing: train the first --progressive-epochs epochs at "
                                             "this smaller side, the rest at --size", size_check())
    progressive_epochs: int | None = opt(None, "progressive resizing: epochs at --progressive-size; default: half "
                                               "of --epochs", at_least(1))
    valid_pct: float = opt(0.2, "share of images held out for validation (random split)", strictly_between(0, 1))
    n_folds: int = opt(0, "multi-label stratified K-fold split: number of folds (0 = random split)", fold_count)
    fold: int = opt(0, "which fold is the validation set when --n-folds is set")
    patience: int = opt(5, "early stopping: epochs without improvement of --monitor", at_least(1))
    # the validation loss: F1 at one fixed threshold can fall to 0 while the model learns (its
    # probabilities drop below 0.5 before they separate), which exported untrained first epochs;
    # bench/quality.py --study defaults measured the choice (README, "Defaults, measured")
    monitor: str = opt("valid_loss", "metric for early stopping and best-epoch selection",
                       choices=["valid_loss", "f1_macro", "f1_samples"])
    threshold: float = opt(0.5, "probability threshold of the F1 metrics during training", strictly_between(0, 1))
    precision: str = opt("auto", "auto: mixed precision on CUDA (bf16 where supported), fp32 on CPU; bf16 also "
                                 "runs on CPU, fp16 only on CUDA", choices=["auto", "fp32", "fp16", "bf16"])
    memory_format: str = opt("auto", "layout of weights and batches; auto: channels-last on CUDA, contiguous on CPU",
                             choices=["auto", "channels-last", "contiguous"])
    compile: bool = opt(False, "wrap the model in torch.compile (minutes of compiling first, then faster steps "
                               "on a GPU); the exports hold the plain model's weights")
    workers: int | None = opt(None, "DataLoader worker processes, at most 64 and no more than the cores or images; "
                                    "default: 0 on CPU, one per core on GPU", WORKERS)
    freeze_epochs: int = opt(1, "epochs with the pretrained body frozen before unfreezing", finite_at_least(0))
    # the HPA 2018 winners' training tricks, each off by default: none gained out-of-sample macro F1 over
    # the defaults on every one of three seeds on skewed synthetic data (bench/quality.py, README "Training tricks")
    ema: bool = opt(False, "keep an exponential moving average of the weights (timm's ModelEmaV3): validation, the "
                           "best epoch and the exported model use the average")
    swa: bool = opt(False, "stochastic weight averaging (torch's swa_utils) over the last --swa-epochs epochs, "
                           "BatchNorm statistics recomputed: validation, the best epoch and the export use the average")
    swa_epochs: int | None = opt(None, "epochs --swa averages, the last of the run; default: a quarter of --epochs, "
                                       "at least 2", at_least(1))
    accumulate: int = opt(1, "gradient accumulation: one optimizer step per ACCUMULATE batches, an effective batch "
                             "of ACCUMULATE x --bs (where a large --size leaves room for few images)",
                          in_range(1, 1024))
    mixup: bool = opt(False, "MixUp (fastai's): each training image blended with another, the labels mixed as "
                             "probabilities in the same proportion")
    cutmix: bool = opt(False, "CutMix (fastai's): a patch of another training image pasted in, the labels mixed as "
                              "probabilities in proportion to the areas")
    skip_bad: bool = opt(False, "drop bad rows and unreadable images (listed in the log) instead of stopping")
    keep_checkpoint: bool = opt(False, "keep checkpoint.pth and best.pth once the run has finished and exported "
                                       "(failed, stopped and interrupted runs always keep them for --resume)")
    # str | list: the command line gives a list (nargs); config.json before trackers could be combined a str
    log: str | list = opt("none", "experiment trackers, any of: tensorboard mlflow wandb (e.g. --log mlflow wandb); "
                                  "mlflow records into $MLFLOW_TRACKING_URI or else <--out>/mlflow.db, wandb into "
                                  "$WANDB_PROJECT (offline with WANDB_MODE=offline)", tracker_names, nargs="+")
    callback: str | list | None = opt(None, "add your own fastai callback to every fit: module:Class or "
                                            "path/to/file.py:Class, created without arguments. This imports and runs "
                                            "that code: name only code you trust", callback_specs, nargs="+")
    cache: str | None = opt(None, "folder for the preprocessed cache of a read-only data folder (a folder of its "
                                  "own per data set); default: $HPA_FASTAI_CACHE, else the data folder when it is "
                                  "writable, else ~/.cache/hpa_fastai", not_blank)
    duplicates: str | None = opt(None, "near-duplicate list to keep together in the split (dedup's CSV); default: "
                                       "the one dedup wrote for --data, if any", not_blank)
    per_class: bool = opt(False, "also print the per-class table (threshold, precision, recall, F1, support) when the "
                                 "run ends; report.html and per_class.csv always hold it")
    resume: str | None = opt(None, "continue the interrupted run in this folder from its last complete epoch "
                                   "(its saved config is used; other flags are ignored)")

    @property
    def monitor_higher_is_better(self) -> bool:
        return self.monitor != "valid_loss"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        """The config a run folder's config.json holds (its other keys, e.g. ``lr_used``, left out);
        ``validate`` checks its values as it checks flags."""
        names = {f.name for f in dataclasses.fields(cls)}
        # a config written before oversampling existed trained without it, whatever today's default
        data = {"oversample": False, **data}
        return cls(**{k: v for k, v in data.items() if k in names})

    def _check_together(self) -> str | None:
        if self.n_folds and not 0 <= self.fold < self.n_folds:
            return f"--fold must be in 0..{self.n_folds - 1} (got {self.fold})"
        if self.progressive_size is not None and self.size is not None and self.progressive_size >= self.size:
            return f"--progressive-size must be smaller than --size (got {self.progressive_size} and {self.size})"
        if self.progressive_epochs is not None and self.progressive_size is None:
            return "--progressive-epochs needs --progressive-size"
        if self.progressive_epochs is not None and self.progressive_epochs >= self.epochs:
            return f"--progressive-epochs must be fewer than --epochs (got {self.progressive_epochs} of {self.epochs})"
        if self.ema and self.swa:
            return "--ema and --swa each put averaged weights in place of the trained ones: choose one"
        if self.swa_epochs is not None and not self.swa:
            return "--swa-epochs needs --swa"
        if self.swa_epochs is not None and self.swa_epochs > self.epochs:
            return f"--swa-epochs must be at most --epochs (got {self.swa_epochs} of {self.epochs})"
        if self.mixup and self.cutmix:
            return "--mixup and --cutmix each mix the training images: choose one"
        if (self.mixup or self.cutmix) and self.bs < 2:
            return f"--{'mixup' if self.mixup else 'cutmix'} mixes images within a batch: it needs --bs 2 or more"
        return None


def study_name(v):
    plain = v and len(v) <= 100 and v[0] not in ".-" and all(c.isascii() and (c.isalnum() or c in "._-") for c in v)
    return None if plain else f"must be a plain name of letters, digits, '.', '_' and '-', at most 100 (got {v!r:.80})"


STORAGE_SCHEMES = ("postgresql://", "postgresql+psycopg://", "postgres://")


def storage_url(v):
    if not v.startswith(STORAGE_SCHEMES):
        return (f"must be a PostgreSQL URL, postgresql://USER:PASSWORD@HOST[:PORT]/DATABASE (got "
                f"{v.split('://')[0][:40]!r}:...); without --storage the study is a file in its folder")
    return None if v.isprintable() and " " not in v and len(v) <= 2000 else "must be a URL without spaces"


def positive_seconds(v):
    return None if math.isfinite(v) and v > 0 else f"must be a positive number of seconds (got {v})"


# what a search optimises: the run's metrics.json key (or the best epoch's validation loss) and whether
# higher is better
OBJECTIVES = {"f1_macro_tuned_oos": "maximize", "f1_macro": "maximize", "valid_loss": "minimize"}


@dataclass
class TuneConfig(TrainConfig):
    """``run.py tune``: the training flags (each trial is a training run) and the search's own. A
    training flag given on the command line is held fixed; the space draws the others."""
    seed: int = opt(42, "random seed of every trial's training (split, initialisation, augmentation order) and "
                        "of the search's sampler", SEED)
    resume: str | None = opt(None, "not for tune: run the same tune command again to continue its study")
    n_trials: int = opt(20, "finished trials (complete or pruned) the study should hold; a study that holds some "
                            "already runs only the rest", in_range(1, 100_000))
    timeout: float | None = opt(None, "start no new trial after this many seconds (running trials finish)",
                                positive_seconds)
    study: str = opt("default", "the study's name: its folder is <--out>/tune-<study>; the same command continues "
                                "it", study_name)
    storage: str | None = opt(None, "where the study lives: default a journal file in its folder (no server; --jobs "
                                    "workers share it); postgresql://USER:PASSWORD@HOST/DB for tune commands on "
                                    "several machines", storage_url)
    space: str | None = opt(None, "TOML file of the search space (TrainConfig fields with their ranges or choices); "
                                  "default: the built-in space")
    jobs: int = opt(1, "worker processes running trials at once on this machine (one GPU each where there are "
                       "several)", in_range(1, MAX_WORKERS))
    objective: str = opt("f1_macro_tuned_oos", "what the search optimises: f1_macro_tuned_oos (macro F1 at per-class "
                                               "thresholds tuned on one half of the validation images, scored on the "
                                               "other), f1_macro (at --threshold) or valid_loss (minimised)",
                         choices=list(OBJECTIVES))
    sampler: str = opt("tpe", "how trials are drawn: tpe (Optuna's tree-structured Parzen estimator) or random",
                       choices=["tpe", "random"])
    pruner: str = opt("median", "stop clearly worse trials early: median (below the median of the other trials at "
                                "the same epoch), halving (successive halving) or none",
                      choices=["median", "halving", "none"])
    confirm: int = opt(2, "retrain the best configuration with this many new seeds and report their mean and spread",
                       in_range(0, 20))

    def _check_together(self) -> str | None:
        if self.resume is not None:
            return "--resume is not for tune: run the same tune command again to continue its study"
        return super()._check_together()

    def training_config(self) -> TrainConfig:
        """The training flags alone: what each trial starts from."""
        return TrainConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TrainConfig)})


def _threshold(v):
    return None if 0 < v < 1 else f"must be between 0 and 1 (got {v})"


@dataclass
class _Scoring:
    """The flags that predicting with a trained model takes, for ``predict`` and ``evaluate`` alike."""
    threshold: float | None = opt(None, "one global threshold instead of the tuned per-class ones", _threshold)
    tta: bool = opt(False, "average over the 8 flips and 90-degree rotations")
    bs: int = opt(32, "batch size", at_least(1))
    workers: int | None = opt(None, "DataLoader worker processes, at most 64 and no more than the cores or images",
                              WORKERS)
    precision: str = opt("auto", "auto: on CUDA the precision the model trained in, fp32 on CPU; or fp32, "
                                 "bf16 (CPU or CUDA), fp16 (CUDA)", choices=["auto", "fp32", "bf16", "fp16"])
    trust: bool = opt(False, "allow unpickling an export.pkl, which can run any code: only for files you made")


@dataclass
class PredictConfig(_Scoring):
    learner: str | list = opt("runs/latest", "run folder, model.json, or export.pkl of a trained model; "
                                             "several (--learner A B), or a cv folder (hpa-fastai cv), average "
                                             "their probabilities as an ensemble", nargs="+")
    data: str | None = opt(None, "competition folder, folder of images, or one image; default: the bundled sample")
    out: str = opt("submission.csv", "output CSV")
    tta_max: bool = opt(False, "like --tta, but take the maximum over the 8 orientations")
    cam: str | None = opt(None, "also write class activation maps (a heatmap per predicted class and a probability "
                                "chart per image) into this folder; one model only")


@dataclass
class EvaluateConfig(_Scoring):
    learner: str = opt("runs/latest", "run folder, model.json, or export.pkl of a trained model")
    data: str | None = opt(None, "labelled competition folder; default: the bundled sample")
    out: str | None = opt(None, "report folder; default: <run folder>/evaluate")


def class_indices(v):
    ids = [v] if isinstance(v, int) else v
    ok = all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in ids)
    return None if ok else f"must be class ids, 0 or more (got {v!r:.80})"


MAX_CAM_BATCH = 256  # a Grad-CAM batch keeps every activation of the model for the backward passes


@dataclass
class ExplainConfig:
    images: list = opt(None, "image files; for an RGBY model any one stain file of an image, or the {id} prefix of "
                             "its four", positional=True, nargs="+")
    learner: str = opt("runs/latest", "run folder, model.json, or export.pkl of one trained model")
    out: str = opt("explanations", "folder to write into: per image a heatmap per class ({id}_camNN_{class}.png), "
                                   "a probability chart ({id}_probabilities.png), and explanations.csv")
    # int | list: the command line gives a list (nargs); from Python one class may be an int
    classes: int | list | None = opt(None, "class ids to draw heatmaps for; default: the predicted classes (the most "
                                           "probable one when none reaches its threshold)", class_indices, nargs="+")
    threshold: float | None = opt(None, "one global threshold instead of the tuned per-class ones", _threshold)
    tta: bool = opt(False, "probabilities and heatmaps averaged over the 8 flips and 90-degree rotations")
    bs: int = opt(8, f"images per Grad-CAM batch (at most {MAX_CAM_BATCH})", in_range(1, MAX_CAM_BATCH))
    trust: bool = opt(False, "allow unpickling an export.pkl, which can run any code: only for files you made")


def host_name(v):
    return None if v.strip() and v.isprintable() and " " not in v else f"must be a host name or address (got {v!r:.60})"


@dataclass
class ServeConfig:
    learner: str = opt("runs/latest", "run folder or model.json of one trained model (the safe export; export.pkl "
                                      "is not unpickled)")
    host: str = opt("127.0.0.1", "address to listen on; 127.0.0.1 serves this machine only, 0.0.0.0 every network "
                                 "it is on", host_name)
    port: int = opt(7860, "port to listen on", in_range(1, 65535))
    examples: str | None = opt(None, "folder of images the page offers as examples to click (for an RGBY model, "
                                     "{id}_{red,green,blue,yellow} files); default: the bundled sample's test images, "
                                     "for a model of Zero-to-GANs RGB images")


@dataclass
class SynthConfig:
    out: str = opt("data/synthetic", "folder to write the data set to", not_empty)
    format: str = opt("z2g", "layout to write", choices=["z2g", "hpa2018"])
    n_train: int = opt(200, "labelled training images", at_least(1))
    n_test: int = opt(40, "unlabelled test images", at_least(0))
    size: int = opt(512, "image side in pixels", size_check(16))
    seed: int = opt(0, "random seed", SEED)
    easy: bool = opt(False, "stronger signal and less noise (for quick experiments)")
    plant_duplicates: int = opt(0, "also write this many near-duplicate training images (new ids, the labels of the "
                                   "image they copy), listed in duplicates.csv", at_least(0))


@dataclass
class RunsConfig:
    dir: str = opt("runs", "folder of run folders", positional=True, nargs="?")
    sort: str = opt("date", "column to sort by",
                    choices=["date", "arch", "size", "epochs", "f1", "f1_tuned", "f1_oos", "time", "status", "disk"])
    folds: bool = opt(False, "also list each cross-validation's fold runs under its row")
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


CACHE_HELP = ("folder for the cache when the data folder is read-only or should stay untouched (a folder of its own "
              "per data set); default: $HPA_FASTAI_CACHE, else the data folder when it is writable, else "
              "~/.cache/hpa_fastai")


@dataclass
class PreprocessConfig:
    data: str | None = opt(None, "competition folder to cache; default: the bundled sample")
    cache: str | None = opt(None, CACHE_HELP, not_blank)
    size: int = opt(256, "image side of the cached copy", size_check())
    channels: str = opt("auto", "rgb or rgby; default: rgby for HPA 2018 data, rgb for Zero-to-GANs",
                        choices=["auto", "rgb", "rgby"])
    workers: int | None = opt(None, "parallel worker processes, at most 64 and no more than the cores or images; "
                                    "default: all cores", in_range(1, MAX_WORKERS))


HASH_BITS = 64  # dedup's perceptual hash


@dataclass
class DedupConfig:
    data: str | None = opt(None, "competition folder to search; default: the bundled sample")
    max_distance: int = opt(8, "largest Hamming distance (of 64 bits) between perceptual hashes that counts as a "
                               "duplicate", in_range(0, HASH_BITS, " bits"))
    out: str | None = opt(None, "output CSV; default: duplicates.csv in the data folder when it is writable, else in "
                                "the data set's cache folder (--cache), where training finds it")
    cache: str | None = opt(None, "folder for the duplicates list of a read-only data folder (a folder of its own "
                                  "per data set, shared with preprocess's cache); default: $HPA_FASTAI_CACHE, else "
                                  "~/.cache/hpa_fastai", not_blank)


HPA2018_CLASSES = 28  # the HPA 2018 vocabulary (data/vocab.py), which HPAv18 shares
# download-hpav18's slowest server: --timeout bounds each wait for data, so a server sending a byte
# every half second would hold a 3 KB file for half an hour; a try also ends once it has taken
# --timeout seconds plus one second per this many bytes received (a 3 MB stain: --timeout + 190 s;
# the largest file accepted, 64 MiB: --timeout + 70 min)
HPAV18_MIN_RATE = 16_000


def hpa2018_class_ids(v):
    tokens = v.replace(",", " ").split() if isinstance(v, str) else [str(t) for t in v]
    bad = next((t for t in tokens if not (t.isascii() and t.isdigit() and int(t) < HPA2018_CLASSES)), None)
    if not tokens:
        return "is empty: give class ids, e.g. --classes 8 9 10 15 27"
    return None if bad is None else f"must be class ids 0..{HPA2018_CLASSES - 1} (got {bad!r:.40})"


def http_url(v):
    ok = v.startswith(("http://", "https://")) and len(v) > 8 and v.isprintable() and " " not in v
    return None if ok else f"must be an http:// or https:// URL (got {v!r:.80})"


@dataclass
class DownloadHPAv18Config:
    labels: str = opt(None, "the HPAv18 label CSV (Id,Target), e.g. HPAv18RBGY_wodpl.csv", positional=True)
    out: str = opt("data/hpav18", "folder to write into: train.csv (for --extra-data) and train/{Id}_{stain}.png "
                                  "or .jpg", not_empty)
    size: int | None = opt(None, "resize each stain to SIZE x SIZE pixels while downloading and store it as a "
                                 "grayscale PNG; default: keep the server's size", size_check())
    format: str = opt("auto", "png: 8-bit grayscale PNG of the stain; jpg: the server's colour JPEG, byte for byte; "
                              "auto: png with --size, jpg without", choices=["auto", "png", "jpg"])
    ids: int | None = opt(None, "fetch only the first IDS images of the label CSV (after --classes)", at_least(1))
    classes: str | list | None = opt(None, "fetch only images carrying at least one of these classes, e.g. the "
                                           "rare ones: --classes 8 9 10 15 27", hpa2018_class_ids, nargs="+")
    base_url: str = opt("http://v18.proteinatlas.org/images/", "the Atlas image server; a stain is "
                        "BASE_URL/<antibody>/<rest of the id>_<stain>.jpg", http_url)
    connections: int = opt(8, "parallel downloads, each over one kept-alive connection", in_range(1, 32))
    retries: int = opt(5, "further tries of a file after a dropped connection, a timeout, an HTTP 429 or 5xx, or a "
                          "file that does not decode", in_range(0, 20))
    backoff: float = opt(1.0, "seconds before the first retry of a file, doubled for each further one (with "
                              "jitter, at most 120)", lambda v: None if 0 <= v <= 120 else
                         f"must be 0 to 120 seconds (got {v})")
    timeout: float = opt(60.0, "seconds without data from the server before a try is given up; a try also ends "
                               f"once it has taken TIMEOUT seconds plus one second per {HPAV18_MIN_RATE // 1000} kB "
                               f"received (a server slower than {HPAV18_MIN_RATE // 1000} kB/s)",
                         lambda v: None if 1 <= v <= 3600 else f"must be 1 to 3600 seconds (got {v})")

    def _check_together(self) -> str | None:
        if self.format == "jpg" and self.size is not None:
            return "--format jpg keeps the server's files as they are: it cannot be combined with --size"
        return None


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _type_problem(value, annotation) -> str | None:
    allowed = typing.get_args(annotation) or (annotation,)
    types = tuple(t for t in allowed if t is not type(None))
    if value is None:
        ok = type(None) in allowed
    elif isinstance(value, bool):
        ok = bool in types
    else:
        ok = isinstance(value, types) or (float in types and isinstance(value, int))
    return None if ok else f"must be {' or '.join(t.__name__ for t in types)} (got {value!r:.80})"


def _field_problem(f: dataclasses.Field, value, annotation) -> str | None:
    problem = _type_problem(value, annotation)
    if problem is None and value is not None:
        if "choices" in f.metadata and value not in f.metadata["choices"]:
            problem = f"must be one of {', '.join(f.metadata['choices'])} (got {value!r:.80})"
        elif f.metadata.get("check") is not None:
            problem = f.metadata["check"](value)
    return problem


def validate(cfg) -> None:
    """Every constraint of ``cfg``'s fields, in field order; the first problem is an HPAError naming
    its flag. A hand-edited config.json or the Python API can put any value in a field, so the
    types are checked first."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        problem = _field_problem(f, getattr(cfg, f.name), hints[f.name])
        if problem is not None:
            raise HPAError(f"{flag(f.name)} {problem}")
    together = getattr(cfg, "_check_together", None)
    if together is not None and (problem := together()) is not None:
        raise HPAError(problem)


def check_field(cls, name: str, value) -> None:
    """``value`` checked as ``validate`` checks the field ``name`` of the config class ``cls``: for
    library functions that take one such value directly (``bound_workers(workers=...)``)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    problem = _field_problem(f, value, typing.get_type_hints(cls)[name])
    if problem is not None:
        raise HPAError(f"{flag(name)} {problem}")
