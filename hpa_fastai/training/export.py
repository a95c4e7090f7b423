"""A run's two exports: fastai's pickled Learner (``export.pkl``, with the model description in it)
and the safe export (``model.safetensors`` + ``model.json``) that loads without unpickling."""
from __future__ import annotations

from pathlib import Path

from .. import modelfile
from ..atomic import atomic_path
from ..data.training_set import TrainingSet
from ..rundir import EXPORT_PKL


def model_meta(ts: TrainingSet, thresholds) -> dict:
    """model.json's contents: what the model reads and how its outputs are decoded."""
    cfg = ts.cfg
    return {"arch": cfg.arch, "format": ts.format, "channels": cfg.channels, "n_in": len(cfg.channels),
            "size": cfg.size, "mean": ts.mean, "std": ts.std, "vocab": ts.vocab, "names": ts.names,
            "thresholds": [float(t) for t in thresholds], "loss": cfg.loss, "focal_gamma": cfg.focal_gamma}


def export_model(learn, meta: dict, run_dir: Path) -> None:
    description = modelfile.ModelDescription(meta)
    learn.add_cb(description)
    try:
        with atomic_path(run_dir / EXPORT_PKL, durable=True) as tmp:
            learn.export(tmp)
    finally:
        learn.remove_cb(description)
    modelfile.save(learn.model.state_dict(), meta, run_dir)
