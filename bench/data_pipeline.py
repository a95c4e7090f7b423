"""Data pipeline: the project's training DataLoader over 512px RGBY PNGs (decode, resize, batch,
augment, normalise) against a bare loop that only decodes the same PNGs with PIL, with the same
number of worker processes; also the same DataLoader reading a ``run.py preprocess`` cache of the
set (made in a temporary copy).

PIL is the decoder of both sides: OpenCV's ``imread`` was measured no faster on these
single-stain PNGs (see README.md), so it is not a dependency.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import _common as C


TRAIN = "project DataLoader (train, augmented)"
CACHED = "project DataLoader from the preprocess cache (train, augmented)"


class BareDecode:
    """Dataset: item i -> the stains of image i as decoded by PIL, (C, H, W) uint8, nothing else."""

    def __init__(self, keys, channels):
        self.keys, self.channels = list(keys), channels

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        import numpy as np
        import torch
        from PIL import Image

        from hpa_fastai.data.layouts import key_files

        # a tensor, as a loader must hand the pixels on (from workers, through shared memory)
        return torch.from_numpy(np.stack([np.asarray(Image.open(f)) for f in key_files(self.keys[i], self.channels)]))


class ProjectItems:
    """Dataset: the project's item transform alone (decode and resize), without batching or augmentation."""

    def __init__(self, keys, size):
        from hpa_fastai.data.pipeline import ReadImage

        self.keys, self.read = list(keys), ReadImage("rgby", size)

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        return self.read(self.keys[i])


def main(argv=None) -> dict:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=64, help="images in the synthetic set (a tenth is held out)")
    p.add_argument("--size", type=int, default=256, help="training image side (the PNGs are 512px)")
    p.add_argument("--bs", type=int, default=16)
    p.add_argument("--workers", default="0,2", help="comma-separated worker counts to compare at")
    p.set_defaults(rounds=4)
    args = C.parse(p, argv)

    from torch.utils.data import DataLoader

    from hpa_fastai.config import TrainConfig
    from hpa_fastai.data.layouts import CHANNEL_SETS, read_items
    from hpa_fastai.data.cache import preprocess
    from hpa_fastai.training.learner import run_learner
    from hpa_fastai.training.run import prepare

    data = C.synth_set("hpa2018", n=args.n, size=512)
    pngs = read_items(data, channels="rgby")
    originals = dict(zip(pngs["id"], pngs["key"]))
    scratch = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    shutil.copytree(data, scratch / "data")
    preprocess(scratch / "data", args.size, "rgby")
    rows, ratios = [], {}
    for workers in map(int, args.workers.split(",")):
        def learner(folder):
            cfg = TrainConfig(data=str(folder), arch="resnet18", size=args.size, bs=args.bs, epochs=1, lr="1e-3",
                              pretrained=False, channels="rgby", seed=0, workers=workers, valid_pct=0.1,
                              out=str(scratch / "runs"))
            prep = prepare(cfg)
            if folder == data:  # the PNGs, even where a preprocessed cache of this set exists
                prep.items = prep.items.assign(key=prep.items["id"].map(originals))
            return run_learner(prep)[0]

        learn = learner(data)
        train = learn.dls.train
        cached_train = learner(scratch / "data").dls.train
        n_images = len(train) * args.bs  # the training loader drops the last partial batch
        keys = list(train.items["key"])[:n_images]
        bare = DataLoader(BareDecode(keys, CHANNEL_SETS["rgby"]), batch_size=None, num_workers=workers)
        project_items = DataLoader(ProjectItems(keys, args.size), batch_size=None, num_workers=workers)
        # fastai's test_dl: the same pipeline with the validation transforms, i.e. without augmentation
        unaugmented = learn.dls.test_dl(train.items.iloc[:n_images], with_labels=True, bs=args.bs,
                                        num_workers=workers)

        def epoch(loader):
            return lambda: sum(1 for _ in loader)

        sides = {"bare PIL decode": epoch(bare), TRAIN: epoch(train),
                 "project DataLoader, no augmentation (test_dl)": epoch(unaugmented),
                 "project item transform only (decode + resize)": epoch(project_items),
                 CACHED: epoch(cached_train)}
        times = C.interleaved(sides, args.rounds)
        for name in sides:
            r = C.ratio(times, name, "bare PIL decode")
            rows.append({"workers": workers, "side": name, "images/s": C.rate(n_images, times[name]), **r,
                         "target": "≥ 0.85" if name in (TRAIN, CACHED) else ""})
            if name in (TRAIN, CACHED):
                ratios[f"{workers} workers" + (", from the cache" if name == CACHED else "")] = r["ratio (median)"]
    shutil.rmtree(scratch, ignore_errors=True)
    notes = [f"ratio = bare-decode seconds / side seconds for the same {n_images} training images per epoch; "
             "target DataLoader ≥ 0.85 of bare decoding: "
             + "; ".join(f"{k}: {'met' if v >= 0.85 else 'NOT met'} ({v:.3f})" for k, v in ratios.items()),
             "the rows without augmentation and of the item transform alone show where the time goes: "
             "decoding + resizing 512 -> 256, then fastai's batch work (collate, IntToFloatTensor, Normalize), "
             "then the augmentation arithmetic, which on a GPU runs on the device"]
    C.record("Data pipeline: project DataLoader vs bare PNG decoding", rows,
             {"images": n_images, "source": "512px RGBY PNGs (synthetic)", "size": args.size, "bs": args.bs,
              "rounds": args.rounds, "augmentation": "dihedral flips, rotate 10, lighting 0.1"},
             notes, record=not args.no_record)
    return ratios


if __name__ == "__main__":
    main()
