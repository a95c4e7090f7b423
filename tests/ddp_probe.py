"""Run by tests/test_distributed.py under torchrun: trains a tiny model and records, per rank, which
images that rank decoded in each epoch's training and validation passes."""
import os
import sys
from pathlib import Path

from fastai.learner import Learner

from hpa_fastai.data import pipeline as D
from hpa_fastai.config import TrainConfig
from hpa_fastai.training import train

data_dir, out = sys.argv[1], Path(sys.argv[2])
seen = out / f"seen_rank{os.environ['RANK']}.txt"
stage = []  # (epoch, "train" | "valid") while a fit's pass runs; the DataLoaders' set-up reads are not recorded
read, do_train, do_valid = D.ReadImage.__call__, Learner._do_epoch_train, Learner._do_epoch_validate
fitting, fit = [], Learner.fit


def recording(self, key):
    if stage and fitting:
        with open(seen, "a") as f:
            f.write(f"{stage[-1][0]} {stage[-1][1]} {key}\n")
    return read(self, key)


def staged(name, method):
    def wrapper(self, *args, **kwargs):
        stage.append((getattr(self, "epoch", 0), name))
        try:
            return method(self, *args, **kwargs)
        finally:
            stage.pop()
    return wrapper


def fitting_fit(self, *args, **kwargs):
    fitting.append(True)  # the final validation predictions of rank 0 are not part of training
    try:
        return fit(self, *args, **kwargs)
    finally:
        fitting.pop()


D.ReadImage.__call__ = recording
Learner.fit = fitting_fit
Learner._do_epoch_train = staged("train", do_train)
Learner._do_epoch_validate = staged("valid", do_valid)
# every training image once per epoch, so that the ranks' shares must be disjoint halves of the set
# (the oversampled draws, with repeats, are split between ranks in test_rare_classes.py)
train(TrainConfig(data=data_dir, out=str(out / "runs"), arch="cnn", epochs=2, bs=8, lr="1e-3", pretrained=False,
                  valid_pct=0.2, seed=0, oversample=False))
