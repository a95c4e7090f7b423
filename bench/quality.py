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

``--study defaults`` measures the defaults that decide which epoch is exported and how fast it
learns: the ``--monitor`` that picks the best epoch (F1 at 0.5, the validation loss, F1 at thresholds
tuned on each epoch's validation predictions, in-sample or split-half) and the ``--lr`` rule
(``valley``, ``auto``, a fixed 1e-3), on sets of the bundled sample's size and larger, with other
class shares, signal strength and image size (``DEFAULTS_CASES``). Each (case, seed, lr rule)
trains once, keeping every epoch's validation and test-set predictions, so every monitor's choice
of epoch, with early stopping as training applies it, is scored on the same run. Its results go
to ``data/synthetic/bench/defaults.jsonl``.
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


def labelled_folder(out: Path, shares: np.ndarray, n: int, size: int, seed: int, signal: float = 1.0) -> Path:
    """A Zero-to-GANs folder (train.csv + train/) with the synthetic generator's images for labels
    drawn with ``shares``; made once and reused. ``signal`` below 1 replaces that share of each
    pixel with uniform noise (a weaker, noisier signal)."""
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
        if signal < 1:
            noise = np.random.default_rng([seed, 9, i]).uniform(0, 255, arr.shape)
            arr = np.clip(signal * arr + (1 - signal) * noise, 0, 255).astype(np.uint8)
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
    p.add_argument("--report", action="store_true", help="only write the tables from the results kept so far")
    p.add_argument("--study", default="rare-classes", choices=["rare-classes", "defaults"],
                   help="rare-classes: the oversampling and loss variants; defaults: --monitor and --lr rules")
    p.add_argument("--lr-rules", default=",".join(LR_RULES), help="--study defaults: comma-separated --lr values")
    args = C.parse(p, argv)
    if args.study == "defaults":
        return defaults_study(args)
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


# --- --study defaults -----------------------------------------------------------------------------

DEFAULTS_LOG = C.DATA_ROOT / "defaults.jsonl"
LR_RULES = ("valley", "auto", "1e-3")
STEEP = np.geomspace(0.6, 0.01, 10)
# name -> class shares, labelled images (80% train), image side, signal, epochs, separate test images
DEFAULTS_CASES = {
    "sample-skewed": (SKEWED, 160, 32, 1.0, 10, 500),        # the bundled sample's size: lr_find gets 20 batches
    "sample-balanced-weak": (BALANCED, 160, 32, 0.6, 10, 500),
    "steep-600": (STEEP, 600, 32, 1.0, 8, 500),
    "balanced-400-48px": (BALANCED, 400, 48, 1.0, 8, 400),
}
MONITORS = ("f1_macro", "valid_loss", "f1_macro_tuned", "f1_macro_tuned_oos")
PATIENCE, WARMUP_PCT = 5, 0.25  # TrainConfig's --patience and WarmupEarlyStopping's warm-up


def epoch_predictions_callback():
    """A fastai callback keeping each trained epoch's validation probabilities and targets and its
    weights (on the CPU), so that the epochs the monitors pick can be scored on the test set after
    one run (``test_probabilities``)."""
    import torch
    from fastai.callback.core import Callback

    class EpochPredictions(Callback):
        order = 90

        def __init__(self):
            self.epochs, self.trained = [], None

        def before_fit(self):
            self.trained = self.learn  # fastai forgets the learner when the fit removes the callback

        def before_validate(self):
            self._on, self._p, self._t = self.learn.dl is self.dls.valid, [], []

        def after_batch(self):
            if not self.training and getattr(self, "_on", False):
                self._p.append(torch.sigmoid(self.pred.float()).detach().cpu())
                self._t.append(self.y.detach().cpu())

        def after_epoch(self):
            if not getattr(self, "_on", False) or not self._p:
                return
            self._on = False
            state = {k: v.detach().to("cpu", copy=True) for k, v in self.learn.model.state_dict().items()}
            self.epochs.append({"valid_probs": torch.cat(self._p).numpy(), "valid_targets": torch.cat(self._t).numpy(),
                                "state": state})

        def test_probabilities(self, i: int, test_items):
            """Probabilities of the model as it was after epoch ``i + 1`` on ``test_items``, in eval mode."""
            model = self.trained.model
            model.load_state_dict(self.epochs[i]["state"])
            model.eval()
            dl = self.trained.dls.test_dl(test_items[["key"]].reset_index(drop=True), rm_type_tfms=0, bs=64)
            with torch.no_grad():
                return torch.cat([torch.sigmoid(model(xb.as_subclass(torch.Tensor)).float()).cpu()
                                  for (xb,) in dl]).numpy()

    return EpochPredictions()


def monitor_values(monitor: str, epoch: dict, valid_loss: float) -> float:
    from hpa_fastai import metrics as M

    probs, targets = epoch["valid_probs"], epoch["valid_targets"].astype(bool)
    if monitor == "valid_loss":
        return valid_loss
    if monitor == "f1_macro":
        return M.f1_scores(probs, targets, np.full(probs.shape[1], 0.5))["macro"]
    if monitor == "f1_macro_tuned":
        return M.f1_scores(probs, targets, M.tune_thresholds(probs, targets))["macro"]
    return (M.out_of_sample_f1(probs, targets) or {"macro": 0.0})["macro"]


def exported_epoch(values: list[float], higher: bool, n_epochs: int) -> tuple[int, int]:
    """(index of the epoch training exports, epochs run) for a monitor's per-epoch values: the
    epochs WarmupEarlyStopping lets run (patience after the warm-up, measured from the first epoch
    after it), and among them the one KeepBestModel keeps (``callbacks.best_epoch_index``)."""
    from hpa_fastai.training.callbacks import best_epoch_index, warmup_length

    warmup = warmup_length(n_epochs, WARMUP_PCT)
    run, best, wait = len(values), None, 0
    for i, v in enumerate(values):
        if i == warmup:  # the first epoch after the warm-up replaces the warm-up's best
            best = None
        better = best is None or (v > best if higher else v < best)
        best = v if better else best
        wait = 0 if i + 1 <= warmup or better else wait + 1
        if wait >= PATIENCE:
            run = i + 1
            break
    return best_epoch_index(values[:run], range(run), [warmup] * run, higher), run


def run_defaults(case: str, lr_rule: str, seed: int, train_dir: Path, test_dir: Path, args) -> dict:
    from hpa_fastai import metrics as M
    from hpa_fastai.config import TrainConfig
    from hpa_fastai.data.layouts import detect_format, labels_matrix, read_items
    from hpa_fastai.training import train

    shares, n, size, signal, epochs, n_test = DEFAULTS_CASES[case]
    test_items = read_items(test_dir, detect_format(test_dir), split="train", channels="rgb")
    keeper = epoch_predictions_callback()
    with tempfile.TemporaryDirectory() as tmp:
        # valid_loss with no early stopping: every epoch is trained and kept; each monitor's early
        # stopping and choice are replayed on the kept values below
        cfg = TrainConfig(data=str(train_dir), out=tmp, arch=args.arch, pretrained=False, epochs=epochs, size=size,
                          seed=seed, lr=lr_rule, monitor="valid_loss", patience=1000)
        t0 = time.time()
        result = train(cfg, cbs=[keeper])
        seconds = time.time() - t0
        lr_used = json.loads((result.run_dir / "config.json").read_text())["lr_used"]
    history = result.history
    # every epoch's validation predictions, to replay other monitors later without training again
    arrays = C.DATA_ROOT / "defaults-runs"
    arrays.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(arrays / f"{case}-{lr_rule}-{seed}.npz", valid_loss=history["valid_loss"].to_numpy(),
                        **{f"{k}_{i}": e[k] for i, e in enumerate(keeper.epochs) for k in ("valid_probs", "valid_targets")})
    test_probs = {}
    test_targets = labels_matrix(test_items["labels"], 10).astype(bool)
    out = {"case": case, "lr_rule": lr_rule, "seed": seed, "lr": lr_used, "epochs": epochs, "n": n, "size": size,
           "signal": signal, "arch": args.arch, "seconds": round(seconds, 1), "machine": C.machine(),
           "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "valid_losses": [float(v) for v in history["valid_loss"]]}
    for monitor in MONITORS:
        values = [monitor_values(monitor, e, float(loss)) for e, loss in zip(keeper.epochs, history["valid_loss"])]
        i, run = exported_epoch(values, monitor != "valid_loss", epochs)
        e = keeper.epochs[i]
        thresholds = M.tune_thresholds(e["valid_probs"], e["valid_targets"].astype(bool))
        if i not in test_probs:  # only the epochs some monitor picks go through the test set
            test_probs[i] = keeper.test_probabilities(i, test_items)
        out[monitor] = {"epoch": i + 1, "epochs_run": run,
                        "test_f1_macro_tuned": M.f1_scores(test_probs[i], test_targets, thresholds)["macro"],
                        "loss_above_first": bool(history["valid_loss"].iloc[i] > history["valid_loss"].iloc[0])}
    return out


def defaults_study(args) -> None:
    import pandas as pd

    cases = [c for c in args.cases.split(",") if c in DEFAULTS_CASES] if args.cases != "skewed,balanced" \
        else list(DEFAULTS_CASES)
    rules = args.lr_rules.split(",")
    if not args.report:
        for case in cases:
            shares, n, size, signal, epochs, n_test = DEFAULTS_CASES[case]
            tag = f"defaults-{case}"
            train_dir = labelled_folder(C.DATA_ROOT / f"{tag}-train", shares, n, size, 200, signal)
            test_dir = labelled_folder(C.DATA_ROOT / f"{tag}-test", shares, n_test, size, 201, signal)
            for seed in map(int, args.seeds.split(",")):
                for rule in rules:
                    result = run_defaults(case, rule, seed, train_dir, test_dir, args)
                    print(json.dumps({k: v for k, v in result.items() if k != "machine"}), flush=True)
                    with open(DEFAULTS_LOG, "a") as f:
                        f.write(json.dumps(result) + "\n")
    results = [json.loads(line) for line in DEFAULTS_LOG.read_text().splitlines()] if DEFAULTS_LOG.is_file() else []
    results = [r for r in results if r["case"] in cases and r["lr_rule"] in rules and r["arch"] == args.arch]
    if not results:
        return
    rows = []
    for (rule, monitor) in [(r, m) for r in rules for m in MONITORS]:
        row = {"--lr": rule, "--monitor": monitor}
        spreads, above, total, means = [], 0, 0, []
        for case in cases:
            runs = [r for r in results if r["case"] == case and r["lr_rule"] == rule]
            if not runs:
                row[case] = "-"
                continue
            f1 = np.array([r[monitor]["test_f1_macro_tuned"] for r in runs])
            row[case] = f"{f1.mean():.3f} ({' '.join(f'{v:.2f}' for v in f1)})"
            means.append(f1.mean())
            if len(f1) >= 3:
                spreads.append(float(f1.max() - f1.min()))
            above += sum(r[monitor]["loss_above_first"] for r in runs)
            total += len(runs)
        if not total:
            continue
        # a rule measured on some cases only (min/10 at 20 iterations) gets no mean over cases
        row["mean of cases"] = f"{np.mean(means):.3f}" if len(means) == len(cases) else "-"
        row["mean spread over seeds"] = f"{np.mean(spreads):.3f}" if spreads else "-"
        row["loss above epoch 1"] = f"{above} of {total}"
        rows.append(row)
    lrs = pd.DataFrame([{"case": r["case"], "--lr": r["lr_rule"], "lr": r["lr"]} for r in results])
    lr_note = "; ".join(f"{case} {rule}: " + " ".join(f"{v:.1e}" for v in part["lr"])
                        for (case, rule), part in lrs.groupby(["case", "--lr"], sort=False))
    first = results[0]
    C.record("Quality: the default --monitor and --lr", rows,
             {"arch": first["arch"], "pretrained": False, "seeds": " ".join(map(str, sorted({r["seed"] for r in results}))), "cases": "; ".join(
                 f"{c}: {n} images (80% train), {size} px, signal {sig}, {ep} epochs, shares "
                 f"{sh.max():.2f} to {sh.min():.3f}, {nt} test images"
                 for c, (sh, n, size, sig, ep, nt) in DEFAULTS_CASES.items() if c in cases)},
             notes=["each cell: mean test macro F1 over seeds (each seed's value), at the per-class thresholds tuned on "
                    "the exported epoch's validation predictions, on a separate labelled set of the same label "
                    "distribution",
                    "--monitor picks the exported epoch (with early stopping, patience 5 after the warm-up, as "
                    "training applies it); f1_macro: at threshold 0.5; f1_macro_tuned: at thresholds tuned on that "
                    "epoch's validation predictions (in-sample); f1_macro_tuned_oos: split-half",
                    "loss above epoch 1: runs whose exported epoch has a higher validation loss than the first epoch",
                    "spread: largest minus smallest test macro F1 over the seeds of a case (cases with 3 seeds), "
                    "averaged over cases",
                    f"learning rates used: {lr_note}"],
             record=not args.no_record)


if __name__ == "__main__":
    main()
