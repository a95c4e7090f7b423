"""The optimizer of a run: torch's AdamW through fastai's ``OptimWrapper``, set up as fastai's Adam
(betas 0.9/0.99, eps 1e-5, decoupled weight decay 0.01), with no weight decay on normalisation
weights and biases; one fused kernel per step, on CUDA and on the CPU.

fastai's own ``Adam`` steps each parameter tensor in Python, five calls a tensor (resnet34 with its
head: 114 tensors, over a thousand small kernel launches a step on a GPU).
"""
from __future__ import annotations

import numpy as np
import torch
from fastai.optimizer import OptimWrapper
from fastcore.foundation import L

BETAS = (0.9, 0.99)  # fastai's Adam: mom, sqr_mom
EPS = 1e-5
WEIGHT_DECAY = 0.01


def decays(param: torch.Tensor) -> bool:
    """Weight decay applies to weight matrices and convolution kernels; normalisation weights and
    biases (the one-dimensional tensors) keep it off, as fastai's ``wd_bn_bias=False`` does for its
    own optimizers (``OptimWrapper`` ignores that flag)."""
    return param.ndim > 1


class AdamW(OptimWrapper):
    """torch's AdamW under fastai's view of parameter groups.

    fastai's hyper-parameters are per *layer group* (the splitter's body and head): a
    ``slice(lr/100, lr/2)`` spreads learning rates over the layer groups and ``freeze_to(n)``
    counts them. Plain ``OptimWrapper`` shows fastai one group per torch param group, so the extra
    no-weight-decay groups would double both. Here each layer group is split into a decaying and a
    non-decaying torch group, but fastai still sees one group per layer group: a learning rate or
    momentum set for a layer group goes to both of its torch groups, weight decay only to the
    decaying one. This is the one place that works around ``OptimWrapper``."""

    def __init__(self, layer_groups, lr: float = 1e-3, wd: float = WEIGHT_DECAY, fused: bool | None = None):
        layer_groups = [list(g) for g in (layer_groups if isinstance(layer_groups[0], (list, L)) else [layer_groups])]
        groups, owners, decaying = [], [], []
        for i, params in enumerate(layer_groups):
            for with_decay in (True, False):
                members = [p for p in params if decays(p) == with_decay]
                if members:
                    groups.append({"params": members, "weight_decay": wd if with_decay else 0.0})
                    owners.append(i)
                    decaying.append(with_decay)
        # fused: one kernel for every tensor of a step, and the step count kept beside the weights, so
        # the host never reads it (foreach: a few kernels over lists, reading each step count on the
        # host). On the CPU the fused step is also about 6x faster: 14 against 86 ms for resnet18.
        fused = True if fused is None else fused
        kernels = {"fused": True} if fused else {"foreach": True}
        opt = torch.optim.AdamW(groups, lr=lr, betas=BETAS, eps=EPS, **kernels)
        super().__init__(opt=opt)
        self.owners, self.decaying, self.n_layer_groups = owners, decaying, len(layer_groups)

    # OptimWrapper reaches the torch optimizer's step and zero_grad through fastcore's generic
    # attribute forwarding, twice a batch: these call them directly
    def step(self, closure=None):
        return self.opt.step(closure)

    def zero_grad(self, set_to_none: bool = True):
        self.opt.zero_grad(set_to_none=set_to_none)

    def _torch_groups(self, i: int) -> list[dict]:
        return [pg for pg, owner in zip(self.opt.param_groups, self.owners) if owner == i]

    @property
    def param_lists(self):
        return L([p for pg in self._torch_groups(i) for p in pg["params"]] for i in range(self.n_layer_groups))

    # fastai reads ``hypers`` three times a batch (the recorder and the one-cycle scheduler) and sets
    # two of them before it; its generic versions rebuild every group's dictionary and parameter
    # list each time, a few hundred microseconds of host time per step. These do the same directly.

    @property
    def hypers(self):
        # a layer group's first torch group is its decaying one (when it has weight matrices); torch's
        # unset switches (``fused`` or ``foreach``: None) are left out, as loggers that write every
        # hyper-parameter as a number (fastai's TensorBoardCallback) cannot take None
        groups = self.opt.param_groups
        return [_named(groups[self.owners.index(i)], self.fwd_map) for i in range(self.n_layer_groups)]

    def set_hyper(self, k, v):
        if isinstance(v, slice):  # fastai spreads a slice over the layer groups
            return super().set_hyper(k, v)
        values = list(v) if isinstance(v, (list, tuple, L)) else v.ravel().tolist() if isinstance(v, np.ndarray) else [v]
        if len(values) == 1:
            values = values * self.n_layer_groups
        if len(values) != self.n_layer_groups:
            raise AssertionError(f"Trying to set {len(values)} values for {k} but there are {self.n_layer_groups} "
                                 "parameter groups.")
        self._set_hyper(k, values)

    def _set_hyper(self, k, v):
        name = self.bwd_map[k]
        base, _, index = name.partition("__")  # betas__0: the first of the tuple ``betas``
        for pg, owner, decaying in zip(self.opt.param_groups, self.owners, self.decaying):
            if name == "weight_decay" and not decaying:
                continue
            if index:
                pg[base] = tuple(v[owner] if j == int(index) else old for j, old in enumerate(pg[base]))
            else:
                pg[name] = v[owner]


def last_hyper(opt, name: str):
    """Hyper-parameter ``name`` (fastai's name) of ``opt``'s last layer group: what fastai's recorder
    and scheduler read from ``opt.hypers[-1]`` every batch, read without building every group's."""
    if not isinstance(opt, AdamW):
        return opt.hypers[-1][name]
    pg = opt.opt.param_groups[opt.owners.index(opt.n_layer_groups - 1)]
    key = opt.bwd_map.get(name, name)
    base, _, index = key.partition("__")
    return pg[base][int(index)] if index else pg[key]


def _named(pg: dict, fwd_map: dict) -> dict:
    """fastai's names for a torch param group's hyper-parameters (``detuplify_pg`` and ``fwd_map``)."""
    out = {}
    for k, v in pg.items():
        if k == "params" or v is None:
            continue
        if isinstance(v, (tuple, list)):
            for j, x in enumerate(v):
                out[fwd_map.get(f"{k}__{j}", f"{k}__{j}")] = x
        else:
            out[fwd_map.get(k, k)] = v
    return out


def adamw(params, lr: float = 1e-3, fused: bool | None = None) -> AdamW:
    """fastai's ``opt_func``: called by ``Learner.create_opt`` with the splitter's layer groups."""
    return AdamW(params, lr=lr, fused=fused)
