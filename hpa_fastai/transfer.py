"""The weights a model starts from, and ``start_model`` as the one door in (``run.py`` and the notebook
API alike): ImageNet weights from the torch/timm cache or from a file as torchvision or timm publish
it, an earlier run of this package (its folder, ``model.json`` or ``model.safetensors``) with its
stains and classes adapted to this data, or a state dict of this very model.

Nothing is loaded in part: a file of another architecture, or one whose tensors do not fit, is one
error line naming the first tensor that does not fit and both shapes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import modelfile, models
from .errors import HPAError
from .runs.folder import EXPORT_PKL, MODEL_JSON, WEIGHTS

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Start:
    """Where a model's weights came from: ``kind`` is ``imagenet``, ``run``, ``state dict`` or
    ``random``; ``source`` says which file or run."""
    kind: str
    source: str = ""

    @property
    def pretrained(self) -> bool:
        """A trained body: the run trains the head first with the body frozen, then everything with
        discriminative learning rates."""
        return self.kind != "random"

    def describe(self) -> str:
        return {"imagenet": f"ImageNet weights, {self.source}", "run": f"the run {self.source}",
                "state dict": f"weights {self.source}", "random": "random init"}[self.kind]


def start_model(arch: str, n_in: int, names: list, pretrained: bool = True, weights=None) -> tuple[nn.Module, Start]:
    """``arch`` for ``n_in`` stains and the classes ``names``, from ``weights`` (a path) when given,
    else from ImageNet weights where the cache has them (``pretrained``), else randomly initialised."""
    n_out = len(names)
    if weights is None:
        model, used = models.create_model(arch, n_in, n_out, pretrained)
        return model, (Start("imagenet", "torch/timm cache") if used else Start("random"))
    form, path = weights_form(weights)
    if form == "run":
        return _from_run(arch, n_in, names, path, weights)
    state = read_state(path, weights)
    if all(name.split(".", 1)[0] in ("0", "1") for name in state):  # this package's Sequential(body, head)
        return _from_state_dict(arch, n_in, n_out, state, weights)
    return _from_imagenet(arch, n_in, n_out, state, weights)


def weights_form(weights) -> tuple[str, Path]:
    """``("run", its model.json)`` for a run folder, its model.json or the model.safetensors beside
    one; ``("file", path)`` for any other weights file. Checked before anything is built."""
    path = Path(weights)
    if path.is_dir():
        if (path / MODEL_JSON).is_file():
            return "run", path / MODEL_JSON
        raise HPAError(f"--weights {weights}: a folder without {MODEL_JSON} (not a finished run): pass a finished "
                       f"run's folder, its {WEIGHTS}, or a weights file")
    if not path.is_file():
        raise HPAError(f"--weights {weights}: file not found")
    if path.suffix == ".pkl" or path.name == EXPORT_PKL:
        raise HPAError(f"--weights {weights}: a pickle is never loaded as starting weights (unpickling can run any "
                       f"code); pass the run's folder or its {WEIGHTS}")
    if path.name == MODEL_JSON or (path.name == WEIGHTS and (path.parent / MODEL_JSON).is_file()):
        return "run", path.with_name(MODEL_JSON)
    return "file", path


def read_state(path: Path, given) -> dict:
    """A weights file's tensors by name: safetensors (its header checked first), or a ``.pth`` /
    ``.bin`` state dict read with ``weights_only=True`` (a training checkpoint's ``model`` or
    ``state_dict`` entry, as this package's checkpoint.pth and timm's hold them)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            modelfile.read_safetensors_header(path)  # bounded: a huge header allocates nothing
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            for key in ("model", "state_dict"):
                if isinstance(state, dict) and isinstance(state.get(key), dict):
                    state = state[key]
                    break
    except HPAError as e:
        raise HPAError(f"--weights {given}: {str(e).replace(f'{path}: ', '', 1)}") from None
    except Exception as e:  # torch and safetensors raise several types for a bad file
        reason = (str(e).splitlines() or [type(e).__name__])[0][:200]  # an empty file's EOFError has no message
        raise HPAError(f"--weights {given}: cannot read weights ({reason})") from None
    if not (isinstance(state, dict) and state and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                      for k, v in state.items())):
        raise HPAError(f"--weights {given}: not a state dict (tensors by name)")
    modelfile.check_finite(state, f"--weights {given}")
    return state


def _shapes(state: dict) -> dict:
    return {name: tuple(t.shape) for name, t in state.items()}


def _from_state_dict(arch: str, n_in: int, n_out: int, state: dict, given) -> tuple[nn.Module, Start]:
    model = models.builder(arch)(n_in, n_out, pretrained=False)
    if diff := modelfile.first_difference(_shapes(model.state_dict()), _shapes(state)):
        raise HPAError(f"--weights {given}: does not fit {arch} for {n_in} stains and {n_out} classes ({diff}); a run "
                       f"with other stains or classes is adapted when given as its folder ({MODEL_JSON} beside the "
                       "weights)")
    model.load_state_dict(state)
    return model, Start("state dict", str(given))


def _imagenet_difference(layout: models.ImageNetLayout, found: dict, arch: str) -> str | None:
    """The first tensor of the body that the file lacks or holds in another shape, or the first the
    file has beyond the architecture's; the classifier may be anything (it is left out)."""
    for name, shape in layout.shapes.items():
        if name in layout.classifier:
            continue
        if name not in found:
            if name.endswith("num_batches_tracked"):  # older torchvision files have none; unused in training
                continue
            return f"{name!r} {shape} is missing from the file"
        if found[name] != shape:
            return f"{name!r} is {found[name]} in the file, {shape} in {arch}"
    extra = next((name for name in found if name not in layout.shapes), None)
    return None if extra is None else f"{extra!r:.80} {found[extra]} is in the file but not in {arch}"


def _from_imagenet(arch: str, n_in: int, n_out: int, state: dict, given) -> tuple[nn.Module, Start]:
    """The body from an ImageNet file of ``arch`` as its library publishes it, the classifier left out,
    the first convolution expanded to ``n_in`` stains as for the cache's weights."""
    layout = models.imagenet_layout(arch)
    if layout is None:
        raise HPAError(f"--weights {given}: no parameters in common with {arch} (this package's model; {arch} has no "
                       "ImageNet weights)")
    found = {layout.rename(name): tensor for name, tensor in state.items()}
    if not set(found) & set(layout.shapes):
        raise HPAError(f"--weights {given}: no parameters in common with {arch} (its ImageNet weights as "
                       f"{layout.library} publishes them, or this package's model)")
    if problem := _imagenet_difference(layout, _shapes(found), arch):
        raise HPAError(f"--weights {given}: not {arch}'s ImageNet weights ({problem})")
    model = models.builder(arch)(3, n_out, pretrained=False)
    missing, _ = model.load_state_dict({layout.to_model[k]: v for k, v in found.items() if k in layout.to_model},
                                       strict=False)
    body_left = [name for name in missing if name.startswith("0.") and not name.endswith("num_batches_tracked")]
    if body_left:  # the layout names every body tensor; a gap here is a bug, not a bad file
        raise HPAError(f"--weights {given}: {arch}'s body tensor {body_left[0]!r} was not in the file")
    if n_in != 3:
        models.expand_first_conv(model, n_in)
    logger.info(f"--weights {given}: {arch}'s ImageNet weights as {layout.library} publishes them; the body loaded, "
                f"the classifier ({len(layout.classifier)} tensors) left out"
                f"{', the yellow filters started from the mean of red and blue' if n_in == 4 else ''}")
    return model, Start("imagenet", str(given))


def output_layer(model: nn.Module) -> list[str]:
    """The state-dict names of the head's output layer (its last ``Linear``): one row per class."""
    head = model[1]
    name = [n for n, m in head.named_modules() if isinstance(m, nn.Linear)][-1]
    return [f"1.{name}.{p}" for p, _ in head.get_submodule(name).named_parameters()]


def _from_run(arch: str, n_in: int, names: list, json_path: Path, given) -> tuple[nn.Module, Start]:
    """An earlier run's model: the body as it trained, the first convolution adapted to ``n_in``
    stains, the head kept for the same classes; for others, the head's output layer starts fresh
    except the rows of classes whose names both vocabularies share, which are copied."""
    state, meta = modelfile.read_weights(json_path)
    if meta["arch"] != arch:
        raise HPAError(f"--weights {given}: a run of {meta['arch']}, and this run's --arch is {arch}: pass --arch "
                       f"{meta['arch']} (another architecture's weights are not loaded in part)")
    model = models.builder(arch)(n_in, len(names), pretrained=False)
    target = model.state_dict()
    adapted = dict(state)
    src_names, src_in = list(meta["names"]), len(meta["channels"])
    notes = []
    if src_in != n_in:
        first = models.first_conv_name(model)
        adapted[first] = models.rgby_filters(state[first], n_in)
        notes.append("the yellow filters of the first convolution dropped" if n_in == 3 else
                     "yellow filters added to the first convolution, from the mean of red and blue")
    if src_names != list(names):
        shared = [(i, src_names.index(name)) for i, name in enumerate(names) if name in src_names]
        for key in output_layer(model):
            rows = target[key].clone()
            for i, j in shared:
                rows[i] = state[key][j]
            adapted[key] = rows
        notes.append(f"{len(shared)} of the {len(names)} classes share a name with the run's {len(src_names)}: their "
                     f"output rows copied, {len(names) - len(shared)} start fresh")
    else:
        notes.append("the same classes: the head kept")
    if diff := modelfile.first_difference(_shapes(target), _shapes(adapted)):
        raise HPAError(f"--weights {given}: does not fit {arch} ({diff})")
    model.load_state_dict(adapted)
    logger.info(f"--weights {given}: a {meta['arch']} run ({meta['channels']}, {len(src_names)} classes); "
                + "; ".join(notes))
    return model, Start("run", f"{given}: {meta['channels']}, {len(src_names)} classes")
