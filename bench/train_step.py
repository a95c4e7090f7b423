"""Training step overhead: the project's Learner (as ``run_learner`` makes it, with the callbacks the
training door adds to every fit) against a plain PyTorch loop on the same in-memory batches.

Two tables:

1. Images/s around a real model (resnet18, fp32): the Learner against the plain loop with torch's
   AdamW, and against the plain loop with the Learner's own optimizer.
2. Host time per step around a one-layer model (a linear layer over tiny 8 px images), where the
   model's own compute is next to nothing: what fastai's per-batch work (callback events, the
   one-cycle scheduler, the recorder, the NaN check) costs on top of a bare loop's forward, loss,
   backward and optimizer step. On a GPU that host time is what a step cannot hide when the model
   is fast; the target is at most 1.5x the bare loop.

Data loading is taken out of both sides: the Learner gets the batches its own DataLoader made,
replayed from a list; the plain loop gets the same tensors as plain ``torch.Tensor``.
"""
from __future__ import annotations

import time

import _common as C


def _training_callbacks(monitor_higher: bool = True) -> list:
    """The callbacks the training door adds to each fit that act per batch or per epoch (not the
    checkpoint, which writes a file per epoch, outside the timed training part)."""
    import numpy as np

    from hpa_fastai.training.callbacks import KeepBestModel, NaNGuard, RunPhase, StopOnSignal, WarmupEarlyStopping

    comp = np.greater if monitor_higher else np.less
    return [RunPhase(), WarmupEarlyStopping(monitor="f1_macro", comp=comp, patience=5),
            KeepBestModel(monitor="f1_macro", comp=comp, fname="best", reset_on_fit=False), NaNGuard(), StopOnSignal()]


def _timer(device):
    import torch
    from fastai.callback.core import Callback

    class TrainTimer(Callback):
        """Seconds of the training part of an epoch: validation and epoch-end work are left out."""
        order = -100

        def before_train(self):
            self.t0 = time.perf_counter()

        def after_train(self):
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.seconds = time.perf_counter() - self.t0

    return TrainTimer()


class _Replay:
    """Batches from a list, as the Learner reads a loader (its length, its device): both sides of a
    table take the same batches from a list, the data loaders having a benchmark of their own."""

    def __init__(self, batches, device):
        self.batches, self.device = batches, device

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def _replay(learn, batches, device):
    """The Learner reads ``batches`` (and one validation batch) from memory instead of its loaders."""
    from fastai.data.core import DataLoaders

    valid = [learn.dls.valid.one_batch()]
    learn.dls = DataLoaders(_Replay(batches, device), _Replay(valid, device), device=device)


def throughput(args, prep) -> float:
    import torch

    from hpa_fastai.training.learner import run_learner
    from hpa_fastai.training.schedule import fit_one_cycle

    learn, setup = run_learner(prep)
    made = list(learn.dls.train)
    batches = [made[i % len(made)] for i in range(args.steps)]
    device = next(learn.model.parameters()).device
    _replay(learn, batches, device)

    def fastai_side():
        timer = _timer(device)
        fit_one_cycle(learn, 1, 1e-3, cbs=[timer, *_training_callbacks()])
        return timer.seconds

    model = learn.model
    # what a user writes: torch's AdamW with its default implementation, set up as fastai's Adam
    # (mom 0.9, sqr_mom 0.99, eps 1e-5, decoupled weight decay 0.01)
    torch_adam = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), eps=1e-5, weight_decay=0.01)
    plain_batches = [(x.as_subclass(torch.Tensor).to(device), y.as_subclass(torch.Tensor).float().to(device))
                     for x, y in batches]
    bce = torch.nn.BCEWithLogitsLoss()

    def plain_side(opt_step, zero):
        def run():
            model.train()
            t0 = time.perf_counter()
            for xb, yb in plain_batches:
                bce(model(xb), yb).backward()
                opt_step()
                zero()
            if device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t0
        return run

    fit_one_cycle(learn, 1, 1e-3)  # creates the Learner's optimizer, which the plain side reuses
    sides = {
        "Learner (run_learner + the run's callbacks)": fastai_side,
        "plain loop, torch AdamW": plain_side(torch_adam.step, lambda: torch_adam.zero_grad()),
        "plain loop, the Learner's optimizer": plain_side(lambda: learn.opt.step(), lambda: learn.opt.zero_grad()),
    }
    times = C.interleaved(sides, args.rounds)
    n = args.steps * args.bs
    base = "plain loop, torch AdamW"
    rows = [{"side": name, "images/s": C.rate(n, times[name]), **C.ratio(times, name, base),
             "target": "≥ 0.97" if name.startswith("Learner") else ""} for name in sides]
    main_ratio = rows[0]["ratio (median)"]
    notes = [f"ratio = plain-loop seconds / side seconds over the same {args.steps} batches "
             f"(> 1: faster than the plain loop); target Learner ≥ 0.97: "
             f"{'met' if main_ratio >= 0.97 else 'NOT met'} ({main_ratio:.3f})",
             "the Learner's optimizer: torch's AdamW, fused; torch's default on the CPU is its foreach kernels"]
    C.record("Training step overhead: Learner vs plain PyTorch", rows,
             {"arch": args.arch, "size": args.size, "bs": args.bs, "steps": args.steps, "rounds": args.rounds,
              "channels": "rgby", "device": device.type, "precision": setup.precision},
             notes, record=not args.no_record)
    return main_ratio


def host_time(args, prep) -> float:
    """Milliseconds of host time per step around a one-layer model."""
    import dataclasses
    import statistics

    import torch
    from torch import nn

    from hpa_fastai.training.learner import run_learner
    from hpa_fastai.training.optimizer import BETAS, EPS, WEIGHT_DECAY, decays
    from hpa_fastai.training.schedule import fit_one_cycle

    size, bs, steps = 8, 16, args.host_steps
    small = dataclasses.replace(prep, cfg=dataclasses.replace(prep.cfg, size=size, bs=bs))
    learn, _ = run_learner(small)
    device = next(learn.model.parameters()).device
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4 * size * size, len(prep.vocab))).to(device)
    learn.model, learn.splitter, learn.opt = model, lambda m: [list(m.parameters())], None
    made = list(learn.dls.train)
    batches = [made[i % len(made)] for i in range(steps)]
    _replay(learn, batches, device)

    def learner_side():
        timer = _timer(device)
        fit_one_cycle(learn, 1, 1e-3, cbs=[timer, *_training_callbacks()])
        return timer.seconds

    kw = dict(lr=1e-3, betas=BETAS, eps=EPS, fused=True)
    # the Learner's optimizer keeps weight decay off the bias, in a second torch parameter group (a
    # second fused kernel a step); the bare loop of the target does the same, so that the two sides
    # differ only by fastai's per-batch work; the one-group loop is what many scripts write
    same_groups = torch.optim.AdamW([{"params": [p], "weight_decay": WEIGHT_DECAY if decays(p) else 0.0}
                                     for p in model.parameters()], **kw)
    one_group = torch.optim.AdamW(model.parameters(), weight_decay=WEIGHT_DECAY, **kw)
    plain_batches = [(x.as_subclass(torch.Tensor), y.as_subclass(torch.Tensor).float()) for x, y in batches]
    bce = nn.BCEWithLogitsLoss()

    def bare_side(opt):
        def run():
            model.train()
            t0 = time.perf_counter()
            for x, y in plain_batches:
                loss = bce(model(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t0
        return run

    base, other = "bare loop, the Learner's parameter groups", "bare loop, one parameter group"
    times = C.interleaved({"Learner": learner_side, base: bare_side(same_groups), other: bare_side(one_group)},
                          args.rounds)
    ms = {name: [1000 * t / steps for t in ts] for name, ts in times.items()}
    rows = [{"side": name, "ms per step (median)": statistics.median(v), "fastest round": min(v),
             "range": f"{min(v):.2f}-{max(v):.2f}"} for name, v in ms.items()]
    factors = {}
    for name in (base, other):
        per_round = [lt / bt for lt, bt in zip(times["Learner"], times[name])]
        factors[name] = statistics.median(per_round)
        rows.append({"side": f"Learner / {name} (median of rounds)", "ms per step (median)": factors[name],
                     "fastest round": min(ms["Learner"]) / min(ms[name]),
                     "range": f"{min(per_round):.2f}-{max(per_round):.2f}"})
    factor = factors[base]
    C.record("Host time per training step: Learner vs bare loop around a one-layer model", rows,
             {"model": f"Flatten + Linear({4 * size * size}, {len(prep.vocab)})", "size": size, "bs": bs,
              "steps": steps, "rounds": args.rounds, "device": device.type, "threads": torch.get_num_threads()},
             [f"target: the Learner at most 1.5x the bare loop with the same parameter groups; measured "
              f"{factor:.2f}x (median of per-round ratios); {factors[other]:.2f}x against the one-group loop",
              "all sides: fused AdamW; the Learner with fastai's events, the one-cycle scheduler, the recorder and "
              "the run's callbacks (early stopping, best model, NaN check, signal check)"],
             record=not args.no_record)
    return factor


def main(argv=None) -> dict:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--size", type=int, default=128, help="image side fed to the model")
    p.add_argument("--bs", type=int, default=16)
    p.add_argument("--steps", type=int, default=2, help="optimizer steps per round and side")
    p.add_argument("--host-steps", type=int, default=200, help="steps per round of the one-layer host-time table")
    p.add_argument("--parts", nargs="+", choices=("throughput", "host"), default=["throughput", "host"])
    p.set_defaults(rounds=12)  # short rounds, many of them: a slow spell of a shared machine hits fewer steps
    args = C.parse(p, argv)

    from hpa_fastai.config import TrainConfig
    from hpa_fastai.training.run import prepare

    data = C.synth_set("hpa2018", n=max(3 * args.bs, 64), size=args.size)
    cfg = TrainConfig(data=str(data), arch=args.arch, size=args.size, bs=args.bs, epochs=1, lr="1e-3",
                      pretrained=False, channels="rgby", seed=0, workers=0)
    prep = prepare(cfg)
    out = {}
    if "throughput" in args.parts:
        out["ratio"] = throughput(args, prep)
    if "host" in args.parts:
        out["host_factor"] = host_time(args, prep)
    return out


if __name__ == "__main__":
    main()
