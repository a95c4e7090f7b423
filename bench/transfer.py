"""Transfer learning against training from scratch: a model pretrained on a large HPA 2018 set, then
fine-tuned on a small Zero-to-GANs set (the other layout: RGB instead of RGBY, 10 classes instead of 28),
against the same small set trained from random initialisation, both scored out of sample.

- Pretraining: ``--arch`` from scratch on ``--pre-n`` synthetic HPA 2018 images (RGBY, 28 classes, the
  real competition's label frequencies) for ``--pre-epochs`` epochs, once; its run folder is kept under
  data/synthetic/bench/ and reused.
- Then, per seed, on ``--n-train`` synthetic Zero-to-GANs images (20% of them held out for validation, as
  a run does): *scratch*, the defaults from random initialisation for ``--epochs`` epochs; *fine-tune*,
  ``--weights <the pretraining run>`` with the default pretrained schedule (fastai's ``fine_tune``: one
  frozen epoch, then ``--epochs - 1`` unfrozen), so both train the same number of epochs. Both find
  their learning rate with lr_find (``--lr auto``).
- Every run is scored on ``--n-test`` separate synthetic Zero-to-GANs images with the per-class
  thresholds it tuned on its validation images, as ``predict`` uses them; after every epoch too (the
  thresholds tuned on that epoch's validation predictions), for the epochs each needs.

Targets: fine-tuning beats scratch by at least 0.10 out-of-sample macro F1 on every seed, and reaches
scratch's final score within half the epochs. Each run's result goes to
``data/synthetic/bench/transfer.jsonl`` as soon as it is known; ``--report`` only rewrites the table.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path


import _common as C

LOG = C.DATA_ROOT / "transfer.jsonl"


def folders(args) -> tuple[Path, Path, Path]:
    from hpa_fastai.synth import make_dataset

    made = []
    for name, fmt, n, seed in (("pretrain", "hpa2018", args.pre_n, 300), ("small", "z2g", args.n_train, 301),
                               ("test", "z2g", args.n_test, 302)):
        out = C.DATA_ROOT / f"transfer-{name}-{fmt}-{n}-{args.size}px"
        if not (out / "train.csv").is_file():
            print(f"making {out} (once)...", flush=True)
            make_dataset(out, fmt, n_train=n, n_test=0, size=args.size, seed=seed)
        made.append(out)
    return made[0], made[1], made[2]


def pretrained_run(pre_dir: Path, args) -> Path:
    """The pretraining run's folder: made once, reused while it is there and finished."""
    from hpa_fastai.config import TrainConfig
    from hpa_fastai.training import train

    out = C.DATA_ROOT / "transfer-runs"
    name = f"pretrain-{args.arch}-{args.pre_n}-{args.size}px-{args.pre_epochs}ep"
    finished = sorted(p for p in out.glob(f"{name}*") if (p / "model.json").is_file())
    if finished:
        return finished[0]
    print(f"pretraining {args.arch} on {pre_dir} for {args.pre_epochs} epochs (once)...", flush=True)
    t0 = time.time()
    result = train(TrainConfig(data=str(pre_dir), out=str(out), arch=args.arch, pretrained=False,
                               epochs=args.pre_epochs, size=args.size, seed=0), run_name=name, link_latest=False)
    print(f"  {(time.time() - t0) / 60:.1f} min, valid macro F1 (tuned, split-half) "
          f"{result.metrics['f1_macro_tuned_oos']:.3f}", flush=True)
    return result.run_dir


def epoch_curve(test_items, channels: str, size: int):
    """A fastai callback that, after every trained epoch, scores the model on ``test_items`` with
    per-class thresholds tuned on that epoch's validation predictions (``.scores``, one per epoch)."""
    import torch
    from fastai.callback.core import Callback
    from fastai.data.transforms import Normalize

    from hpa_fastai import metrics as M
    from hpa_fastai.data.layouts import labels_matrix
    from hpa_fastai.data.pipeline import predict_dl

    class EpochCurve(Callback):
        order = 100  # after every callback of the run, the best-weights tracker included

        def __init__(self):
            self.scores = []

        def before_train(self):
            self.trained = True

        def probabilities(self, items):
            norm = next(t for t in self.dls.valid.after_batch.fs if isinstance(t, Normalize))
            dl = predict_dl(items, channels, size, norm.mean.flatten().tolist(), norm.std.flatten().tolist(),
                            device=self.dls.device)
            model = self.learn.model
            was_training = model.training
            model.eval()
            with torch.no_grad():
                probs = torch.cat([torch.sigmoid(model(xb.as_subclass(torch.Tensor)).float()).cpu() for (xb,) in dl])
            model.train(was_training)
            return probs.numpy()

        def after_epoch(self):
            if not getattr(self, "trained", False):
                return
            self.trained = False
            n = len(self.dls.vocab)
            valid = self.dls.valid.items
            thresholds = M.tune_thresholds(self.probabilities(valid), labels_matrix(valid["labels"], n).astype(bool),
                                           default=0.5)
            targets = labels_matrix(test_items["labels"], n).astype(bool)
            self.scores.append(M.f1_scores(self.probabilities(test_items), targets, thresholds)["macro"])

    return EpochCurve()


def run_one(kind: str, seed: int, small_dir: Path, test_dir: Path, pre_run: Path, args) -> dict:
    from hpa_fastai import load_predictor
    from hpa_fastai import metrics as M
    from hpa_fastai.config import TrainConfig
    from hpa_fastai.data.layouts import detect_format, labels_matrix, read_items
    from hpa_fastai.training import train

    test_items = read_items(test_dir, detect_format(test_dir), split="train", channels="rgb")
    curve = epoch_curve(test_items, "rgb", args.size)
    with tempfile.TemporaryDirectory() as tmp:
        common = dict(data=str(small_dir), out=tmp, arch=args.arch, size=args.size, seed=seed)
        if kind == "scratch":
            cfg = TrainConfig(pretrained=False, epochs=args.epochs, **common)
        else:  # the default pretrained schedule: --freeze-epochs 1, then the rest unfrozen
            cfg = TrainConfig(weights=str(pre_run), epochs=args.epochs - 1, **common)
        t0 = time.time()
        result = train(cfg, cbs=[curve], link_latest=False)
        seconds = time.time() - t0
        pred = load_predictor(result.run_dir)
        probs = pred.probabilities(test_items)
        lr_used = json.loads((result.run_dir / "config.json").read_text())["lr_used"]
    targets = labels_matrix(test_items["labels"], len(pred.names)).astype(bool)
    return {"kind": kind, "seed": seed, "arch": args.arch, "size": args.size, "epochs": args.epochs,
            "pre_n": args.pre_n, "pre_epochs": args.pre_epochs, "n_train": args.n_train, "n_test": args.n_test,
            "test_f1_macro_tuned": M.f1_scores(probs, targets, pred.thresholds)["macro"],
            "valid_f1_macro_tuned_oos": result.metrics["f1_macro_tuned_oos"],
            "best_epoch": result.metrics["best_epoch"], "lr_used": lr_used,
            "curve": [round(float(s), 4) for s in curve.scores], "seconds": round(seconds, 1),
            "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": C.machine()}


def epochs_to_reach(curve: list, score: float) -> int | None:
    return next((i + 1 for i, s in enumerate(curve) if s >= score), None)


def tables(results: list[dict], args, record: bool) -> None:
    import pandas as pd

    df = pd.DataFrame(results)
    rows, half = [], args.epochs / 2
    for seed, part in df.groupby("seed"):
        runs = {r["kind"]: r for r in part.to_dict("records")}
        if not {"scratch", "fine-tune"} <= set(runs):
            continue
        scratch, tuned = runs["scratch"], runs["fine-tune"]
        gain = tuned["test_f1_macro_tuned"] - scratch["test_f1_macro_tuned"]
        reach = epochs_to_reach(tuned["curve"], scratch["test_f1_macro_tuned"])
        rows.append({"seed": seed, "scratch": scratch["test_f1_macro_tuned"], "fine-tune": tuned["test_f1_macro_tuned"],
                     "gain": gain, "gain >= 0.10": "yes" if gain >= 0.10 else "no",
                     "fine-tune epochs to scratch's final": reach if reach is not None else "never",
                     f"<= {half:g}": "yes" if reach is not None and reach <= half else "no",
                     "scratch per epoch": " ".join(f"{s:.2f}" for s in scratch["curve"]),
                     "fine-tune per epoch": " ".join(f"{s:.2f}" for s in tuned["curve"]),
                     "minutes (scratch / fine-tune)": f"{scratch['seconds'] / 60:.1f} / {tuned['seconds'] / 60:.1f}"})
    if not rows:
        return
    first = df.iloc[0]
    C.record("Transfer: fine-tuning an earlier run against training from scratch", rows,
             {"arch": first["arch"], "size": first["size"], "pretraining": f"{first['pre_n']} synthetic HPA 2018 images "
              f"(RGBY, 28 classes), {first['pre_epochs']} epochs from random init",
              "small set": f"{first['n_train']} synthetic Zero-to-GANs images (RGB, 10 classes; 80% train, 20% valid)",
              "epochs": f"{first['epochs']} (fine-tune: 1 frozen + {first['epochs'] - 1} unfrozen)",
              "separate test images": first["n_test"]},
             notes=["scores: out-of-sample macro F1 on the separate test images with the thresholds each run tuned on "
                    "its validation images (what predict uses); per epoch: the model after that epoch, with thresholds "
                    "tuned on that epoch's validation predictions",
                    "targets: gain >= 0.10 on every seed; fine-tuning reaches scratch's final score within half the "
                    "epochs"], record=record)


def main(argv=None) -> None:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--size", type=int, default=48)
    p.add_argument("--pre-n", type=int, default=3000, help="synthetic HPA 2018 images to pretrain on")
    p.add_argument("--pre-epochs", type=int, default=6)
    p.add_argument("--n-train", type=int, default=300, help="synthetic Zero-to-GANs images to fine-tune on")
    p.add_argument("--n-test", type=int, default=1000, help="separate synthetic Zero-to-GANs images to score on")
    p.add_argument("--epochs", type=int, default=10, help="epochs of each run on the small set")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--report", action="store_true", help="only write the table from transfer.jsonl")
    args = C.parse(p, argv)
    if not args.report:
        pre_dir, small_dir, test_dir = folders(args)
        pre_run = pretrained_run(pre_dir, args)
        for seed in map(int, args.seeds.split(",")):
            for kind in ("scratch", "fine-tune"):
                result = run_one(kind, seed, small_dir, test_dir, pre_run, args)
                print(json.dumps({k: v for k, v in result.items() if k != "machine"}), flush=True)
                with open(LOG, "a") as f:
                    f.write(json.dumps(result) + "\n")
    results = [json.loads(line) for line in LOG.read_text().splitlines()] if LOG.is_file() else []
    same = ("arch", "size", "epochs", "pre_n", "pre_epochs", "n_train", "n_test")
    results = [r for r in results if all(r[k] == getattr(args, k) for k in same)]
    tables(results, args, not args.no_record)


if __name__ == "__main__":
    main()
