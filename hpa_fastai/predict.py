"""From a trained model to answers: load it (safely by default), predict with optional 8-fold TTA,
write Kaggle submissions, label folders of images, and evaluate on labelled data."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from fastai.callback.progress import ProgressCallback
from fastai.data.core import DataLoaders, Datasets, TfmdDL
from fastai.data.transforms import ColReader, IntToFloatTensor, Normalize
from fastai.learner import Learner

from . import metrics as M
from . import plots
from ._io import write_csv, write_json
from ._outputs import check_output, check_output_folder, for_spreadsheet
from .console import console, log, table
from .data import ReadImage, bound_workers, check_workers, default_workers, labels_matrix, read_image
from .errors import HPAError
from .formats import CHANNEL_SETS, FORMATS, key_files, read_items, scan_images
from .metrics import make_loss

SAFE_FILES = ("model.json", "model.safetensors")


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th of the 8 symmetries of the square (k in 0..7): optional transpose, then flips."""
    if k & 4:
        x = x.transpose(-1, -2)
    if k & 1:
        x = x.flip(-1)
    if k & 2:
        x = x.flip(-2)
    return x


class Predictor:
    """A trained model with what it needs to read images: channels, size, normalisation, vocabulary
    and per-class thresholds. Build one with ``load_predictor``."""

    def __init__(self, learn: Learner, meta: dict, source: Path, safe: bool):
        self.learn, self.meta, self.source, self.safe = learn, meta, source, safe
        self.learn.remove_cbs(self.learn.cbs.filter(lambda c: isinstance(c, ProgressCallback)))
        self.learn.model.eval()

    channels = property(lambda self: self.meta["channels"])
    size = property(lambda self: self.meta["size"])
    names = property(lambda self: self.meta["names"])
    format = property(lambda self: self.meta["format"])

    @property
    def thresholds(self) -> np.ndarray:
        return np.asarray(self.meta["thresholds"], dtype=float)

    def dataloader(self, items: pd.DataFrame, bs: int = 32, workers: int = 0):
        """Batches of ``items`` (a frame with a ``key`` column) with the training-time transforms
        and normalisation: fastai's ``test_dl`` for a pickled learner, the same pipeline rebuilt
        from model.json for the safe export."""
        items = items[["key"]].reset_index(drop=True)
        device = next(self.learn.model.parameters()).device
        if not self.safe:
            return self.learn.dls.test_dl(items, rm_type_tfms=0, bs=bs, num_workers=workers, device=device)
        dsets = Datasets(items, tfms=[[ColReader("key"), ReadImage(self.channels, self.size)]])
        dl = TfmdDL(dsets, bs=bs, num_workers=workers, device=device, shuffle=False, drop_last=False,
                    after_batch=[IntToFloatTensor(), Normalize.from_stats(self.meta["mean"], self.meta["std"])])
        self.learn.dls = DataLoaders(dl, dl)  # get_preds' callbacks look at learn.dls
        return dl

    def probabilities(self, items: pd.DataFrame, tta: str | None = None, bs: int = 32, workers: int = 0) -> np.ndarray:
        """Class probabilities, shape (n_images, n_classes). ``tta``: None, 'mean' or 'max' over the
        8 dihedral orientations (fastai's ``Learner.tta`` averages random augmentations instead)."""
        dl = self.dataloader(items, bs, workers)
        if tta is None:
            with torch.no_grad():
                return self.learn.get_preds(dl=dl)[0].float().numpy()
        activation = getattr(self.learn.loss_func, "activation", torch.sigmoid)
        model, out = self.learn.model.eval(), []
        with torch.no_grad():
            for (xb,) in dl:
                xb = xb.as_subclass(torch.Tensor)
                ps = torch.stack([activation(model(dihedral(xb, k)).float()) for k in range(8)])
                out.append((ps.mean(0) if tta == "mean" else ps.max(0).values).cpu())
        return torch.cat(out).numpy()

    def decode(self, probs: np.ndarray, threshold: float | None = None) -> np.ndarray:
        thresholds = self.thresholds if threshold is None else np.full(probs.shape[1], threshold)
        return M.decode(probs, thresholds)

    def predict_batch(self, paths, threshold: float | None = None, tta: str | None = None, bs: int = 32) -> list[dict]:
        """Labels, names and probabilities for image files (for RGBY: any one file of each image's
        four, or the common ``{id}`` prefix)."""
        items = pd.concat([_items_for_path(p, self.channels) for p in paths], ignore_index=True)
        probs = self.probabilities(items, tta, bs)
        preds = self.decode(probs, threshold)
        return [{"image": image_id, "labels": [int(i) for i in np.flatnonzero(row)],
                 "names": [self.names[i] for i in np.flatnonzero(row)],
                 "probabilities": [float(probs[n, i]) for i in np.flatnonzero(row)],
                 "all_probabilities": probs[n].tolist()}
                for n, (image_id, row) in enumerate(zip(items["id"], preds))]

    def predict(self, path, threshold: float | None = None, tta: str | None = None) -> dict:
        return self.predict_batch([path], threshold, tta)[0]


def _items_for_path(path, channels: str) -> pd.DataFrame:
    path = Path(path)
    if not path.exists() and channels == "rgby":
        matches = sorted(path.parent.glob(f"{path.name}_green.*"))
        if matches:
            path = matches[0]
    if not path.is_file():
        raise HPAError(f"{path}: image file not found")
    items = scan_images(path, channels)
    return items


def load_predictor(path="runs/latest", trust: bool = False, cpu: bool | None = None) -> "Predictor | Ensemble":
    """Load a trained model from a run folder, a model.json (safe: weights only, no pickle) or an
    export.pkl (fastai's pickled learner: only with ``trust``, wherever the file is).
    A cross-validation folder (``run.py cv``) loads as the ``Ensemble`` of its folds."""
    path = Path(path)
    if not path.exists():
        raise HPAError(f"--learner {path}: not found (train a model first: python run.py)")
    if path.is_dir():
        if (path / CV_FILE).is_file():
            return _load_cv(path, trust, cpu)
        if all((path / f).is_file() for f in SAFE_FILES):
            return _load_safe(path / "model.json", cpu)
        if (path / "export.pkl").is_file():
            return _load_pickle(path / "export.pkl", trust, cpu)
        raise HPAError(f"--learner {path}: no model.json + model.safetensors or export.pkl in this folder")
    if path.suffix == ".json":
        return _load_safe(path, cpu)
    if path.suffix == ".safetensors":
        return _load_safe(path.with_name("model.json"), cpu)
    if path.suffix in (".pkl", ".pth"):
        return _load_pickle(path, trust, cpu)
    raise HPAError(f"--learner {path}: expected a run folder, model.json or export.pkl")


# --- ensembles --------------------------------------------------------------------------------------

CV_FILE = "cv.json"  # written by cv.py: the fold run folders ("runs") and the out-of-fold "thresholds"


class Ensemble:
    """Several trained models answering as one: the mean of their probabilities, decoded with one
    set of per-class thresholds. Same interface as ``Predictor``; the members may differ in
    architecture and image size but must share format, vocabulary and channels."""

    def __init__(self, members: list, thresholds, source: Path):
        first = members[0]
        for member in members[1:]:
            if (member.format, member.channels) != (first.format, first.channels):
                raise HPAError(f"--learner {member.source}: trained on {member.format} {member.channels} data, "
                               f"{first.source} on {first.format} {first.channels}; ensemble members must agree")
            if list(member.meta["vocab"]) != list(first.meta["vocab"]):
                raise HPAError(f"--learner {member.source}: its class vocabulary differs from that of "
                               f"{first.source}; ensemble members must agree")
        thresholds = np.asarray(thresholds, dtype=float)
        if thresholds.shape != (len(first.names),):
            raise HPAError(f"{source}: {thresholds.size} thresholds for {len(first.names)} classes")
        self.members, self.thresholds, self.source = members, thresholds, Path(source)

    channels = property(lambda self: self.members[0].channels)
    names = property(lambda self: self.members[0].names)
    format = property(lambda self: self.members[0].format)

    @property
    def meta(self) -> dict:
        raise HPAError(f"{self.source}: an ensemble of {len(self.members)} models has no single model "
                       f"description; pass one member, e.g. --learner {self.members[0].source}")

    def probabilities(self, items: pd.DataFrame, tta: str | None = None, bs: int = 32, workers: int = 0) -> np.ndarray:
        return np.mean([m.probabilities(items, tta, bs, workers) for m in self.members], axis=0)

    decode = Predictor.decode
    predict_batch = Predictor.predict_batch
    predict = Predictor.predict


def _load_cv(folder: Path, trust: bool, cpu: bool | None) -> Ensemble:
    """The folds of a cross-validation, with the thresholds tuned on all their out-of-fold predictions."""
    where = folder / CV_FILE
    try:
        cv = json.loads(where.read_text())
        runs, thresholds = cv["runs"], cv["thresholds"]
    except (OSError, ValueError, KeyError, TypeError):
        raise HPAError(f"{where}: not a cross-validation summary (no runs and thresholds)") from None
    if not isinstance(runs, list) or not runs:
        raise HPAError(f"{where}: lists no fold runs (expected a list of fold folder names)")
    if not (isinstance(thresholds, list)
            and all(isinstance(t, (int, float)) and not isinstance(t, bool) and 0 <= t <= 1 for t in thresholds)):
        raise HPAError(f"{where}: 'thresholds' must be a list of numbers in 0..1 (got {thresholds!r:.60})")
    # each run a folder inside this one, and not another cv folder: "." or a link back would recurse
    inside = folder.resolve()
    for run in runs:
        plain_name = isinstance(run, str) and run not in ("", ".", "..") and run.isprintable() and not (
            set(run) & {"/", "\\"})
        if not plain_name or inside not in (folder / run).resolve().parents:
            raise HPAError(f"{where}: run {run!r:.60} is not the name of a fold folder inside {folder}")
        if (folder / run / CV_FILE).exists():
            raise HPAError(f"{where}: run {run!r} is itself a cross-validation folder; nesting is not supported")
    return Ensemble([load_predictor(folder / run, trust, cpu) for run in runs], thresholds, folder)


def load_predictors(paths, trust: bool = False, cpu: bool | None = None) -> "Predictor | Ensemble":
    """One learner path (see ``load_predictor``) or several: several make an ``Ensemble`` decoded
    with the mean of the members' thresholds (a cv folder contributes all its folds)."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if len(paths) == 1:
        return load_predictor(paths[0], trust, cpu)
    loaded = [load_predictor(p, trust, cpu) for p in paths]
    members = [m for one in loaded for m in (one.members if isinstance(one, Ensemble) else [one])]
    return Ensemble(members, np.mean([m.thresholds for m in members], axis=0), loaded[0].source)


def _device(cpu: bool | None) -> torch.device:
    return torch.device("cpu") if cpu or not torch.cuda.is_available() else torch.device("cuda")


def _load_safe(json_path: Path, cpu: bool | None) -> Predictor:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from . import models

    weights = json_path.with_name("model.safetensors")
    try:
        meta = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise HPAError(f"{json_path}: not valid JSON") from None
    except OSError as e:
        raise HPAError(f"{json_path}: cannot read the model description ({e.strerror or e})") from None
    _check_meta(meta, json_path)
    n_in, n_out = len(meta["channels"]), len(meta["vocab"])
    # Names and shapes first, from the file's header and a model without memory: a small file
    # whose model.json names a giant architecture must not get that model built.
    expected = _state_shapes(meta["arch"], n_in, n_out)
    if expected is not None and (diff := _first_difference(expected, read_safetensors_header(weights))):
        raise HPAError(f"{weights}: weights do not fit {meta['arch']} ({diff})")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise HPAError(f"{weights}: cannot read weights ({e})") from None
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise HPAError(f"{weights}: weight {name!r} is not finite (NaN or infinity): the model would "
                           "predict nonsense")
    model, _ = models.create_model(meta["arch"], n_in, n_out, pretrained=False)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise HPAError(f"{weights}: weights do not fit {meta['arch']} ({str(e).splitlines()[0]})") from None
    device = _device(cpu)
    model.to(device).eval()
    learn = Learner(DataLoaders(), model, loss_func=make_loss(meta.get("loss", "bce"), meta.get("focal_gamma", 2.0)))
    return Predictor(learn, meta, json_path.parent, safe=True)


MAX_HEADER = 16 * 1024 * 1024  # a safetensors header of the largest timm models is well under 1 MiB


def read_safetensors_header(path: Path) -> dict[str, tuple]:
    """Tensor name -> shape of a safetensors file, from its header alone (8 bytes of little-endian
    header length, then that much JSON), read with a bounded length."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little") if size >= 8 else None
            if length is None:
                raise ValueError("shorter than the 8-byte header length")
            if length > min(MAX_HEADER, size - 8):
                raise ValueError(f"header length {length} runs past the end of the file or over {MAX_HEADER} bytes")
            header = json.loads(f.read(length))
    except OSError as e:
        raise HPAError(f"{path}: cannot read weights ({e.strerror or e})") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise HPAError(f"{path}: cannot read weights ({str(e)[:150]})") from None
    if not isinstance(header, dict):
        raise HPAError(f"{path}: cannot read weights (the header is not a JSON object)")
    shapes = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise HPAError(f"{path}: cannot read weights (tensor {name!r:.80} has no valid shape)")
        shapes[name] = tuple(shape)
    return shapes


def _state_shapes(arch: str, n_in: int, n_out: int) -> dict[str, tuple] | None:
    """Parameter and buffer shapes of ``arch``, built on the meta device (no memory, no weights);
    None if it cannot be built that way, and the real build then checks the weights."""
    import warnings

    from .models import builder

    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = builder(arch)(n_in, n_out, pretrained=False)
    except Exception:  # an architecture whose construction needs real tensors
        return None
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _first_difference(expected: dict, found: dict) -> str | None:
    """The first tensor name whose presence or shape differs between the model and the file."""
    for name, shape in expected.items():
        if name not in found:
            return f"{name!r} {shape} is missing from the file"
        if found[name] != shape:
            return f"{name!r} is {found[name]} in the file, {shape} in the model"
    extra = next((name for name in found if name not in expected), None)
    return None if extra is None else f"{extra!r:.80} {found[extra]} is in the file but not in the model"


def _check_meta(meta, json_path: Path) -> None:
    """model.json is a text file anyone can edit: check every field a model and its
    predictions are built from, so a bad value is one error here rather than a crash later."""
    from .models import check_arch
    from .train import MAX_SIZE
    from .vocab import vocab_for

    if not isinstance(meta, dict):
        raise HPAError(f"{json_path}: not a model description (a JSON {type(meta).__name__}, not an object)")
    needed = {"arch", "channels", "size", "mean", "std", "vocab", "names", "thresholds", "format"}
    if missing := needed - set(meta):
        raise HPAError(f"{json_path}: not a model description (missing {', '.join(sorted(missing))})")

    def known_arch(arch) -> bool:
        try:
            return isinstance(arch, str) and check_arch(arch) == arch
        except ValueError:
            return False

    def number(x) -> bool:  # finite: JSON allows NaN and Infinity
        return isinstance(x, (int, float)) and not isinstance(x, bool) and abs(x) < 1e30

    def numbers(values, n, ok=lambda x: True) -> bool:
        return isinstance(values, list) and len(values) == n and all(number(x) and ok(x) for x in values)

    def strings(values, n) -> bool:
        return isinstance(values, list) and len(values) == n and all(isinstance(x, str) for x in values)

    fmt, channels, size = meta["format"], meta["channels"], meta["size"]
    n_classes = len(vocab_for(fmt)) if isinstance(fmt, str) and fmt in FORMATS else None
    n_in = len(CHANNEL_SETS[channels]) if isinstance(channels, str) and channels in CHANNEL_SETS else None
    checks = [
        ("format", n_classes is not None, f"one of {', '.join(FORMATS)}"),
        ("channels", n_in is not None, f"one of {', '.join(CHANNEL_SETS)}"),
        ("arch", known_arch(meta["arch"]), "a known architecture"),
        ("size", isinstance(size, int) and not isinstance(size, bool) and 1 <= size <= MAX_SIZE,
         f"an integer in 1..{MAX_SIZE}"),
        ("vocab", strings(meta["vocab"], n_classes), f"a list of {n_classes} class ids"),
        ("names", strings(meta["names"], n_classes), f"a list of {n_classes} class names"),
        ("thresholds", numbers(meta["thresholds"], n_classes, lambda t: 0 <= t <= 1), f"a list of {n_classes} numbers in 0..1"),
        # training measures them on images scaled to 0..1, and keeps the std at 0.001 or more
        ("mean", numbers(meta["mean"], n_in, lambda m: 0 <= m <= 1), f"a list of {n_in} numbers in 0..1"),
        ("std", numbers(meta["std"], n_in, lambda s: 1e-3 <= s <= 1), f"a list of {n_in} numbers in 0.001..1"),
        ("loss", meta.get("loss", "bce") in ("bce", "focal"), "bce or focal"),
        ("focal_gamma", number(meta.get("focal_gamma", 2.0)), "a number"),
    ]
    for key, ok, want in checks:
        if not ok:
            raise HPAError(f"{json_path}: {key!r} must be {want} (got {meta[key]!r:.60})")


def _load_pickle(pkl: Path, trust: bool, cpu: bool | None) -> Predictor:
    from fastai.learner import load_learner

    # Location is not trust: a run folder can be copied from a colleague, unpacked from an archive or
    # planted in a shared folder, and unpickling runs whatever code the file holds.
    if not trust:
        raise HPAError(f"{pkl}: refusing to unpickle a learner without --trust (unpickling can run arbitrary "
                       "code); use a run folder's model.json + model.safetensors instead, or pass --trust if "
                       "you made this file")
    try:
        learn = load_learner(pkl, cpu=_device(cpu).type == "cpu")
    except Exception as e:  # unpickling raises anything the file's contents choose to raise
        raise HPAError(f"{pkl}: not a loadable fastai learner ({type(e).__name__}: {str(e)[:150]})") from None
    meta = getattr(learn, "hpa_meta", None)
    if meta is None:
        raise HPAError(f"{pkl}: this learner was not exported by hpa_fastai (no model description)")
    return Predictor(learn, meta, pkl.parent, safe=False)


def _competition_format(data: Path):
    """The competition layout of ``data`` if it is a competition folder, else None."""
    if not data.is_dir():
        return None
    if (data / "sample_submission.csv").is_file():
        return FORMATS["hpa2018"]
    if (data / "submission.csv").is_file() or ((data / "test").is_dir() and (data / "train.csv").is_file()):
        from .formats import detect_format

        return detect_format(data) if (data / "train.csv").is_file() else FORMATS["z2g"]
    return None


def _check_compatible(pred: Predictor, fmt) -> None:
    if fmt.name != pred.format:
        raise HPAError(f"the model was trained on {pred.format} data ({len(pred.names)} classes) "
                       f"but this folder is in the {fmt.name} layout")
    if pred.channels == "rgby" and not fmt.channel_files:
        raise HPAError("the model expects 4 channels (RGBY, one file per stain); this folder has RGB images")


def _tta_mode(cfg) -> str | None:
    return "max" if getattr(cfg, "tta_max", False) else "mean" if cfg.tta else None


def _workers(cfg, items: pd.DataFrame) -> int:
    return bound_workers(cfg.workers, len(items), default_workers(torch.cuda.is_available()), log)


def _check_flags(cfg) -> None:
    """Flag checks that need no model, before any model is loaded."""
    if cfg.threshold is not None and not 0 < cfg.threshold < 1:
        raise HPAError(f"--threshold must be between 0 and 1 (got {cfg.threshold})")
    check_workers(cfg.workers)
    if cfg.out is not None:
        check_output(cfg.out, "--out")  # an empty --out, before a model is loaded


def _run_dirs(pred) -> list[Path]:
    """The run folders a predictor was loaded from (an ensemble's members and its cv folder)."""
    if isinstance(pred, Ensemble):
        return [m.source for m in pred.members] + [pred.source]
    return [pred.source]


def _inputs(items: pd.DataFrame, channels: str, *csvs: Path) -> list:
    """The files a command reads for ``items``: the label CSVs and every image file."""
    return [*csvs, *(f for key in items["key"] for f in key_files(key, CHANNEL_SETS[channels]))]


def predict_command(cfg) -> Path:
    from .train import SAMPLE_DIR

    _check_flags(cfg)
    pred = load_predictors(cfg.learner, cfg.trust)
    if isinstance(pred, Ensemble):
        log(f"ensemble of {len(pred.members)} models ({pred.source}): mean probabilities")
    data = Path(cfg.data) if cfg.data else SAMPLE_DIR
    fmt = _competition_format(data)
    if fmt is not None:
        _check_compatible(pred, fmt)
        items = read_items(data, fmt, split="test", labelled=False, channels=pred.channels)
        out = check_output(cfg.out, "--out", _inputs(items, pred.channels, data / "train.csv",
                                                     data / fmt.submission_csv), _run_dirs(pred))
        probs = pred.probabilities(items, _tta_mode(cfg), cfg.bs, _workers(cfg, items))
        preds = pred.decode(probs, cfg.threshold)
        labels = [" ".join(str(i) for i in np.flatnonzero(row)) for row in preds]
        # ids verbatim, not made safe for spreadsheets: Kaggle matches them exactly
        sub = pd.DataFrame({fmt.id_col: items["id"], fmt.submission_label_col: labels})
        write_csv(out, sub)
        log(f"wrote {out}: {len(sub)} rows, {fmt.name} submission ({fmt.id_col},{fmt.submission_label_col})")
        return out
    items = scan_images(data, pred.channels)
    out = check_output(cfg.out, "--out", _inputs(items, pred.channels), _run_dirs(pred))
    probs = pred.probabilities(items, _tta_mode(cfg), cfg.bs, _workers(cfg, items))
    preds = pred.decode(probs, cfg.threshold)
    rows = pd.DataFrame({
        "image": items["id"],
        "labels": [" ".join(str(i) for i in np.flatnonzero(r)) for r in preds],
        "names": ["; ".join(pred.names[i] for i in np.flatnonzero(r)) for r in preds],
        "probabilities": [" ".join(f"{probs[n, i]:.4f}" for i in np.flatnonzero(r)) for n, r in enumerate(preds)],
    })
    write_csv(out, for_spreadsheet(rows))  # a table for people: file names starting with = stay text
    if len(rows) <= 20:
        console.print(table("predictions", rows))
    log(f"wrote {out}: {len(rows)} images")
    return out


def evaluate_command(cfg) -> Path:
    from .train import SAMPLE_DIR

    _check_flags(cfg)
    pred = load_predictor(cfg.learner, cfg.trust)
    data = Path(cfg.data) if cfg.data else SAMPLE_DIR
    from .formats import detect_format

    fmt = detect_format(data)
    _check_compatible(pred, fmt)
    items = read_items(data, fmt, split="train", labelled=True, channels=pred.channels)
    out = check_output_folder(cfg.out if cfg.out is not None else pred.source / "evaluate", "--out", EVALUATION_FILES,
                              _inputs(items, pred.channels, data / "train.csv"), _run_dirs(pred))
    probs = pred.probabilities(items, _tta_mode(cfg), cfg.bs, _workers(cfg, items))
    targets = labels_matrix(items["labels"], len(pred.names)).astype(bool)
    thresholds = pred.thresholds if cfg.threshold is None else np.full(len(pred.names), cfg.threshold)
    result = evaluation_report(probs, targets, thresholds, pred.names, items, pred.channels, out)
    summary = pd.DataFrame([{"average": k, "F1": v} for k, v in result["f1"].items()])
    console.print(table(f"per class ({len(items)} images)", result["report"].assign(
        support=result["report"]["support"].astype(int))))
    console.print(table("F1", summary))
    log(f"report in {out}")
    return out


EVALUATION_FILES = ("per_class.csv", "summary.json", "per_class_f1.png", "samples.png")


def evaluation_report(probs, targets, thresholds, names, items, channels, out: Path, n_images: int = 16) -> dict:
    """Write per_class.csv, summary.json, per_class_f1.png and samples.png (worst mistakes first)."""
    report = M.per_class_report(probs, targets, thresholds, names)
    f1 = M.summary(probs, targets, thresholds)
    write_csv(out / "per_class.csv", for_spreadsheet(report))
    write_json(out / "summary.json", {"images": int(len(targets)), "f1": f1, "thresholds": list(map(float, thresholds))})
    plots.f1_bars_plot(out / "per_class_f1.png", report)
    preds = M.decode(probs, thresholds)
    # worst first: the images whose predicted label set is furthest from the truth
    errors = (preds != targets).sum(1) + np.abs(probs - targets).sum(1) / 100
    order = np.argsort(-errors, kind="stable")[:n_images]
    images = [read_image(items["key"].iloc[i], CHANNEL_SETS[channels], size=128) for i in order]
    titles = [f"{items['id'].iloc[i]}\ntrue: {_label_text(targets[i])}\npred: {_label_text(preds[i])}" for i in order]
    plots.sample_grid_plot(out / "samples.png", images, titles)
    return {"report": report, "f1": f1}


def _label_text(row) -> str:
    return " ".join(str(i) for i in np.flatnonzero(row)) or "-"
