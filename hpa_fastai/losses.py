"""Loss registry: one small builder per loss, ``create_loss`` as the one door in, as ``models`` has
for architectures. A builder takes the probability threshold its decoding uses and the loss's own
parameters; every loss here works on independent sigmoids, one per class, and carries the
activation and decoding that fastai's ``get_preds`` and ``predict`` look for.

The decoding is the one every prediction path uses (``metrics.decode``): a class is predicted when
its probability reaches its threshold (one per class once thresholds are tuned: ``set_thresholds``),
and an image where none does gets its most probable class. So ``learn.predict``, a learner loaded
from ``export.pkl`` and ``run.py predict`` give one image the same labels."""
from __future__ import annotations

import torch
from fastai.losses import BCEWithLogitsLossFlat
from torch import nn
from torch.nn import functional as F
from torchvision.ops import sigmoid_focal_loss

from .device import plain_tensor
from .errors import HPAError


def decode(probs: torch.Tensor, thresh) -> torch.Tensor:
    """Labels of ``probs`` (images x classes) as a boolean tensor: a class where its probability
    reaches ``thresh`` (one number, or one per class), and in a row where none does, the most
    probable class; as ``metrics.decode`` does for arrays."""
    t = torch.as_tensor(thresh, dtype=probs.dtype, device=probs.device)
    preds = probs >= t
    if preds.ndim >= 1 and preds.shape[-1]:
        empty = ~preds.any(-1, keepdim=True)
        top = torch.zeros_like(preds).scatter_(-1, probs.argmax(-1, keepdim=True), True)
        preds = preds | (empty & top)
    return preds


class ThresholdDecoding:
    """The decoding fastai's ``get_preds(with_decoded=True)`` and ``predict`` call (``decodes``), with
    the loss's ``thresh``: one probability threshold, or a tensor of one per class."""

    def decodes(self, x):
        return decode(x, self.thresh)


class _SigmoidLoss(ThresholdDecoding, nn.Module):
    """A multi-label loss on independent sigmoids, with the activation and decoding fastai's
    get_preds and predict look for (as BCEWithLogitsLossFlat has them)."""

    def __init__(self, thresh: float = 0.5):
        super().__init__()
        self.thresh = thresh

    def activation(self, x):
        return torch.sigmoid(x)


class BCEWithLogits(ThresholdDecoding, BCEWithLogitsLossFlat):
    """fastai's ``BCEWithLogitsLossFlat`` with this module's decoding (per-class thresholds, the most
    probable class for an image where none passes), on plain tensors. fastai's wraps the predictions
    and targets in its ``TensorBase`` subclass, whose Python-level dispatch then runs for every tensor
    operation of the loss and of what reads it (the recorder, the NaN check): about a millisecond of
    host time per training step. The values are the same: the mean over every image and class."""

    def __call__(self, inp, targ, **kwargs):
        if kwargs or inp.ndim != 2 or self.axis not in (-1, 1):  # what fastai's own does otherwise
            return super().__call__(inp, targ, **kwargs)
        func = self.func
        inp, targ = plain_tensor(inp), plain_tensor(targ)
        if targ.dtype != torch.float32:
            targ = targ.float()
        if func.reduction == "none":  # fastai's flat loss gives one value per image and class, flattened
            inp, targ = inp.reshape(-1), targ.reshape(-1)
        return F.binary_cross_entropy_with_logits(inp, targ, weight=func.weight, pos_weight=func.pos_weight,
                                                  reduction=func.reduction)


class BinaryFocalLoss(_SigmoidLoss):
    """Focal loss on independent sigmoids, as torchvision computes it (fastai's FocalLossFlat is for
    single-label softmax)."""

    def __init__(self, gamma: float = 2.0, thresh: float = 0.5):
        super().__init__(thresh)
        self.gamma = gamma

    def forward(self, inp, targ):
        return sigmoid_focal_loss(inp.float(), targ.float(), alpha=-1, gamma=self.gamma, reduction="mean")


class AsymmetricLoss(_SigmoidLoss):
    """The asymmetric loss (ASL) of Ridnik et al., "Asymmetric Loss For Multi-Label Classification"
    (ICCV 2021), for multi-label data where almost every label of an image is negative:

        L = -[ y (1 - p)^gamma_pos log(p) + (1 - y) p_m^gamma_neg log(1 - p_m) ],  p_m = max(p - clip, 0)

    Easy negatives are down-weighted (``gamma_neg``) and those below ``clip`` discarded, so the
    few positives of a rare class are not drowned by the negatives of every other image. The
    authors' code sums over the batch; this takes the mean over images and classes, as BCE does,
    so losses and learning rates stay on BCE's scale (Adam's steps do not depend on the scale).
    With gamma_neg = gamma_pos = clip = 0 it is BCE."""

    def __init__(self, gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05, thresh: float = 0.5):
        super().__init__(thresh)
        self.gamma_neg, self.gamma_pos, self.clip = gamma_neg, gamma_pos, clip

    def forward(self, inp, targ):
        x, y = inp.float(), targ.float()
        p = torch.sigmoid(x)
        log_p = F.logsigmoid(x)  # log(p) and log(1 - p) without the overflow of log(sigmoid(x))
        if self.clip > 0:
            p_neg = (p - self.clip).clamp(min=0)
            log_not_p = torch.log((1 - p_neg).clamp(min=1e-8))
        else:
            p_neg, log_not_p = p, F.logsigmoid(-x)
        loss = y * log_p * (1 - p) ** self.gamma_pos + (1 - y) * log_not_p * p_neg ** self.gamma_neg
        return -loss.mean()


LOSSES: dict = {}
# each loss's parameters and the config field (flag) that sets it
LOSS_FLAGS: dict[str, dict[str, str]] = {}


def register_loss(name: str, **flags: str):
    """Register a builder under ``name``; ``flags`` maps its parameters to the config fields of the
    same meaning (``gamma="focal_gamma"``), so a run's flags and a model.json reach them alike."""
    def wrap(fn):
        LOSSES[name] = fn
        LOSS_FLAGS[name] = flags
        return fn
    return wrap


@register_loss("bce")
def bce(thresh: float = 0.5) -> nn.Module:
    """Binary cross-entropy on logits: fastai's ``BCEWithLogitsLossFlat`` (on plain tensors)."""
    return BCEWithLogits(thresh=thresh)


@register_loss("focal", gamma="focal_gamma")
def focal(thresh: float = 0.5, gamma: float = 2.0) -> nn.Module:
    return BinaryFocalLoss(gamma, thresh)


@register_loss("asl", gamma_neg="asl_gamma_neg", gamma_pos="asl_gamma_pos", clip="asl_clip")
def asl(thresh: float = 0.5, gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05) -> nn.Module:
    return AsymmetricLoss(gamma_neg, gamma_pos, clip, thresh)


def create_loss(name: str, thresh: float = 0.5, **params) -> nn.Module:
    """The loss ``name`` with its parameters; an unknown name is an error, never a silent BCE."""
    if name not in LOSSES:
        raise HPAError(f"--loss {name!r:.40}: unknown loss; choose from {', '.join(LOSSES)}")
    return LOSSES[name](thresh=thresh, **params)


def loss_params(name: str, values) -> dict:
    """The parameters of loss ``name`` read from ``values``: a config object or a dict (model.json)
    with fields named as the flags; fields it lacks keep the builder's defaults."""
    get = values.get if isinstance(values, dict) else lambda k, d=None: getattr(values, k, d)
    return {param: get(field) for param, field in LOSS_FLAGS.get(name, {}).items() if get(field) is not None}


def loss_from(values) -> nn.Module:
    """The loss that ``values`` (a TrainConfig, or a model.json's description) names, with its parameters;
    a model.json's per-class ``thresholds`` decode its predictions."""
    get = values.get if isinstance(values, dict) else lambda k, d=None: getattr(values, k, d)
    name = get("loss", "bce") or "bce"
    loss = create_loss(name, thresh=get("threshold", 0.5) or 0.5, **loss_params(name, values))
    if isinstance(values, dict) and values.get("thresholds") is not None:
        set_thresholds(loss, values["thresholds"])
    return loss


def set_thresholds(loss, thresholds) -> None:
    """Decode ``loss``'s predictions (``learn.predict``, ``get_preds(with_decoded=True)``) with one
    threshold per class. The learner's pickle (export.pkl) carries them."""
    loss.thresh = torch.tensor([float(t) for t in thresholds], dtype=torch.float32)
