"""Loading a trained model: a run folder or model.json (the safe export, never unpickled), an
export.pkl (fastai's pickled learner: only with ``--trust``, wherever the file is), a
cross-validation folder (the ensemble of its folds), or several of them as one ensemble."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from fastai.data.core import DataLoaders
from fastai.learner import Learner

from .. import modelfile
from ..errors import HPAError
from ..losses import loss_from
from ..runs.files import read_cv
from ..runs.folder import CV, EXPORT_PKL, MODEL_JSON, SAFE_EXPORT
from .predictor import Ensemble, Predictor


def load_predictor(path="runs/latest", trust: bool = False, cpu: bool | None = None) -> "Predictor | Ensemble":
    """Load a trained model from a run folder, a model.json (safe: weights only, no pickle) or an
    export.pkl (fastai's pickled learner: only with ``trust``, wherever the file is).
    A cross-validation folder (``run.py cv``) loads as the ``Ensemble`` of its folds."""
    path = Path(path)
    if not path.exists():
        raise HPAError(f"--learner {path}: not found (train a model first: hpa-fastai)")
    if path.is_dir():
        if (path / CV).is_file():
            return _load_cv(path, trust, cpu)
        if all((path / f).is_file() for f in SAFE_EXPORT):
            return _load_safe(path / MODEL_JSON, cpu)
        if (path / EXPORT_PKL).is_file():
            return _load_pickle(path / EXPORT_PKL, trust, cpu)
        raise HPAError(f"--learner {path}: no model.json + model.safetensors or export.pkl in this folder")
    if path.suffix == ".json":
        return _load_safe(path, cpu)
    if path.suffix == ".safetensors":
        return _load_safe(path.with_name(MODEL_JSON), cpu)
    if path.suffix in (".pkl", ".pth"):
        return _load_pickle(path, trust, cpu)
    raise HPAError(f"--learner {path}: expected a run folder, model.json or export.pkl")


def _load_cv(folder: Path, trust: bool, cpu: bool | None) -> Ensemble:
    """The folds of a cross-validation, with the thresholds tuned on all their out-of-fold predictions."""
    cv = read_cv(folder)
    return Ensemble([load_predictor(folder / run, trust, cpu) for run in cv["runs"]], cv["thresholds"], folder)


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
    model, meta = modelfile.load(json_path)
    model.to(_device(cpu)).eval()
    learn = Learner(DataLoaders(), model, loss_func=loss_from(meta))
    return Predictor(learn, meta, json_path.parent, safe=True)


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
    meta = modelfile.description_of(learn)
    if meta is None:
        raise HPAError(f"{pkl}: this learner was not exported by hpa_fastai (no model description)")
    return Predictor(learn, meta, pkl.parent, safe=False)
