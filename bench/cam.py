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
    from safetensors.torch import save_file

    from hpa_fastai.atomic import write_json
    from hpa_fastai.data.layouts import read_items
    from hpa_fastai.data.vocab import class_names, vocab_for
    from hpa_fastai.inference.cam import explain, heatmaps, write_explanations
    from hpa_fastai.inference.loading import load_predictor
    from hpa_fastai.models import create_model

    data = C.synth_set("hpa2018", n=args.n, size=args.size)
    items = read_items(data, channels="rgby").head(args.n)
    run_dir = Path(tempfile.mkdtemp(prefix="bench-cam-"))
    out = Path(tempfile.mkdtemp(prefix="bench-cam-out-"))
    try:
        torch.manual_seed(0)
        model, _ = create_model(args.arch, 4, 28, pretrained=False)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run_dir / "model.safetensors"))
        write_json(run_dir / "model.json", {
            "arch": args.arch, "format": "hpa2018", "channels": "rgby", "n_in": 4, "size": args.size,
            "mean": [0.1] * 4, "std": [0.15] * 4, "vocab": vocab_for("hpa2018"), "names": class_names("hpa2018"),
            "thresholds": [0.5] * 28, "loss": "bce", "focal_gamma": 2.0})
        pred = load_predictor(run_dir)
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
        shutil.rmtree(run_dir, ignore_errors=True)
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
