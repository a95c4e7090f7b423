"""The optimizer of a run: torch's AdamW through fastai's ``OptimWrapper``, set up as fastai's Adam
(betas 0.9/0.99, eps 1e-5, decoupled weight decay 0.01), with no weight decay on normalisation
weights and biases; one fused kernel per step, on CUDA and on the CPU.

fastai's own ``Adam`` steps each parameter tensor in Python, five calls a tensor (resnet34 with its
head: 114 tensors, over a thousand small kernel launches a step on a GPU).
"""
from __future__ import annotations

import torch
from fastai.optimizer import OptimWrapper, detuplify_pg, set_item_pg
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

    def _torch_groups(self, i: int) -> list[dict]:
        return [pg for pg, owner in zip(self.opt.param_groups, self.owners) if owner == i]

    @property
    def param_lists(self):
        return L([p for pg in self._torch_groups(i) for p in pg["params"]] for i in range(self.n_layer_groups))

    @property
    def hypers(self):
        # a layer group's first torch group is its decaying one (when it has weight matrices); torch's
        # unset switches (``fused`` or ``foreach``: None) are left out, as loggers that write every
        # hyper-parameter as a number (fastai's TensorBoardCallback) cannot take None
        return L({self.fwd_map.get(k, k): v for k, v in detuplify_pg(self._torch_groups(i)[0]).items()
                  if k != "params" and v is not None}
                 for i in range(self.n_layer_groups))

    def _set_hyper(self, k, v):
        name = self.bwd_map[k]
        for pg, owner, decaying in zip(self.opt.param_groups, self.owners, self.decaying):
            if name != "weight_decay" or decaying:
                set_item_pg(pg, name, v[owner])


def adamw(params, lr: float = 1e-3, fused: bool | None = None) -> AdamW:
    """fastai's ``opt_func``: called by ``Learner.create_opt`` with the splitter's layer groups."""
    return AdamW(params, lr=lr, fused=fused)
