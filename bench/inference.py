"""Inference: ``Predictor.probabilities`` (fastai's ``get_preds`` over the predictor's DataLoader)
against a plain ``torch.no_grad()`` loop over the same DataLoader and model, and against forward
passes alone on batches already in memory.

The model is untrained (its weights do not change the cost) and loaded the way ``predict`` loads a
run folder: model.json + model.safetensors.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

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
    from safetensors.torch import save_file

    from hpa_fastai.atomic import write_json
    from hpa_fastai.data.layouts import read_items
    from hpa_fastai.models import create_model
    from hpa_fastai.inference.loading import load_predictor
    from hpa_fastai.data.vocab import class_names, vocab_for

    data = C.synth_set("hpa2018", n=args.n, size=args.size)
    items = read_items(data, channels="rgby")
    run_dir = Path(tempfile.mkdtemp(prefix="bench-inference-"))
    try:
        torch.manual_seed(0)
        model, _ = create_model(args.arch, 4, 28, pretrained=False)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run_dir / "model.safetensors"))
        write_json(run_dir / "model.json", {
            "arch": args.arch, "format": "hpa2018", "channels": "rgby", "n_in": 4, "size": args.size,
            "mean": [0.1] * 4, "std": [0.15] * 4, "vocab": vocab_for("hpa2018"), "names": class_names("hpa2018"),
            "thresholds": [0.5] * 28, "loss": "bce", "focal_gamma": 2.0})
        pred = load_predictor(run_dir)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
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
