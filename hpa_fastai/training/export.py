"""A run's two exports: fastai's pickled Learner (``export.pkl``, with the model description in it)
and the safe export (``model.safetensors`` + ``model.json``) that loads without unpickling."""
from __future__ import annotations

from pathlib import Path

from .. import modelfile
from ..atomic import atomic_path
from ..data.training_set import TrainingSet
from ..rundir import EXPORT_PKL
from .callbacks import bare_model


def model_meta(ts: TrainingSet, thresholds, precision: str = "fp32") -> dict:
    """model.json's contents: what the model reads, how its outputs are decoded, and the precision
    it trained in (prediction runs in it too)."""
    cfg = ts.cfg
    return {"arch": cfg.arch, "format": ts.format, "channels": cfg.channels, "n_in": len(cfg.channels),
            "size": cfg.size, "mean": ts.mean, "std": ts.std, "vocab": ts.vocab, "names": ts.names,
            "thresholds": [float(t) for t in thresholds], "loss": cfg.loss, "focal_gamma": cfg.focal_gamma,
            "precision": precision}


def export_model(learn, meta: dict, run_dir: Path) -> None:
    """export.pkl and the safe export, both of the plain model: a ``torch.compile`` wrapper is
    neither pickled nor named in the weights (a compiled module would pickle its compiled code)."""
    description = modelfile.ModelDescription(meta)
    learn.add_cb(description)
    model = learn.model
    learn.model = bare_model(learn)
    try:
        with atomic_path(run_dir / EXPORT_PKL, durable=True) as tmp:
            learn.export(tmp)
    finally:
        learn.model = model
        learn.remove_cb(description)
    modelfile.save(bare_model(learn).state_dict(), meta, run_dir)
