"""The Learner of a run: DataLoaders from the training set's DataBlock (rare classes oversampled
with ``--oversample``), the model from the registry, torch's AdamW (``optimizer``), the loss (BCE,
focal or asymmetric), macro and samples F1, the one-line-per-epoch logger, and what the device
offers: mixed precision, channels-last, cuDNN's autotuner, ``torch.compile`` (``device``)."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from fastai.callback.progress import ProgressCallback
from fastai.learner import Learner
from fastai.torch_core import set_seed

from .. import device as D
from .. import metrics as M
from ..console import log
from ..data.pipeline import make_dls
from ..data.splits import make_splitter
from ..data.training_set import TrainingSet
from ..errors import HPAError
from ..models import create_model, splitter
from ..rundir import HISTORY
from .optimizer import adamw
from .progress import EpochLogger


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


def build_learner(ts: TrainingSet, run_dir: Path | None, quiet: bool = False,
                  device: torch.device | None = None) -> tuple[Learner, LearnerSetup]:
    cfg = ts.cfg
    device = device or default_device()
    splitter_fn = make_splitter(ts.items, len(ts.vocab), cfg.valid_pct, cfg.seed, cfg.n_folds, cfg.fold)
    dls = make_dls(ts.items, ts.vocab, cfg.channels, cfg.size, ts.mean, ts.std, splitter_fn,
                   bs=cfg.bs, workers=cfg.workers, seed=cfg.seed, device=device,
                   oversample_cap=cfg.oversample_cap if cfg.oversample else None)
    if len(dls.train) == 0:
        raise HPAError(f"--bs {cfg.bs} is larger than the {len(dls.train_ds)} training images; lower --bs")
    if len(dls.valid_ds) == 0:  # training would crash after its first epoch, with nothing to score
        raise HPAError(f"--valid-pct {cfg.valid_pct} leaves none of the {len(ts.items)} images for validation; "
                       "raise --valid-pct")
    set_seed(cfg.seed, reproducible=True)
    model, used_pretrained = create_model(cfg.arch, len(cfg.channels), len(ts.vocab), cfg.pretrained,
                                          cfg.weights, log=log)
    model.to(device)  # before the optimizer sees the parameters: fused AdamW wants them on the GPU
    history = run_dir / HISTORY if run_dir is not None else None
    loss = M.make_loss(cfg.loss, cfg.focal_gamma, cfg.threshold, cfg.asl_gamma_neg, cfg.asl_gamma_pos, cfg.asl_clip)
    learn = Learner(dls, model, loss_func=loss, opt_func=partial(adamw, fused=device.type == "cuda"),
                    metrics=[M.f1_metric("macro", cfg.threshold), M.f1_metric("samples", cfg.threshold)],
                    splitter=splitter, path=run_dir or Path("."), model_dir=".",
                    cbs=[EpochLogger(history, quiet=quiet)])
    learn.remove_cbs(learn.cbs.filter(lambda c: isinstance(c, ProgressCallback)))
    learn.logger = lambda *_: None
    precision = D.training_precision(cfg.precision, device)
    D.set_precision(learn, precision)
    if precision == "bf16" and device.type == "cpu" and not quiet:
        log("note: bf16 on a CPU is fast only with bfloat16 instructions (AMX, AVX512-BF16); other CPUs emulate "
            "it, many times slower than fp32")
    channels_last = D.use_channels_last(cfg.memory_format, device)
    if channels_last:
        D.set_channels_last(learn)
    D.tune_backend(device)  # after set_seed, which turns cuDNN's autotuner off
    if cfg.compile:
        learn.model = D.compile_model(learn.model)
    return learn, LearnerSetup(precision, used_pretrained, channels_last, cfg.compile)
