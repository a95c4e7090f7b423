"""The one Learner factory, for ``run.py`` and the notebook door alike: the DataLoaders of a
training set (rare classes oversampled unless turned off), the model from the registry, the loss
from the loss registry, macro and samples F1, torch's AdamW under fastai's body/head parameter
groups (``optimizer``), and what the device offers: mixed precision, channels-last, cuDNN's
autotuner, ``torch.compile`` (``device``)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from fastai.learner import Learner
from fastai.torch_core import set_seed

from .. import device as D
from .. import metrics as M
from ..config import TrainConfig
from ..data.pipeline import make_dls
from ..data.splits import make_splitter
from ..data.training_set import TrainingSet
from ..errors import HPAError
from ..losses import loss_from
from ..models import create_model, splitter
from ..runs.folder import HISTORY
from .history import RunHistory
from .optimizer import adamw

logger = logging.getLogger(__name__)


@dataclass
class LearnerSetup:
    """What building the Learner decided: the precision it trains in, whether ImageNet weights
    were loaded (offline they may not be), the memory format and whether the model is compiled."""
    precision: str
    pretrained: bool
    channels_last: bool = False
    compiled: bool = False


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def training_dls(ts: TrainingSet, device: torch.device | None = None, augment: bool = True,
                 oversample: bool | None = None):
    """The DataLoaders of ``ts``: its split (random, or fold ``--fold`` of ``--n-folds``), batches of
    ``--bs``, oversampling as ``--oversample`` says (or ``oversample``), checked to leave images on
    both sides."""
    cfg = ts.cfg
    oversample = cfg.oversample if oversample is None else oversample
    split = make_splitter(ts.items, len(ts.vocab), cfg.valid_pct, cfg.seed, cfg.n_folds, cfg.fold)
    dls = make_dls(ts.items, ts.vocab, cfg.channels, cfg.size, ts.mean, ts.std, split, bs=cfg.bs,
                   workers=cfg.workers, seed=cfg.seed, device=device or default_device(), augment=augment,
                   oversample_cap=cfg.oversample_cap if oversample else None)
    if len(dls.train) == 0:
        raise HPAError(f"--bs {cfg.bs} is larger than the {len(dls.train_ds)} training images; lower --bs")
    if len(dls.valid_ds) == 0:  # training would crash after its first epoch, with nothing to score
        raise HPAError(f"--valid-pct {cfg.valid_pct} leaves none of the {len(ts.items)} images for validation; "
                       "raise --valid-pct")
    return dls


def create_learner(dls, ts: TrainingSet, cfg: TrainConfig, device: torch.device | None = None,
                   **learner_kwargs) -> tuple[Learner, LearnerSetup]:
    """A Learner on ``dls`` for ``ts``'s stains and classes with ``cfg``'s model, loss, weight decay,
    threshold, precision, memory format and compile options; ``learner_kwargs`` go to fastai's ``Learner``
    (``path``, ``model_dir``, ``cbs``...)."""
    device = device or default_device()
    set_seed(cfg.seed, reproducible=True)
    model, used_pretrained = create_model(cfg.arch, len(cfg.channels), len(ts.vocab), cfg.pretrained, cfg.weights)
    model.to(device)  # before the optimizer sees the parameters: fused AdamW wants them on the GPU
    learner_kwargs.setdefault("wd", cfg.wd)  # fastai sets it on the optimizer at every fit
    learn = Learner(dls, model, loss_func=loss_from(cfg), opt_func=partial(adamw, fused=device.type == "cuda"),
                    metrics=[M.f1_metric("macro", cfg.threshold), M.f1_metric("samples", cfg.threshold)],
                    splitter=splitter, **learner_kwargs)
    precision = D.training_precision(cfg.precision, device)
    D.set_precision(learn, precision)
    if precision == "bf16" and device.type == "cpu":
        logger.info("note: bf16 on a CPU is fast only with bfloat16 instructions (AMX, AVX512-BF16); other CPUs "
                    "emulate it, many times slower than fp32")
    channels_last = D.use_channels_last(cfg.memory_format, device)
    if channels_last:
        D.set_channels_last(learn)
    D.tune_backend(device)  # after set_seed, which turns cuDNN's autotuner off
    if cfg.compile:
        learn.model = D.compile_model(learn.model)
    return learn, LearnerSetup(precision, used_pretrained, channels_last, cfg.compile)


def run_learner(ts: TrainingSet, run_dir: Path | None = None, device: torch.device | None = None,
                cbs=()) -> tuple[Learner, LearnerSetup]:
    """The Learner of a run: ``create_learner`` on the run's DataLoaders, writing into ``run_dir``, with
    the run's history (``learn.run_history``, kept in history.csv; without ``run_dir``, in memory and
    the current folder as the Learner's path) and ``cbs``, and without fastai's
    progress bars (they print carriage returns into logs; whoever runs the training shows the
    progress it wants through its own callbacks)."""
    from fastai.callback.progress import ProgressCallback

    device = device or default_device()
    history = RunHistory(None if run_dir is None else Path(run_dir) / HISTORY)
    learn, setup = create_learner(training_dls(ts, device), ts, ts.cfg, device, path=Path(run_dir or "."),
                                  model_dir=".", cbs=[history, *cbs])
    learn.remove_cbs(learn.cbs.filter(lambda c: isinstance(c, ProgressCallback)))
    learn.logger = lambda *_: None  # the Recorder's print of each epoch's values
    return learn, setup
