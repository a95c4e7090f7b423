"""Out-of-sample macro F1 of the training variants for rare classes (oversampling, the asymmetric
loss) against today's defaults, on skewed and on balanced synthetic data.

The training tricks (``ema``, ``swa``, ``accumulate2``, ``mixup``, ``cutmix``) are measured each
alone on top of today's defaults (``defaults``; ``--baseline defaults`` compares them with it).

Each case is one synthetic training folder (``--n-train`` labelled images; training holds out 20%
of them for validation, as a run does) and one separate labelled folder of ``--n-test`` images
drawn from the same label distribution. Every variant trains on the same folder with the same
seeds (resnet18 from scratch, ``--epochs`` epochs, ``--lr auto``, everything else at its default)
and is scored on the separate folder with the thresholds it tuned on its validation images, as
``predict`` would use them. Cases:

- skewed: 10 classes whose shares fall geometrically from 0.45 to 0.006 (the issue's set: the
  three rarest classes get 6 to 13 training images);
- balanced: 10 classes of equal share (0.12 each);
- hpa2018: ``run.py synth --format hpa2018``'s labels, drawn with the real HPA 2018 frequencies
  (28 classes, several with no image at all at this size: macro F1 counts them as 0).

Each run's result is appended to ``data/synthetic/bench/quality.jsonl`` as soon as it is known, so
an interrupted benchmark keeps what it measured; ``--report`` only rewrites the tables from it.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np

import _common as C

DEFAULTS = {"loss": "bce", "oversample": True, "oversample_cap": 3.0, "ema": False, "swa": False, "accumulate": 1,
            "mixup": False, "cutmix": False}
VARIANTS = {  # every choice spelled out, so that a variant keeps its meaning when the defaults change
    "defaults": DEFAULTS,  # today's
    # the training tricks, each alone on top of the defaults
    "ema": {**DEFAULTS, "ema": True},
    "swa": {**DEFAULTS, "swa": True},
    "accumulate2": {**DEFAULTS, "accumulate": 2},
    "mixup": {**DEFAULTS, "mixup": True},
    "cutmix": {**DEFAULTS, "cutmix": True},
    "bce": {"loss": "bce", "oversample": False},  # the defaults before the rare-class options
    "bce+oversample": {"loss": "bce", "oversample": True, "oversample_cap": 10.0},
    "bce+oversample-cap3": {"loss": "bce", "oversample": True, "oversample_cap": 3.0},
    "asl+oversample-cap3": {"loss": "asl", "oversample": True, "oversample_cap": 3.0},
    "asl": {"loss": "asl", "oversample": False},
    "asl+oversample": {"loss": "asl", "oversample": True, "oversample_cap": 10.0},
    "focal": {"loss": "focal", "oversample": False},
}
SKEWED = np.geomspace(0.45, 0.006, 10)
BALANCED = np.full(10, 0.12)
LOG = C.DATA_ROOT / "quality.jsonl"


def draw_labels(shares: np.ndarray, n: int, rng: np.random.Generator) -> list[list[int]]:
    """Each class present with probability ``share``, independently; an image that got none gets
    one class drawn in proportion to the shares."""
    present = rng.random((n, len(shares))) < shares[None, :]
    labels = []
    for row in present:
        chosen = list(np.flatnonzero(row))
        labels.append(chosen or [int(rng.choice(len(shares), p=shares / shares.sum()))])
    return labels


def labelled_folder(out: Path, shares: np.ndarray, n: int, size: int, seed: int) -> Path:
    """A Zero-to-GANs folder (train.csv + train/) with the synthetic generator's images for labels
    drawn with ``shares``; made once and reused."""
    import pandas as pd
    from PIL import Image

    from hpa_fastai.atomic import save_png, write_csv
    from hpa_fastai.synth.dataset import draw_field

    if (out / "train.csv").is_file():
        return out
    print(f"making {out} (once)...", flush=True)
    rng = np.random.default_rng([seed, 7])
    labels = draw_labels(shares, n, rng)
    (out / "train").mkdir(parents=True, exist_ok=True)
    for i, lab in enumerate(labels):
        arr = draw_field(lab, "z2g", size, np.random.default_rng([seed, 8, i]))
        save_png(out / "train" / f"{i}.png", Image.fromarray(np.ascontiguousarray(arr[..., :3])))
    write_csv(out / "train.csv", pd.DataFrame({"Image": range(n), "Label": [" ".join(map(str, x)) for x in labels]}))
    return out


def case_folders(case: str, n_train: int, n_test: int, size: int) -> tuple[Path, Path]:
    if case == "hpa2018":
        from hpa_fastai.synth import make_dataset

        folders = []
        for name, n, seed in (("train", n_train, 100), ("test", n_test, 101)):
            out = C.DATA_ROOT / f"quality-hpa2018-{name}-{n}-{size}px"
            if not (out / "train.csv").is_file():
                print(f"making {out} (once)...", flush=True)
                make_dataset(out, "hpa2018", n_train=n, n_test=0, size=size, seed=seed)
            folders.append(out)
        return folders[0], folders[1]
    shares = {"skewed": SKEWED, "balanced": BALANCED}[case]
    return (labelled_folder(C.DATA_ROOT / f"quality-{case}-train-{n_train}-{size}px", shares, n_train, size, 100),
            labelled_folder(C.DATA_ROOT / f"quality-{case}-test-{n_test}-{size}px", shares, n_test, size, 101))


def run_variant(case, variant, seed, train_dir, test_dir, args) -> dict:
    from hpa_fastai import load_predictor
    from hpa_fastai import metrics as M
    from hpa_fastai.config import TrainConfig
    from hpa_fastai.data.layouts import detect_format, labels_matrix, read_items
    from hpa_fastai.training import train

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(data=str(train_dir), out=tmp, arch=args.arch, pretrained=False, epochs=args.epochs,
                          size=args.size, seed=seed, **VARIANTS[variant])
        t0 = time.time()
        run_dir = train(cfg).run_dir  # quiet: the library logs through logging, which nothing here shows
        seconds = time.time() - t0
        valid = json.loads((run_dir / "metrics.json").read_text())
        pred = load_predictor(run_dir)
        items = read_items(test_dir, detect_format(test_dir), split="train", channels=pred.channels)
        probs = pred.probabilities(items)
        train_items = read_items(train_dir, detect_format(train_dir), split="train", channels=pred.channels)
    n_classes = len(pred.names)
    targets = labels_matrix(items["labels"], n_classes).astype(bool)
    train_counts = labels_matrix(train_items["labels"], n_classes).sum(0)
    tuned = M.f1_scores(probs, targets, pred.thresholds)
    at_half = M.f1_scores(probs, targets, np.full(n_classes, 0.5))
    per_class = M.per_class_report(probs, targets, pred.thresholds, pred.names)["f1"].to_numpy()
    rarest = [int(c) for c in np.argsort(train_counts, kind="stable") if train_counts[c] > 0][:3]
    return {"case": case, "variant": variant, "seed": seed, "epochs": args.epochs, "size": args.size,
            "arch": args.arch, "n_train": args.n_train, "n_test": args.n_test,
            "test_f1_macro_tuned": tuned["macro"], "test_f1_macro_05": at_half["macro"],
            "test_f1_samples_tuned": tuned["samples"],
            "valid_f1_macro_tuned": valid["f1_macro_tuned"], "valid_f1_macro_tuned_oos": valid.get("f1_macro_tuned_oos"),
            "rarest": rarest, "rarest_train_images": [int(train_counts[c]) for c in rarest],
            "rarest_test_f1": [float(per_class[c]) for c in rarest], "best_epoch": valid["best_epoch"],
            "seconds": round(seconds, 1), "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": C.machine()}


def tables(results: list[dict], record: bool, baseline: str = "bce") -> None:
    import pandas as pd

    df = pd.DataFrame(results)
    for case, part in df.groupby("case", sort=False):
        rows = []
        base = part[part["variant"] == baseline].set_index("seed")["test_f1_macro_tuned"]
        for variant, runs in part.groupby("variant", sort=False):
            gain = runs.set_index("seed")["test_f1_macro_tuned"] - base
            rarest = np.array(runs["rarest_test_f1"].tolist())
            rows.append({
                "variant": variant, "seeds": " ".join(map(str, runs["seed"])),
                "test macro F1 (tuned)": runs["test_f1_macro_tuned"].mean(),
                "per seed": " ".join(f"{v:.3f}" for v in runs["test_f1_macro_tuned"]),
                f"vs {baseline}, same seed": " ".join(f"{v:+.3f}" for v in gain.dropna()) or "-",
                "test macro F1 (0.5)": runs["test_f1_macro_05"].mean(),
                "3 rarest classes, test F1": " / ".join(f"{v:.2f}" for v in rarest.mean(0)),
                "valid tuned (in-sample)": runs["valid_f1_macro_tuned"].mean(),
                "valid tuned (split-half)": runs["valid_f1_macro_tuned_oos"].astype(float).mean(),
                "minutes": runs["seconds"].mean() / 60})
        first = part.iloc[0]
        C.record(f"Quality: out-of-sample macro F1, {case} data", rows,
                 {"arch": first["arch"], "pretrained": False, "epochs": first["epochs"], "size": first["size"],
                  "labelled images": f"{first['n_train']} (80% train, 20% valid)", "separate test images": first["n_test"],
                  "rarest classes": f"{first['rarest']} with {first['rarest_train_images']} images in the folder"},
                 notes=["test macro F1 (tuned): on the separate labelled set, with the per-class thresholds tuned on "
                        "the run's validation images (what predict uses); (0.5): at threshold 0.5",
                        "valid tuned (in-sample): metrics.json's f1_macro_tuned, thresholds tuned and scored on the "
                        "same validation images; (split-half): f1_macro_tuned_oos",
                        "3 rarest classes: mean test F1 of the classes with the fewest training images, rarest first"],
                 record=record)


def main(argv=None) -> None:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--cases", default="skewed,balanced", help="comma-separated: skewed, balanced, hpa2018")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds")
    p.add_argument("--n-train", type=int, default=1000, help="labelled images (training holds out 20%%)")
    p.add_argument("--n-test", type=int, default=2000, help="images of the separate labelled set")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--baseline", default="bce", help="the variant the others are compared with, seed by seed")
    p.add_argument("--report", action="store_true", help="only write the tables from quality.jsonl")
    args = C.parse(p, argv)
    if not args.report:
        for case in args.cases.split(","):
            train_dir, test_dir = case_folders(case, args.n_train, args.n_test, args.size)
            for seed in map(int, args.seeds.split(",")):
                for variant in args.variants.split(","):
                    result = run_variant(case, variant, seed, train_dir, test_dir, args)
                    print(json.dumps({k: v for k, v in result.items() if k != "machine"}), flush=True)
                    with open(LOG, "a") as f:
                        f.write(json.dumps(result) + "\n")
    results = [json.loads(line) for line in LOG.read_text().splitlines()] if LOG.is_file() else []
    keep = {(c, v) for c in args.cases.split(",") for v in args.variants.split(",")}
    results = [r for r in results if (r["case"], r["variant"]) in keep and r["epochs"] == args.epochs
               and r["size"] == args.size and r["n_train"] == args.n_train and r["n_test"] == args.n_test]
    if results:
        tables(results, not args.no_record, args.baseline)


if __name__ == "__main__":
    main()
