"""The optimizer: torch's AdamW set up as fastai's Adam, no weight decay on normalisation weights and
biases, and fastai's freezing and discriminative learning rates working over its parameter groups."""
from __future__ import annotations

import pytest
import torch
from fastai.callback.core import Callback
from fastai.torch_core import norm_bias_params

from hpa_fastai.config import TrainConfig
from .helpers import build_learner
from hpa_fastai.training.optimizer import AdamW
from hpa_fastai.training.run import prepare


@pytest.fixture
def resnet(make_z2g):
    data = make_z2g(n=24, size=32)
    cfg = TrainConfig(data=str(data), arch="resnet18", pretrained=False, size=32, bs=8, lr="1e-3", seed=0, workers=0)
    learn, _ = build_learner(prepare(cfg))
    learn.create_opt()
    return learn


def ids(params) -> set:
    return {id(p) for p in params}


def test_adamw_is_set_up_as_fastais_adam_without_decay_on_norm_and_bias(resnet):
    opt = resnet.opt
    assert isinstance(opt, AdamW) and isinstance(opt.opt, torch.optim.AdamW)
    # fastai sees one group per layer group (body, head), torch has a decaying and a plain one each
    assert len(opt.hypers) == len(opt.param_lists) == 2 and len(opt.opt.param_groups) == 4
    for hypers in opt.hypers:
        assert (hypers["mom"], hypers["sqr_mom"], hypers["eps"], hypers["wd"]) == (0.9, 0.99, 1e-5, 0.01)
    without_decay = ids(p for g in opt.opt.param_groups if g["weight_decay"] == 0 for p in g["params"])
    assert without_decay == ids(norm_bias_params(resnet.model, with_bias=True))  # fastai's wd_bn_bias=False
    assert ids(p for g in opt.param_lists for p in g) == ids(resnet.model.parameters())
    # the fused kernel on the CPU as on CUDA: its step count stays beside the weights, never read by the host
    assert all(g["fused"] and not g["foreach"] for g in opt.opt.param_groups)
    # a weight decay set later (fit(wd=...)) reaches only the decaying groups
    opt.set_hyper("wd", 0.1)
    assert sorted(g["weight_decay"] for g in opt.opt.param_groups) == [0.0, 0.0, 0.1, 0.1]


class TorchLRs(Callback):
    """The learning rate of every torch param group at every training batch."""

    def __init__(self):
        self.lrs = []

    def before_step(self):
        self.lrs.append([g["lr"] for g in self.learn.opt.opt.param_groups])


def test_frozen_body_stays_frozen_and_discriminative_rates_reach_every_group(resnet):
    learn = resnet
    body, head = learn.model[0], learn.model[1]
    conv_before = body[0].weight.detach().clone()
    bn_before = body[1].weight.detach().clone()
    head_before = [p.detach().clone() for p in head.parameters()]
    learn.freeze()
    learn.fit_one_cycle(1, 1e-2)
    assert torch.equal(body[0].weight, conv_before)  # frozen: the body's convolutions did not move
    assert not torch.equal(body[1].weight, bn_before)  # fastai's train_bn: its BatchNorm layers still train
    assert all(not torch.equal(p, b) for p, b in zip(head.parameters(), head_before))

    learn.unfreeze()
    lr = 1e-2
    owners = learn.opt.owners
    record = TorchLRs()
    learn.fit_one_cycle(1, slice(lr / 100, lr / 2), cbs=[record])
    assert not torch.equal(body[0].weight, conv_before)
    assert record.lrs, "no training step recorded"
    for step in record.lrs:
        body_lrs = {v for v, o in zip(step, owners) if o == 0}
        head_lrs = {v for v, o in zip(step, owners) if o == 1}
        assert len(body_lrs) == len(head_lrs) == 1  # decaying and plain groups of a layer group move together
        assert head_lrs.pop() / body_lrs.pop() == pytest.approx(50)  # slice(lr/100, lr/2): body lr/100, head lr/2
    # fastai's one-cycle schedule starts at lr_max / 25
    assert max(record.lrs[0]) == pytest.approx(lr / 2 / 25, rel=1e-6)
    # what fastai reports (the history's lr column) is what torch uses
    assert learn.opt.hypers[-1]["lr"] == learn.opt.opt.param_groups[-1]["lr"]


def test_wd_reaches_the_decaying_groups_at_every_fit(make_z2g):
    data = make_z2g(n=24, size=32)
    cfg = TrainConfig(data=str(data), arch="cnn", pretrained=False, size=32, bs=8, lr="1e-3", seed=0, workers=0, wd=0.05)
    learn, _ = build_learner(prepare(cfg))
    learn.fit(1, 1e-3)  # fastai sets the Learner's wd on the optimizer when a fit starts
    decays = {g["weight_decay"] for g in learn.opt.opt.param_groups}
    assert decays == {0.0, 0.05}  # the decaying groups of body and head, none on norms and biases
