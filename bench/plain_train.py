"""The plain PyTorch training script a user would otherwise write: the baseline of ``overhead.py``.

No fastai and nothing of this package: a ``Dataset`` that decodes each image with PIL and resizes
it, random flips, torchvision's resnet18, Adam with ``OneCycleLR``, BCE on logits, a validation
pass with sklearn's macro F1 after each epoch, and the weights saved at the end. The split is
the one fastai's ``RandomSplitter`` makes (``torch.randperm`` under the seed, the first
``valid_pct`` of it for validation), so both sides train and validate on the same images.

    python bench/plain_train.py --data DIR --size 64 --bs 32 --epochs 3 --workers 2 --lr 1e-3
"""
from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

STAINS = ("red", "green", "blue", "yellow")


def read_labels(data: Path):
    """(image files or stain-file templates, label lists, number of classes) from train.csv."""
    with open(data / "train.csv", newline="") as f:
        rows = list(csv.reader(f))
    header, rows = rows[0], rows[1:]
    if header[:2] == ["Image", "Label"]:
        files, n_classes = [str(data / "train" / f"{r[0]}.png") for r in rows], 10
    else:
        files, n_classes = [str(data / "train" / f"{r[0]}_{{}}.png") for r in rows], 28
    return files, [[int(t) for t in r[1].split()] for r in rows], n_classes


class Images(Dataset):
    def __init__(self, files, labels, n_classes: int, size: int, train: bool):
        self.files, self.labels, self.n_classes, self.size, self.train = files, labels, n_classes, size, train

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        f = self.files[i]
        if "{}" in f:  # one grayscale file per stain: the RGB stains
            im = Image.merge("RGB", [Image.open(f.format(s)) for s in STAINS[:3]])
        else:
            im = Image.open(f).convert("RGB")
        im = im.resize((self.size, self.size), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(im).transpose(2, 0, 1).copy()).float().div_(255)
        x = (x - 0.5) / 0.25
        if self.train:  # cells have no up: flips and transposes
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
            if torch.rand(()) < 0.5:
                x = x.flip(-2)
            if torch.rand(()) < 0.5:
                x = x.transpose(-1, -2)
        y = torch.zeros(self.n_classes)
        y[self.labels[i]] = 1
        return x, y


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--bs", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--valid-pct", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", default=None, help="file for the final weights (default: none saved)")
    args = p.parse_args(argv)

    import torchvision
    from sklearn.metrics import f1_score

    t0 = time.time()
    files, labels, n_classes = read_labels(Path(args.data))
    torch.manual_seed(args.seed)
    order = torch.randperm(len(files)).tolist()
    cut = int(args.valid_pct * len(files))
    valid_idx, train_idx = order[:cut], order[cut:]
    pick = lambda idx, seq: [seq[i] for i in idx]  # noqa: E731
    train_ds = Images(pick(train_idx, files), pick(train_idx, labels), n_classes, args.size, train=True)
    valid_ds = Images(pick(valid_idx, files), pick(valid_idx, labels), n_classes, args.size, train=False)
    train_dl = DataLoader(train_ds, args.bs, shuffle=True, drop_last=True, num_workers=args.workers)
    valid_dl = DataLoader(valid_ds, args.bs * 2, num_workers=args.workers)

    model = torchvision.models.resnet18(num_classes=n_classes)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.99), eps=1e-5)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * len(train_dl))
    loss_fn = nn.BCEWithLogitsLoss()
    for epoch in range(args.epochs):
        model.train()
        for x, y in train_dl:
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        probs, targs, losses = [], [], []
        with torch.no_grad():
            for x, y in valid_dl:
                out = model(x)
                losses.append(float(loss_fn(out, y)))
                probs.append(torch.sigmoid(out))
                targs.append(y)
        f1 = f1_score(torch.cat(targs).numpy(), torch.cat(probs).numpy() >= 0.5, average="macro", zero_division=0)
        print(f"epoch {epoch + 1} train_loss {loss.item():.4f} valid_loss {np.mean(losses):.4f} f1_macro {f1:.4f}",
              flush=True)
    if args.out:
        torch.save(model.state_dict(), args.out)
    print(f"{time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
