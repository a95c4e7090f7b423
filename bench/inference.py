"""Inference: ``Predictor.probabilities`` (fastai's ``get_preds`` over the predictor's DataLoader)
against a plain ``torch.no_grad()`` loop over the same DataLoader and model, and against forward
passes alone on batches already in memory.

The model is untrained (its weights do not change the cost) and loaded the way ``predict`` loads a
run folder: model.json + model.safetensors.
"""
from __future__ import annotations


import _common as C


def main(argv=None) -> dict:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--size", type=int, default=128, help="image side; the PNGs are made at this size")
    p.add_argument("--n", type=int, default=64, help="images to predict")
    p.add_argument("--bs", type=int, default=32)
    args = C.parse(p, argv)

    import numpy as np
    import torch

    from hpa_fastai.data.layouts import read_items

    data = C.synth_set("hpa2018", n=args.n, size=args.size)
    items = read_items(data, channels="rgby")
    pred = C.random_predictor(args.arch, args.size)
    net = pred.learn.model.eval()

    def plain_loop():
        dl = pred.dataloader(items, bs=args.bs)
        with torch.no_grad():
            return torch.cat([torch.sigmoid(net(xb.as_subclass(torch.Tensor))) for (xb,) in dl]).numpy()

    batches = [xb.as_subclass(torch.Tensor) for (xb,) in pred.dataloader(items, bs=args.bs)]

    def forward_only():
        with torch.no_grad():
            for xb in batches:
                net(xb)

    same = np.allclose(pred.probabilities(items, bs=args.bs), plain_loop(), atol=1e-6)
    sides = {"Predictor.probabilities": lambda: pred.probabilities(items, bs=args.bs),
             "plain no_grad loop, same DataLoader": plain_loop,
             "forward only, batches in memory": forward_only}
    times = C.interleaved(sides, args.rounds)
    base = "plain no_grad loop, same DataLoader"
    rows = [{"side": name, "images/s": C.rate(len(items), times[name]), **C.ratio(times, name, base),
             "target": "≥ 0.9" if name == "Predictor.probabilities" else ""} for name in sides]
    main_ratio = rows[0]["ratio (median)"]
    notes = [f"ratio = plain-loop seconds / side seconds (> 1: faster); target Predictor ≥ 0.9: "
             f"{'met' if main_ratio >= 0.9 else 'NOT met'} ({main_ratio:.3f})",
             f"Predictor and plain loop give the same probabilities: {'yes' if same else 'NO'}",
             "the forward-only row shows how much of an inference pass is reading images"]
    C.record("Inference: Predictor.probabilities vs plain no_grad forward", rows,
             {"arch": args.arch, "size": args.size, "images": len(items), "bs": args.bs, "rounds": args.rounds,
              "device": next(net.parameters()).device.type, "loader": "model.json + safetensors (predict's default)"},
             notes, record=not args.no_record)
    return {"ratio": main_ratio}


if __name__ == "__main__":
    main()
