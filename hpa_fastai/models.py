"""Model registry: one small builder per architecture, and ``create_model`` as the one door in.

Builders take ``(n_in, n_out, pretrained)`` and return an ``nn.Sequential(body, head)`` so one
splitter gives every model discriminative learning rates. ``timm:<name>`` reaches any timm model.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import socket
import sys
import types
import warnings
from pathlib import Path

import torch


class _TimmOnFirstUse(types.ModuleType):
    """Stands in for ``timm`` until one of its attributes is used, then imports it for real.

    fastai.vision.learner imports timm (0.6 s) at its own import, for its timm models only. The
    standard library's LazyLoader does not help: torch scans ``sys.modules`` with ``hasattr(module,
    "__file__")`` while registering operators, which loads a LazyLoader module. This placeholder
    carries the real module's ``__file__``, ``__spec__`` and ``__path__``, so such scans leave it
    alone; any other attribute (``timm.create_model``) imports timm and hands the attribute on."""

    def __getattr__(self, name):
        import importlib

        if sys.modules.get("timm") is self:
            del sys.modules["timm"]
        return getattr(importlib.import_module("timm"), name)


def _defer_timm() -> None:
    if "timm" in sys.modules:
        return
    spec = importlib.util.find_spec("timm")
    if spec is None:
        return
    placeholder = _TimmOnFirstUse("timm")
    placeholder.__spec__, placeholder.__file__ = spec, spec.origin
    placeholder.__path__ = list(spec.submodule_search_locations or [])
    sys.modules["timm"] = placeholder


_defer_timm()
from fastai.vision.learner import _get_first_layer, create_timm_model, create_vision_model, default_split  # noqa: E402
from torch import nn  # noqa: E402
from torchvision import models as tvm  # noqa: E402

from .config import MAX_SIZE, MIN_SIZE  # noqa: E402
from .errors import HPAError  # noqa: E402

logger = logging.getLogger(__name__)

ARCHS: dict = {}


def register(name: str):
    def wrap(fn):
        ARCHS[name] = fn
        return fn
    return wrap


@register("cnn")
def plain_cnn(n_in: int, n_out: int, pretrained: bool = False) -> nn.Sequential:
    """The plain baseline: eight 3x3 conv layers with ReLU, max-pooling after every second one,
    then three linear layers. It has no pretrained weights."""
    widths = [32, 64, 128, 128, 256, 256, 512, 512]
    layers, c_in = [], n_in
    for i, c_out in enumerate(widths):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True)]
        if i % 2 == 1:
            layers.append(nn.MaxPool2d(2))
        c_in = c_out
    body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    head = nn.Sequential(nn.Linear(512, 256), nn.ReLU(inplace=True), nn.Linear(256, 128),
                         nn.ReLU(inplace=True), nn.Linear(128, n_out))
    return nn.Sequential(body, head)


def _torchvision(fn):
    def build(n_in: int, n_out: int, pretrained: bool = False) -> nn.Sequential:
        return create_vision_model(fn, n_out, pretrained=pretrained, n_in=n_in)
    return build


for _name in ("resnet18", "resnet34", "resnet50"):
    register(_name)(_torchvision(getattr(tvm, _name)))


def _timm(name: str):
    def build(n_in: int, n_out: int, pretrained: bool = False) -> nn.Sequential:
        return create_timm_model(name, n_out, pretrained=pretrained, n_in=n_in)[0]
    return build


def check_arch(arch: str) -> str:
    """The registry's name for ``arch``: a registered name, ``timm:<name>``, or the bare name of a timm
    model (``convnext_tiny``, as fastai users pass timm names: ``timm:convnext_tiny``; a registered
    name wins, so ``resnet34`` stays the registry's). Anything else is a ValueError that names the
    closest architectures."""
    if arch in ARCHS:
        return arch
    name = arch[5:] if arch.startswith("timm:") else arch
    if name and name.isprintable():
        import timm

        if timm.is_model(name):
            return f"timm:{name}"
    raise ValueError(unknown_arch(arch))


def unknown_arch(arch: str) -> str:
    """Why ``arch`` is refused, with the registered names or timm models closest to it."""
    import difflib

    import timm

    name = arch[5:] if arch.startswith("timm:") else arch
    close = difflib.get_close_matches(name, list(ARCHS), n=2, cutoff=0.75)
    close += [f"timm:{m}" for m in difflib.get_close_matches(name, timm.list_models(), n=3 - len(close), cutoff=0.75)]
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    return (f"unknown architecture {arch!r:.80}{hint} (choose from {', '.join(ARCHS)}, or timm:<name> for a model "
            "of timm.list_models())")


def builder(arch: str):
    arch = check_arch(arch)
    return _timm(arch[5:]) if arch.startswith("timm:") else ARCHS[arch]


@functools.lru_cache(maxsize=None)
def _meta_model(arch: str) -> nn.Module | None:
    """``arch`` for 3 stains and 2 classes on the meta device (shapes only, no memory); None if it
    cannot be built that way."""
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return builder(arch)(3, 2, pretrained=False).eval()
    except Exception:  # an architecture whose construction needs real tensors
        return None


@functools.lru_cache(maxsize=None)
def _refusal(arch: str, size: int) -> str | None:
    """Why a ``size`` x ``size`` image cannot go through ``arch`` (the error of a forward pass on the
    meta device: "Output size is too small", a kernel larger than its input, a ViT's fixed size),
    or None if it can or the model cannot be built on the meta device."""
    model = _meta_model(arch)
    if model is None:
        return None
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(torch.empty(2, 3, size, size, device="meta"))  # two images: BatchNorm refuses one 1x1 map
    except Exception as e:  # torch and timm raise RuntimeError, ValueError, AssertionError...
        return (str(e).splitlines() or [type(e).__name__])[0][:150]
    return None


@functools.lru_cache(maxsize=None)
def min_size(arch: str) -> int | None:
    """The smallest image side ``arch`` takes (at least ``MIN_SIZE``), measured by forward passes on
    the meta device; None if it takes no side up to ``MAX_SIZE`` (a ViT takes exactly its own) or
    cannot be built there. A binary search: each pooling or strided layer of a convolutional network
    gives an output at least as large for a larger input, so the sides it takes form a range."""
    if _meta_model(arch) is None or _refusal(arch, MAX_SIZE) is not None:
        return None
    if _refusal(arch, MIN_SIZE) is None:  # no side below the config's minimum is ever asked for
        return MIN_SIZE
    low, high = MIN_SIZE + 1, MAX_SIZE
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if _refusal(arch, mid) is None else (mid + 1, high)
    return max(low, MIN_SIZE)


def size_problem(arch: str, size: int) -> str | None:
    """Why ``arch`` cannot take ``size`` px images, as the end of a sentence naming the size ("is
    below the 16 pixels cnn takes"), or None; checked on the meta device before any model is built."""
    reason = _refusal(arch, size)
    if reason is None:
        return None
    low = min_size(arch)
    if low is not None and size < low:
        return f"is below the {low} pixels {arch} takes"
    return f"is a size {arch} cannot take ({reason})"


def has_pretrained(arch: str) -> bool:
    return arch != "cnn"


def expand_first_conv(model: nn.Module, n_in: int) -> None:
    """Give a pretrained RGB model more input channels: keep the RGB filters and start each
    extra channel (yellow, the ER stain) from the mean of the red and blue filters.
    fastai's own conversion zeroes the extra channels, which wastes the stain at the start."""
    conv, parent, name = _get_first_layer(model)
    if not isinstance(conv, nn.Conv2d) or conv.in_channels != 3:
        raise HPAError(f"cannot add input channels: first layer is {type(conv).__name__}")
    new = nn.Conv2d(n_in, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode)
    with torch.no_grad():
        new.weight[:, :3] = conv.weight
        new.weight[:, 3:] = ((conv.weight[:, 0] + conv.weight[:, 2]) / 2).unsqueeze(1)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    setattr(parent, name, new)


def load_weights(model: nn.Module, path) -> None:
    """Load a local checkpoint: safetensors, or a state dict read with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise HPAError(f"--weights {path}: file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
                state = state["model"]
        model.load_state_dict(state)
    except HPAError:
        raise
    except Exception as e:  # torch and safetensors raise several types for a bad file
        reason = (str(e).splitlines() or [type(e).__name__])[0][:200]  # an empty file's EOFError has no message
        raise HPAError(f"--weights {path}: cannot load into this model ({reason})") from None


_warned: set = set()


def create_model(arch: str, n_in: int, n_out: int, pretrained: bool = True, weights=None):
    """Build ``arch`` for ``n_in`` stains and ``n_out`` classes. Returns ``(model, used_pretrained)``.

    Without internet or a cached copy, ImageNet weights can't be had: warn once and train from
    random initialisation instead of failing.
    """
    build = builder(arch)
    used = False
    if pretrained and has_pretrained(arch) and weights is None:
        old_timeout = socket.getdefaulttimeout()
        socket.setdefaulttimeout(15)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = build(3, n_out, pretrained=True)
            used = True
        except Exception as e:  # torch.hub, urllib and huggingface_hub each raise their own types
            if arch not in _warned:
                _warned.add(arch)
                reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
                logger.warning(f"ImageNet weights for {arch} are not cached and cannot be downloaded "
                               f"({reason}); training from random initialisation. Cache them under "
                               f"{torch.hub.get_dir()} or pass --weights PATH.")
        finally:
            socket.setdefaulttimeout(old_timeout)
        if used:
            if n_in != 3:
                expand_first_conv(model, n_in)
            return model, True
    model = build(n_in, n_out, pretrained=False)
    if weights is not None:
        load_weights(model, weights)
    return model, used


def splitter(model: nn.Module):
    """Body and head parameter groups for discriminative learning rates (of the model inside a
    ``torch.compile`` wrapper, which cannot be indexed)."""
    from .device import uncompiled

    return default_split(uncompiled(model))
