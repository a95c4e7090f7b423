"""A trained model's files, written and read in one place: the safe export (weights as
``model.safetensors`` plus ``model.json``, the description of what the model reads (arch, channels,
size, normalisation) and how its outputs are decoded (vocabulary, names, thresholds, loss)), fastai's
pickled Learner (``export.pkl``, carrying the same description) and ONNX (``model.onnx``, the
normalisation inside the graph).

Training writes the first two; inference loads the safe export without unpickling anything, after
checking the description and the weights' names and shapes from the file's header, before anything
large is built; ``run.py export --onnx`` writes the third from a loaded model."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from fastai.callback.core import Callback

from . import models
from .atomic import atomic_path, write_json
from .config import LOSSES, MAX_SIZE
from .data.layouts import CHANNEL_SETS, FORMATS
from .data.vocab import vocab_for
from .device import PRECISIONS
from .errors import HPAError
from .jsonfile import KEEP, loads, open_regular, read_json
from .runs.folder import EXPORT_PKL, MODEL_JSON, WEIGHTS


logger = logging.getLogger(__name__)


class ModelDescription(Callback):
    """Carries model.json's description inside fastai's pickled learner (export.pkl), so that the
    learner alone can be decoded; it takes part in no training event."""

    def __init__(self, meta: dict):
        self.meta = meta


def description_of(learn) -> dict | None:
    """The description a pickled learner carries (or, in learners exported by earlier versions, its
    ``hpa_meta`` attribute); None if it was not exported by this project."""
    for cb in learn.cbs:
        if isinstance(cb, ModelDescription):
            return cb.meta
    return getattr(learn, "hpa_meta", None)


def model_meta(ts, thresholds, precision: str = "fp32") -> dict:
    """model.json's contents for a model trained on the training set ``ts``: what the model reads, how
    its outputs are decoded, the loss it trained with and the precision it trained in (prediction
    runs in it too)."""
    from .losses import loss_params

    cfg = ts.cfg
    return {"arch": cfg.arch, "format": ts.format, "channels": cfg.channels, "n_in": len(cfg.channels),
            "size": cfg.size, "mean": ts.mean, "std": ts.std, "vocab": ts.vocab, "names": ts.names,
            "thresholds": [float(t) for t in thresholds], "loss": cfg.loss,
            "focal_gamma": cfg.focal_gamma, **_loss_fields(cfg.loss, loss_params(cfg.loss, cfg)),
            "precision": precision}


def _loss_fields(name: str, params: dict) -> dict:
    """A loss's parameters under their flag names (``asl_clip``...), as model.json keeps them."""
    from .losses import LOSS_FLAGS

    return {LOSS_FLAGS[name][k]: v for k, v in params.items()}


def bare_model(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` without the DistributedDataParallel and ``torch.compile`` wrappers, so saved
    weights have the plain parameter names and load anywhere."""
    from .device import uncompiled

    return uncompiled(getattr(model, "module", model))


def export_learner(learn, meta: dict, folder: Path) -> None:
    """export.pkl and the safe export of ``learn``, both of the plain model: a ``torch.compile``
    wrapper is neither pickled nor named in the weights (a compiled module would pickle its
    compiled code)."""
    description = ModelDescription(meta)
    learn.add_cb(description)
    model = learn.model
    learn.model = bare_model(model)
    try:
        with atomic_path(Path(folder) / EXPORT_PKL, durable=True) as tmp:
            learn.export(tmp)
    finally:
        learn.model = model
        learn.remove_cb(description)
    save(bare_model(model).state_dict(), meta, folder)


def save(state: dict, meta: dict, folder: Path) -> None:
    """``state`` (a model's state dict) and ``meta`` into ``folder``, each flushed to disk."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_path(Path(folder) / WEIGHTS, durable=True) as tmp:
        save_file(state, str(tmp))
    write_json(Path(folder) / MODEL_JSON, meta, durable=True)


def load(json_path: Path) -> tuple[torch.nn.Module, dict]:
    """The model described by ``json_path`` with the weights beside it, on the CPU, and its checked
    description."""
    state, meta = read_weights(json_path)
    model, _ = models.create_model(meta["arch"], len(meta["channels"]), len(meta["vocab"]), pretrained=False)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise HPAError(f"{Path(json_path).with_name(WEIGHTS)}: weights do not fit {meta['arch']} "
                       f"({str(e).splitlines()[0]})") from None
    return model.eval(), meta


def read_weights(json_path: Path) -> tuple[dict, dict]:
    """The weights beside ``json_path`` (a state dict of finite tensors whose names and shapes are
    those of the architecture it describes) and its checked description; no model is built."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    json_path = Path(json_path)
    weights = json_path.with_name(WEIGHTS)
    # NaN and Infinity are kept, so that check_meta names the field that holds them
    meta = read_json(json_path, "model description", nonfinite=KEEP)
    check_meta(meta, json_path)
    n_in, n_out = len(meta["channels"]), len(meta["vocab"])
    # Names and shapes first, from the file's header and a model without memory: a small file
    # whose model.json names a giant architecture must not get that model built.
    found = read_safetensors_header(weights)  # also when the model cannot be built on the meta device
    expected = state_shapes(meta["arch"], n_in, n_out)
    if expected is not None and (diff := first_difference(expected, found)):
        raise HPAError(f"{weights}: weights do not fit {meta['arch']} ({diff})")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise HPAError(f"{weights}: cannot read weights ({e})") from None
    check_finite(state, weights)
    return state, meta


def check_finite(state: dict, where) -> None:
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise HPAError(f"{where}: weight {name!r:.80} is not finite (NaN or infinity): the model would "
                           "predict nonsense")


MAX_HEADER = 16 * 1024 * 1024  # a safetensors header of the largest timm models is well under 1 MiB


def read_safetensors_header(path: Path) -> dict[str, tuple]:
    """Tensor name -> shape of a safetensors file, from its header alone (8 bytes of little-endian
    header length, then that much JSON), read with a bounded length."""
    try:
        with open_regular(path, "weights") as f:  # a FIFO in its place would block a plain open()
            size = os.fstat(f.fileno()).st_size
            length = int.from_bytes(f.read(8), "little") if size >= 8 else None
            if length is None:
                raise ValueError("shorter than the 8-byte header length")
            if length > min(MAX_HEADER, size - 8):
                raise ValueError(f"header length {length} runs past the end of the file or over {MAX_HEADER} bytes")
            header = loads(f.read(length))
    except OSError as e:
        raise HPAError(f"{path}: cannot read weights ({e.strerror or e})") from None
    except ValueError as e:  # the header's InvalidJSON is one
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


def state_shapes(arch: str, n_in: int, n_out: int) -> dict[str, tuple] | None:
    """Parameter and buffer shapes of ``arch``, built on the meta device (no memory, no weights);
    None if it cannot be built that way, and the real build then checks the weights."""
    import warnings

    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = models.builder(arch)(n_in, n_out, pretrained=False)
    except Exception:  # an architecture whose construction needs real tensors
        return None
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def first_difference(expected: dict, found: dict) -> str | None:
    """The first tensor name whose presence or shape differs between the model and the file."""
    for name, shape in expected.items():
        if name not in found:
            return f"{name!r} {shape} is missing from the file"
        if found[name] != shape:
            return f"{name!r} is {found[name]} in the file, {shape} in the model"
    extra = next((name for name in found if name not in expected), None)
    return None if extra is None else f"{extra!r:.80} {found[extra]} is in the file but not in the model"


def check_meta(meta, json_path: Path) -> None:
    """model.json is a text file anyone can edit: check every field a model and its
    predictions are built from, so a bad value is one error here rather than a crash later."""
    if not isinstance(meta, dict):
        raise HPAError(f"{json_path}: not a model description (a JSON {type(meta).__name__}, not an object)")
    needed = {"arch", "channels", "size", "mean", "std", "vocab", "names", "thresholds", "format"}
    if missing := needed - set(meta):
        raise HPAError(f"{json_path}: not a model description (missing {', '.join(sorted(missing))})")

    def known_arch(arch) -> bool:
        try:
            return isinstance(arch, str) and models.check_arch(arch) == arch
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
        ("loss", meta.get("loss", "bce") in LOSSES, f"one of {', '.join(LOSSES)}"),
        ("focal_gamma", number(meta.get("focal_gamma", 2.0)), "a number"),
        ("precision", meta.get("precision", "fp32") in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
    ]
    for key, ok, want in checks:
        if not ok:
            raise HPAError(f"{json_path}: {key!r} must be {want} (got {meta[key]!r:.60})")
    if problem := models.size_problem(meta["arch"], size):  # a model.json edited to a size its model cannot take
        raise HPAError(f"{json_path}: 'size' {size} {problem}")


class NormalisedModel(torch.nn.Module):
    """Takes images scaled to 0..1 (N, C, H, W), normalises them with the training statistics and
    returns class probabilities: what ``model.onnx`` computes."""

    def __init__(self, model: torch.nn.Module, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return torch.sigmoid(self.model((x - self.mean) / self.std))


def export_onnx(model: torch.nn.Module, meta: dict, out: Path, check: bool = True) -> dict:
    """Write ``out``, ONNX of ``model`` (described by ``meta``) with the normalisation inside the
    graph, for runtimes without PyTorch or fastai; where onnxruntime is installed, compare it with
    PyTorch on one batch (``max_abs_diff``)."""
    import numpy as np

    model = NormalisedModel(model.cpu().eval(), meta["mean"], meta["std"]).eval()
    n_in, size = len(meta["channels"]), meta["size"]
    example = torch.rand(2, n_in, size, size, generator=torch.Generator().manual_seed(0))
    with atomic_path(out) as tmp:
        torch.onnx.export(model, (example,), str(tmp), input_names=["image"], output_names=["probabilities"],
                          dynamic_axes={"image": {0: "batch"}, "probabilities": {0: "batch"}},
                          opset_version=17, dynamo=False)
    result = {"path": str(out), "checked": False}
    if check:
        try:
            import onnxruntime as ort
        except ImportError:
            logger.info("note: onnxruntime is not installed, so the ONNX file was not checked (pip install onnxruntime)")
            return result
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = session.run(None, {"image": example.numpy()})[0]
        with torch.no_grad():
            want = model(example).numpy()
        result.update(checked=True, max_abs_diff=float(np.abs(got - want).max()))
    return result
