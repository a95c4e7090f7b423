"""Model registry: one small builder per architecture, and ``create_model`` as the one door in.

Builders take ``(n_in, n_out, pretrained)`` and return an ``nn.Sequential(body, head)`` so one
splitter gives every model discriminative learning rates. ``timm:<name>`` reaches any timm model.
Each builder also knows where its ImageNet weights come from (``imagenet_layout``): which tensors of
the file torchvision or timm publishes land where in the body, and which are the classifier.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import re
import socket
import sys
import types
import urllib.parse
import warnings
from dataclasses import dataclass

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
    build.imagenet = ("torchvision", fn)
    return build


@contextlib.contextmanager
def _hub_offline_when_unreachable():
    """Hugging Face Hub in offline mode while its server cannot be reached. timm fetches ImageNet
    weights through huggingface_hub, which without a network retries every request with back-off for
    about a minute before it looks in its local cache; in offline mode it goes to the cache at once.
    huggingface_hub reads ``constants.HF_HUB_OFFLINE`` on every request, so the switch is made there,
    for the duration of one timm model build."""
    if "huggingface_hub" not in sys.modules and importlib.util.find_spec("huggingface_hub") is None:
        yield
        return
    from huggingface_hub import constants
    host = urllib.parse.urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    if constants.HF_HUB_OFFLINE:
        yield
        return
    try:
        socket.create_connection((host, 443), timeout=5).close()
        reachable = True
    except OSError:
        reachable = False
    constants.HF_HUB_OFFLINE = not reachable
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = False


def _timm(name: str, **published):
    """A timm model; ``published``: what the model must be built with to hold every tensor of its
    published ImageNet file (Inception-v3's has the auxiliary classifier, which timm skips on loading)."""
    def build(n_in: int, n_out: int, pretrained: bool = False) -> nn.Sequential:
        with _hub_offline_when_unreachable() if pretrained else contextlib.nullcontext():
            return create_timm_model(name, n_out, pretrained=pretrained, n_in=n_in)[0]
    build.imagenet = ("timm", name)
    build.published = published
    return build


# ResNets, and the backbones of the HPA 2018 winners: DenseNet-121 (1st place), SE-ResNeXt-50 (3rd
# place, timm's own weights of it), ResNet-101/152 and Inception-v3 (several top-10 teams).
# Inception-v3 comes from timm: torchvision's has an auxiliary classifier among its children, which
# fastai's cut into body and head would leave inside the body. BN-Inception is in neither library.
for _name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "densenet121"):
    register(_name)(_torchvision(getattr(tvm, _name)))
register("seresnext50")(_timm("seresnext50_32x4d"))
register("inception_v3")(_timm("inception_v3", aux_logits=True))


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


def rgby_filters(weight: torch.Tensor, n_in: int) -> torch.Tensor:
    """A first convolution's filters for ``n_in`` stains from those for ``weight``'s: RGB -> RGBY keeps
    the RGB filters and starts the yellow one (the ER stain) from the mean of the red and blue
    filters; RGBY -> RGB drops the yellow filters. fastai's own conversion zeroes the extra
    channels, which wastes the stain at the start."""
    have = weight.shape[1]
    if have == n_in:
        return weight
    if have == 4 and n_in == 3:
        return weight[:, :3].clone()
    if have == 3 and n_in == 4:
        return torch.cat([weight, ((weight[:, 0] + weight[:, 2]) / 2).unsqueeze(1)], dim=1)
    raise HPAError(f"cannot adapt a first convolution of {have} input channels to {n_in}")


def first_conv_name(model: nn.Module) -> str:
    """The state-dict name of the first convolution's weight (``0.0.weight`` in a torchvision body)."""
    return next(name for name, _ in model.named_parameters())


def expand_first_conv(model: nn.Module, n_in: int) -> None:
    """Give a pretrained RGB model more input channels, as ``rgby_filters`` says."""
    conv, parent, name = _get_first_layer(model)
    if not isinstance(conv, nn.Conv2d) or conv.in_channels != 3:
        raise HPAError(f"cannot add input channels: first layer is {type(conv).__name__}")
    new = nn.Conv2d(n_in, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                    device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(rgby_filters(conv.weight, n_in))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    setattr(parent, name, new)


# torchvision's published DenseNet files name some layers "norm.1" where its models say "norm1";
# torchvision renames them with this pattern when it loads them (densenet._load_state_dict)
_DENSENET_OLD_NAME = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


@dataclass(frozen=True)
class ImageNetLayout:
    """An ImageNet checkpoint of one architecture as its library publishes it (torchvision's
    ``resnet18-f37072fd.pth``, timm's ``model.safetensors``): every tensor's name and shape
    (``shapes``), where each tensor of the body goes in this package's 3-stain model (``to_model``),
    and the classifier's names (with any auxiliary classifier), which are left out (``classifier``)."""
    library: str
    shapes: dict
    to_model: dict
    classifier: frozenset

    def rename(self, name: str) -> str:
        """A name as the library's own loader reads it."""
        if self.library == "torchvision":
            return _DENSENET_OLD_NAME.sub(r"\1\2", name)
        return name


@functools.lru_cache(maxsize=None)
def imagenet_layout(arch: str) -> ImageNetLayout | None:
    """How the published ImageNet file of ``arch`` maps onto ``create_model(arch, 3, ...)``; None
    for an architecture without ImageNet weights (``cnn``). Built on the meta device. fastai's
    ``create_vision_model`` keeps torchvision's children before its cut as ``body[i]``;
    ``create_timm_model`` keeps timm's model without its classifier as ``body.model``."""
    build = builder(arch)
    library, source = getattr(build, "imagenet", (None, None))
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if library == "torchvision":
            from fastai.vision.learner import model_meta

            reference = source(weights=None)
            cut = model_meta.get(source, {}).get("cut")
            children = list(reference.named_children())
            kept = children[:cut] if cut is not None else children
            to_model = {f"{child}.{key}": f"0.{i}.{key}" for i, (child, module) in enumerate(kept)
                        for key in module.state_dict()}
        elif library == "timm":
            import timm

            reference = timm.create_model(source, pretrained=False, **getattr(build, "published", {}))
            body = timm.create_model(source, pretrained=False, num_classes=0)
            to_model = {key: f"0.model.{key}" for key in body.state_dict()}
        else:
            return None
    shapes = {name: tuple(t.shape) for name, t in reference.state_dict().items()}
    return ImageNetLayout(library, shapes, to_model, frozenset(set(shapes) - set(to_model)))


_warned: set = set()


def create_model(arch: str, n_in: int, n_out: int, pretrained: bool = True):
    """Build ``arch`` for ``n_in`` stains and ``n_out`` classes. Returns ``(model, used_pretrained)``.

    Without internet or a cached copy, ImageNet weights can't be had: warn once and train from
    random initialisation instead of failing (``transfer.start_model`` also takes a local file).
    """
    build = builder(arch)
    if pretrained and has_pretrained(arch):
        old_timeout = socket.getdefaulttimeout()
        socket.setdefaulttimeout(15)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = build(3, n_out, pretrained=True)
        except Exception as e:  # torch.hub, urllib and huggingface_hub each raise their own types
            if arch not in _warned:
                _warned.add(arch)
                reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
                logger.warning(f"ImageNet weights for {arch} are not cached and cannot be downloaded "
                               f"({reason}); training from random initialisation. Cache them under "
                               f"{torch.hub.get_dir()} or pass --weights PATH (the file as downloaded).")
        else:
            if n_in != 3:
                expand_first_conv(model, n_in)
            return model, True
        finally:
            socket.setdefaulttimeout(old_timeout)
    return build(n_in, n_out, pretrained=False), False


def splitter(model: nn.Module):
    """Body and head parameter groups for discriminative learning rates (of the model inside a
    ``torch.compile`` wrapper, which cannot be indexed)."""
    from .device import uncompiled

    return default_split(uncompiled(model))
