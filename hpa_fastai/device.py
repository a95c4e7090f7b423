"""What the device a model runs on offers, for training and prediction alike: mixed precision
(bf16 on CPU and CUDA, fp16 on CUDA), the channels-last memory format, cuDNN's autotuner and
``torch.compile``.

fastai's ``MixedPrecision`` always asks for CUDA autocast, which does nothing on a CPU; the
subclass here autocasts on the device the model is on. The precision a model trained in is
recorded in model.json, and prediction on a GPU runs in it too.
"""
from __future__ import annotations

import contextlib

import torch
from fastai.callback.core import Callback
from fastai.callback.fp16 import AMPMode, MixedPrecision
from fastcore.foundation import L

from .errors import HPAError

PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# The backend of --compile. inductor generates kernels (Triton on CUDA, C++ on CPU); tests on a
# small CPU swap in "aot_eager", which traces and splits the graphs the same way in seconds, where
# inductor's first C++ build takes over a minute.
COMPILE_BACKEND = "inductor"
# inductor's mode: None is its default. bench/gpu.py measures "reduce-overhead" (the step replayed as
# CUDA graphs) on a GPU; it is not offered as a flag until a measurement says it pays.
COMPILE_MODE = None


def plain_tensor(t):
    """``t`` as a plain ``torch.Tensor`` (what fastai's tensor types are, without their metadata); other
    values as they are. fastai replaces ``Tensor.as_subclass`` with a Python function that also copies
    the metadata, and its tensor types run a Python-level dispatch for every attribute and operation:
    a training step that converts its batch and its loss's inputs pays both a few times a batch. This
    calls torch's own method, and only where a conversion is needed."""
    if type(t) is torch.Tensor or not isinstance(t, torch.Tensor):
        return t
    return torch._C.TensorBase.as_subclass(t, torch.Tensor)


def model_device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def training_precision(requested: str, device: torch.device) -> str:
    """The precision a run trains in: ``auto`` is bf16 on a CUDA GPU that has it (fp16 on one that
    has not) and fp32 on CPU; bf16 works on CPU and CUDA; fp16 needs CUDA."""
    if requested == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if requested == "fp16" and device.type != "cuda":
        raise HPAError("--precision fp16 needs a CUDA GPU (float16 autocast with loss scaling); "
                       "on CPU use --precision bf16 or fp32")
    if requested == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise HPAError(f"--precision bf16: {torch.cuda.get_device_name()} has no bfloat16; use fp16 or fp32")
    if requested not in PRECISIONS:
        raise HPAError(f"--precision must be one of auto, {', '.join(PRECISIONS)} (got {requested!r:.40})")
    return requested


def inference_precision(trained: str, requested: str, device: torch.device) -> str:
    """The precision a model predicts in: ``auto`` is, on CUDA, the one it trained in (model.json's
    ``precision``; fp16 where the GPU has no bf16), and fp32 on CPU, as for training: most CPUs
    have no bfloat16 arithmetic and emulate it far slower than float32. An explicit fp32, bf16 or
    fp16 is checked as for training."""
    if requested != "auto":
        return training_precision(requested, device)
    if device.type != "cuda" or trained not in DTYPES:
        return "fp32"
    if trained == "bf16" and not torch.cuda.is_bf16_supported():
        return "fp16"
    return trained


class DeviceMixedPrecision(MixedPrecision):
    """fastai's ``MixedPrecision`` (autocast around the forward pass and the loss, predictions cast
    back to float32, loss scaling for fp16), autocasting on the device the model is on."""

    def before_fit(self):
        # fastai's before_fit, with the model's device in place of "cuda"
        device_type = model_device(self.learn.model).type
        dtype = DTYPES[self.amp_mode.value]
        self.kwargs["enabled"] = dtype == torch.float16  # bfloat16 has float32's range: no loss scaling
        self.autocast = torch.autocast(device_type, dtype=dtype)
        self.learn.scaler, self.scales = torch.amp.GradScaler(device_type, **self.kwargs), L()


def set_precision(learn, precision: str) -> None:
    """Put ``learn`` in ``precision`` (fp32 removes any mixed precision it had)."""
    learn.remove_cbs(learn.cbs.filter(lambda c: isinstance(c, MixedPrecision)))
    if precision in DTYPES:
        learn.add_cb(DeviceMixedPrecision(amp_mode=AMPMode(precision)))


def autocast(precision: str, device: torch.device):
    """The autocast context of ``precision`` on ``device`` (nothing for fp32)."""
    if precision not in DTYPES:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def use_channels_last(requested: str, device: torch.device) -> bool:
    """``auto``: channels-last on CUDA, where convolutions in NHWC use the tensor cores without
    transposing every activation; contiguous (NCHW) on CPU."""
    return requested == "channels-last" or (requested == "auto" and device.type == "cuda")


class ChannelsLast(Callback):
    """Hands the model its input batches in the channels-last memory format, as its weights are.
    Runs after the batch transforms (augmentation, normalisation), which make NCHW tensors."""

    order = 5  # before mixed precision (10) enters autocast; any order before the forward pass works

    def before_batch(self):
        self.learn.xb = tuple(to_channels_last(x) for x in self.xb)


def to_channels_last(x):
    return x.contiguous(memory_format=torch.channels_last) if isinstance(x, torch.Tensor) and x.ndim == 4 else x


def set_channels_last(learn, on: bool = True) -> None:
    """The model's weights and every input batch in the channels-last format, or both back in the
    contiguous (NCHW) one."""
    learn.remove_cbs(learn.cbs.filter(lambda c: isinstance(c, ChannelsLast)))
    learn.model.to(memory_format=torch.channels_last if on else torch.contiguous_format)
    if on:
        learn.add_cb(ChannelsLast())


def tune_backend(device: torch.device) -> None:
    """On CUDA, let cuDNN time its convolution algorithms once per input shape and keep the
    fastest: the images of a run all have one size, so only the first batches (and a smaller last
    batch) pay for it. The fastest algorithms are not always deterministic."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.deterministic = False


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """``torch.compile(model)``: the returned module shares the parameters of ``model``, which
    stays reachable as ``_orig_mod`` (see ``uncompiled``)."""
    if COMPILE_BACKEND == "inductor" and COMPILE_MODE is not None:
        return torch.compile(model, mode=COMPILE_MODE)
    return torch.compile(model, backend=COMPILE_BACKEND)


def uncompiled(model: torch.nn.Module) -> torch.nn.Module:
    """The module ``torch.compile`` wrapped, or ``model`` itself: its state dict has the plain
    parameter names that the exports, checkpoints and best weights use."""
    return getattr(model, "_orig_mod", model)
