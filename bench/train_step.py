"""Training step overhead: the project's Learner (as ``run_learner`` makes it, callbacks and all)
against a plain PyTorch loop, both on the same in-memory batches, model, AdamW settings and fp32.

Data loading is taken out of both sides: the Learner gets the batches its own DataLoader made,
replayed from a list; the plain loop gets the same tensors as plain ``torch.Tensor``.
"""
from __future__ import annotations

import time

import _common as C


def main(argv=None) -> dict:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--size", type=int, default=128, help="image side fed to the model")
    p.add_argument("--bs", type=int, default=16)
    p.add_argument("--steps", type=int, default=2, help="optimizer steps per round and side")
    p.set_defaults(rounds=12)  # short rounds, many of them: a slow spell of a shared machine hits fewer steps
    args = C.parse(p, argv)

    import torch
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from fastai.callback.core import Callback
    from fastai.learner import CastToTensor

    from hpa_fastai.training.callbacks import NaNGuard
    from hpa_fastai.config import TrainConfig
    from hpa_fastai.training.learner import run_learner
    from hpa_fastai.training.run import prepare

    data = C.synth_set("hpa2018", n=max(3 * args.bs, 64), size=args.size)
    cfg = TrainConfig(data=str(data), arch=args.arch, size=args.size, bs=args.bs, epochs=1, lr="1e-3",
                      pretrained=False, channels="rgby", seed=0, workers=0)
    prep = prepare(cfg)
    learn, setup = run_learner(prep)
    cast_in_cbs = any(isinstance(cb, CastToTensor) for cb in learn.cbs)
    made = list(learn.dls.train)
    batches = [made[i % len(made)] for i in range(args.steps)]
    valid = [learn.dls.valid.one_batch()]
    device = next(learn.model.parameters()).device
    learn.dls = DataLoaders(DataLoader(batches, bs=None, device=device), DataLoader(valid, bs=None, device=device))

    seen_types = set()
    hook = learn.model.register_forward_pre_hook(lambda m, args: seen_types.add(type(args[0]).__name__))

    class TrainTimer(Callback):
        """Seconds of the training part of an epoch: validation and epoch-end work are left out."""
        order = -100

        def before_train(self):
            self.t0 = time.perf_counter()

        def after_train(self):
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.seconds = time.perf_counter() - self.t0

    def fastai_side(learner):
        def run():
            timer = TrainTimer()
            learner.fit_one_cycle(1, 1e-3, cbs=[timer, NaNGuard()])  # NaNGuard: training's one per-batch callback
            return timer.seconds
        return run

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

    learn.fit_one_cycle(1, 1e-3)  # creates the Learner's optimizer, which the decomposition side reuses
    hook_seen = set()
    seen_types.clear()
    fastai_run = fastai_side(learn)
    fastai_run()
    hook_seen |= seen_types
    hook.remove()

    no_cast = run_learner(prep)[0]
    no_cast.model = model
    no_cast.dls = learn.dls
    no_cast.remove_cbs(no_cast.cbs.filter(lambda c: isinstance(c, CastToTensor)))

    sides = {
        "Learner (run_learner)": fastai_run,
        "plain loop, torch AdamW": plain_side(torch_adam.step, lambda: torch_adam.zero_grad()),
        "plain loop, the Learner's optimizer": plain_side(lambda: learn.opt.step(), lambda: learn.opt.zero_grad()),
        "Learner without CastToTensor": fastai_side(no_cast),
    }
    times = C.interleaved(sides, args.rounds)
    n = args.steps * args.bs
    base = "plain loop, torch AdamW"
    rows = [{"side": name, "images/s": C.rate(n, times[name]), **C.ratio(times, name, base),
             "target": "≥ 0.97" if name == "Learner (run_learner)" else ""} for name in sides]
    main_ratio = rows[0]["ratio (median)"]
    notes = [f"CastToTensor in the Learner's callbacks: {'yes' if cast_in_cbs else 'NO'}; "
             f"batch type reaching the model: {', '.join(sorted(hook_seen))}",
             f"ratio = plain-loop seconds / side seconds over the same {args.steps} batches "
             f"(> 1: faster than the plain loop); target Learner ≥ 0.97: "
             f"{'met' if main_ratio >= 0.97 else 'NOT met'} ({main_ratio:.3f})"]
    C.record("Training step overhead: Learner vs plain PyTorch", rows,
             {"arch": args.arch, "size": args.size, "bs": args.bs, "steps": args.steps, "rounds": args.rounds,
              "channels": "rgby", "device": device.type, "precision": setup.precision},
             notes, record=not args.no_record)
    return {"ratio": main_ratio}


if __name__ == "__main__":
    main()
