"""Preprocessed cache: an epoch of the project's DataLoader reading the ``run.py preprocess`` cache
against the same DataLoader decoding the 512px PNGs every time; also the one-off cost of making the
cache, and a check that both give identical tensors.

The cache is made in a temporary copy of the synthetic set, so every run measures it from scratch
and the other benchmarks keep reading PNGs.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import _common as C


def main(argv=None) -> dict:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=64, help="images in the synthetic set (a tenth is held out)")
    p.add_argument("--size", type=int, default=256, help="cached and training image side (the PNGs are 512px)")
    p.add_argument("--bs", type=int, default=16)
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (training's CPU default)")
    p.add_argument("--preprocess-workers", type=int, default=None, help="default: preprocess's own (all cores)")
    p.set_defaults(rounds=4)
    args = C.parse(p, argv)

    import torch

    from hpa_fastai.config import TrainConfig
    from hpa_fastai.data.pipeline import ReadImage
    from hpa_fastai.data.cache import preprocess
    from hpa_fastai.training.learner import run_learner
    from hpa_fastai.training.run import prepare

    scratch = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    try:
        data = scratch / "data"
        shutil.copytree(C.synth_set("hpa2018", n=args.n, size=512), data)
        cfg = TrainConfig(data=str(data), arch="resnet18", size=args.size, bs=args.bs, epochs=1, lr="1e-3",
                          pretrained=False, channels="rgby", seed=0, workers=args.workers, valid_pct=0.1,
                          out=str(scratch / "runs"))
        png = prepare(cfg)
        t0 = time.perf_counter()
        preprocess(data, args.size, "rgby", args.preprocess_workers)
        preprocess_s = time.perf_counter() - t0
        cached = prepare(cfg)
        switched = sum(key.endswith(".npy") for key in cached.items["key"])
        read = ReadImage("rgby", args.size)
        identical = sum(torch.equal(read(a), read(b)) for a, b in zip(png.items["key"], cached.items["key"]))

        def loaders(prep):
            learn = run_learner(prep)[0]
            train = learn.dls.train
            items = train.items.iloc[:len(train) * args.bs]  # the images an epoch of the train loader uses
            return train, learn.dls.test_dl(items, with_labels=True, bs=args.bs, num_workers=args.workers)

        png_train, png_plain = loaders(png)
        cache_train, cache_plain = loaders(cached)
        same_batches = all(torch.equal(a, b) for a, b in zip(png_plain.one_batch(), cache_plain.one_batch()))
        n_images = len(png_train) * args.bs

        def epoch(loader):
            return lambda: sum(1 for _ in loader)

        def items_only(prep):
            keys = list(prep.items["key"].iloc[:n_images])
            return lambda: [read(key) for key in keys]

        sides = {"PNGs, item transform only": items_only(png), "cache, item transform only": items_only(cached),
                 "PNGs, no augmentation": epoch(png_plain), "cache, no augmentation": epoch(cache_plain),
                 "PNGs, train loader (augmented)": epoch(png_train), "cache, train loader (augmented)": epoch(cache_train)}
        times = C.interleaved(sides, args.rounds)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rows = []
    for name in sides:
        baseline = "PNGs" + name[name.index(","):]
        r = C.ratio(times, name, baseline)
        rows.append({"side": name, "images/s": C.rate(n_images, times[name]), **r,
                     "target": "≥ 5" if name == "cache, no augmentation" else ""})
    loading = rows[3]["ratio (median)"]
    notes = [f"an epoch of the DataLoader with the cache: {loading:.1f}x the PNG one (target ≥ 5: "
             f"{'met' if loading >= 5 else 'NOT met'}); ratio = PNG seconds / cache seconds, each row against "
             "its PNG counterpart",
             "item transform only: ReadImage alone (decode + resize, or np.load); no augmentation: fastai's "
             "test_dl (collate, IntToFloatTensor, Normalize, and the identity warp fastai's affine transform "
             "still applies to unaugmented batches); train loader: all of that plus augmentation, which the "
             "cache does not change",
             f"preprocess: {args.n} images in {preprocess_s:.1f}s ({args.n / preprocess_s:.1f} images/s, "
             f"workers {args.preprocess_workers or 'all cores'}), a one-off cost",
             f"prepare() switched {switched}/{len(cached.items)} item keys to the cache; tensors identical to "
             f"decoding the PNGs for {identical}/{len(png.items)} images; first unaugmented batch identical: "
             f"{'yes' if same_batches else 'NO'}"]
    C.record("Preprocessed cache: DataLoader epoch from the cache vs from 512px PNGs", rows,
             {"images": n_images, "size": args.size, "bs": args.bs, "workers": args.workers, "rounds": args.rounds},
             notes, record=not args.no_record)
    return {"ratio": loading, "identical": identical == len(png.items)}


if __name__ == "__main__":
    main()
