"""Class activation maps: what a Grad-CAM heatmap costs next to a plain prediction of the same
images (``Predictor.probabilities``), for one and three classes per image, with TTA, and with the
pictures ``run.py explain`` writes.

The model is untrained (its weights do not change the cost) and loaded the way ``explain`` loads a
run folder: model.json + model.safetensors. No target: the numbers say what ``explain``,
``predict --cam`` and a report's heatmaps cost.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import _common as C


def main(argv=None) -> dict:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet34")
    p.add_argument("--size", type=int, default=128, help="image side; the PNGs are made at this size")
    p.add_argument("--n", type=int, default=16, help="images to explain")
    p.add_argument("--bs", type=int, default=8)
    args = C.parse(p, argv)

    import torch

    from hpa_fastai.data.layouts import read_items
    from hpa_fastai.inference.cam import explain, heatmaps, write_explanations

    data = C.synth_set("hpa2018", n=args.n, size=args.size)
    items = read_items(data, channels="rgby").head(args.n)
    out = Path(tempfile.mkdtemp(prefix="bench-cam-out-"))
    try:
        pred = C.random_predictor(args.arch, args.size)
        one, three = [[7]] * len(items), [[0, 7, 25]] * len(items)
        sides = {
            "Predictor.probabilities": lambda: pred.probabilities(items, bs=args.bs),
            "heatmaps, 1 class per image": lambda: heatmaps(pred, items, one, bs=args.bs),
            "heatmaps, 3 classes per image": lambda: heatmaps(pred, items, three, bs=args.bs),
            "heatmaps, 1 class, TTA (8 orientations)": lambda: heatmaps(pred, items, one, "mean", bs=args.bs),
            "explain + its files, 1 class per image": lambda: write_explanations(
                pred, explain(pred, items, [7], bs=args.bs), out),
        }
        times = C.interleaved(sides, args.rounds)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    base = "Predictor.probabilities"
    rows = [{"side": name, "images/s": C.rate(len(items), times[name]), **C.ratio(times, name, base)}
            for name in sides]
    notes = ["ratio = Predictor.probabilities seconds / side seconds (< 1: slower than a plain prediction)",
             "a heatmap needs a forward pass with the graph kept and one backward pass per class; TTA does it for "
             "each of the 8 orientations",
             "explain + its files also predicts (to choose the classes) and writes a PNG per class and a "
             "probability chart per image"]
    C.record("Class activation maps: Grad-CAM heatmaps vs a plain prediction", rows,
             {"arch": args.arch, "size": args.size, "images": len(items), "bs": args.bs, "rounds": args.rounds,
              "device": "cpu" if not torch.cuda.is_available() else "cuda"}, notes, record=not args.no_record)
    return {name: row["images/s"] for name, row in zip(sides, rows)}


if __name__ == "__main__":
    main()
