"""A trained model as ONNX, with the input normalisation inside the graph,
for runtimes without PyTorch or fastai."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..atomic import atomic_path
from ..console import log


class NormalisedModel(nn.Module):
    """Takes images scaled to 0..1 (N, C, H, W), normalises them with the training statistics and
    returns class probabilities."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return torch.sigmoid(self.model((x - self.mean) / self.std))


def export_onnx(predictor, out: Path, check: bool = True) -> dict:
    """Write ``out`` and, where onnxruntime is installed, compare it with PyTorch on one batch."""
    meta = predictor.meta
    model = NormalisedModel(predictor.learn.model.cpu().eval(), meta["mean"], meta["std"]).eval()
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
            log("note: onnxruntime is not installed, so the ONNX file was not checked (pip install onnxruntime)")
            return result
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = session.run(None, {"image": example.numpy()})[0]
        with torch.no_grad():
            want = model(example).numpy()
        result.update(checked=True, max_abs_diff=float(np.abs(got - want).max()))
    return result
