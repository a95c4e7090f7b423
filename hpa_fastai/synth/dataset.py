"""Whole synthetic images (`draw_field`) and data sets in either competition's exact folder
layout (`make_dataset`), to try the pipeline without the real downloads."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ..atomic import save_png, write_csv
from ..config import SynthConfig, check_field, validate
from ..errors import HPAError
from ..data.vocab import NAMES
from .fields import _Field, _blur
from .labels import _as_int, _check_fmt, sample_labels
from .patterns import PATTERNS, _nucleoli_blobs

CHANNELS = ("red", "green", "blue", "yellow")


def draw_field(labels: list[int], fmt: str, size: int, rng: np.random.Generator,
               easy: bool = False) -> np.ndarray:
    """One synthetic microscopy field, uint8 (size, size, 4) in CHANNELS order.

    Blue: nuclei; red: microtubules; yellow: ER; green: the protein, laid out by the
    class pattern of every label (superimposed). Per-image and per-cell brightness,
    blur and noise vary so that the pattern, not the colour or total intensity, tells
    the classes apart. ``easy`` gives stronger green, less noise and larger structures.
    """
    _check_fmt(fmt)
    check_field(SynthConfig, "size", size)
    names = NAMES[fmt]
    labels = [_as_int(x, "label") for x in labels]
    bad = [x for x in labels if not 0 <= x < len(names)]
    if bad:
        raise HPAError(f"label {bad[0]} is not a {fmt} class (0..{len(names) - 1})")

    f = _Field(size, rng, easy)
    S = size
    nucleoli = _nucleoli_blobs(f)

    blue = f.nuc_soft * f.gain(0.6) * np.clip(0.85 + 0.15 * f.noise(S / 16), 0, 1.2)
    blue = blue * (1 - 0.35 * np.minimum(nucleoli, 1))  # nucleoli are dim in DNA stains
    red = (0.25 + 0.75 * f.fibres) * (1 - 0.4 * np.minimum(f.rho, 1)) * f.gain(0.6)
    red = red * np.where(f.nuc, 0.35, 1.0) * f.cell
    yellow = f.er * f.gain(0.6)

    green = np.zeros((S, S), np.float32)
    for lab in dict.fromkeys(labels):
        weight = rng.uniform(0.85, 1.0) if easy else rng.uniform(0.6, 1.0)
        green += weight * PATTERNS[names[lab]](f) * f.gain()
    peak = float(green.max())
    if peak > 0:
        green /= peak
    if easy:
        green_gain, green_bg = rng.uniform(0.85, 1.0), 0.02
    else:
        green_gain, green_bg = rng.uniform(0.35, 1.0), rng.uniform(0.02, 0.08)
    # Weak nonspecific staining everywhere in the cells, as in real antibody images.
    green = green * green_gain + green_bg * f.cell

    stack = np.stack([red * rng.uniform(0.45, 0.9), green, blue * rng.uniform(0.6, 1.0),
                      yellow * rng.uniform(0.45, 0.9)], axis=-1).astype(np.float32)
    stack += rng.uniform(0.005, 0.03, 4).astype(np.float32)  # camera offset
    sigma = float(np.clip(S / 512, 0.5, 1.0) * rng.uniform(0.8, 1.2)) * (0.7 if easy else 1.0)
    stack = _blur(stack, sigma)
    read, shot = (0.008, 0.02) if easy else (rng.uniform(0.01, 0.03), rng.uniform(0.03, 0.06))
    noise = rng.standard_normal(stack.shape, dtype=np.float32)
    stack += noise * (read + shot * np.sqrt(np.maximum(stack, 0)))
    return np.clip(stack * 255 + 0.5, 0, 255).astype(np.uint8)


def _hpa_ids(k: int, rng: np.random.Generator) -> list[str]:
    ids: list[str] = []
    seen: set[str] = set()
    while len(ids) < k:
        h = rng.bytes(14).hex()
        s = f"{h[:8]}-{h[8:12]}-11e8-{h[12:16]}-{h[16:28]}"
        if s not in seen:
            seen.add(s)
            ids.append(s)
    return ids


def _near_duplicate(arr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A copy that a pixel-exact comparison misses: rescaled, re-encoded or shifted."""
    S = arr.shape[0]
    kind = int(rng.integers(3))
    if kind == 0:
        small = max(8, int(S * rng.uniform(0.5, 0.8)))
        chans = [np.asarray(Image.fromarray(np.ascontiguousarray(arr[..., c]))
                            .resize((small, small), Image.BILINEAR).resize((S, S), Image.BILINEAR))
                 for c in range(arr.shape[2])]
        return np.stack(chans, axis=-1)
    if kind == 1:
        q = int(rng.integers(75, 93))
        chans = []
        for c in range(arr.shape[2]):
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(arr[..., c])).save(buf, format="JPEG", quality=q)
            buf.seek(0)
            chans.append(np.asarray(Image.open(buf).convert("L")))
        return np.stack(chans, axis=-1)
    dy, dx = (int(v) * int(rng.choice([-1, 1])) for v in rng.integers(1, 4, 2))
    p = np.pad(arr, ((3, 3), (3, 3), (0, 0)), mode="edge")
    return p[3 + dy:3 + dy + S, 3 + dx:3 + dx + S].copy()


def _write_image(folder: Path, image_id, arr: np.ndarray, fmt: str) -> None:
    if fmt == "z2g":
        save_png(folder / f"{image_id}.png", Image.fromarray(np.ascontiguousarray(arr[..., :3])))
    else:
        for c, name in enumerate(CHANNELS):
            save_png(folder / f"{image_id}_{name}.png", Image.fromarray(np.ascontiguousarray(arr[..., c])))


def make_dataset(out_dir, fmt: str = "z2g", n_train: int = 200, n_test: int = 40, size: int = 512,
                 seed: int = 0, easy: bool = False, progress=None, plant_duplicates: int = 0) -> Path:
    """Write a synthetic data set in the competition's own layout and return its folder.

    fmt "z2g": train.csv (Image,Label), train/{Image}.png RGB, test/{Image}.png,
    submission.csv (Image,Label). fmt "hpa2018": train.csv (Id,Target), train/ and test/
    with {Id}_{red,green,blue,yellow}.png grayscale, sample_submission.csv (Id,Predicted).
    ``plant_duplicates`` adds that many near-duplicate train images (new id, same labels)
    and lists them in duplicates.csv (Id,duplicate_of). Same seed, same bytes.
    ``progress(done, total)`` is called after each image.
    """
    # the same checks and messages as `run.py synth`'s flags
    validate(SynthConfig(out=str(out_dir), format=fmt, n_train=n_train, n_test=n_test, size=size, seed=seed,
                         easy=easy, plant_duplicates=plant_duplicates))
    n_dup = plant_duplicates

    out = Path(out_dir)
    (out / "train").mkdir(parents=True, exist_ok=True)
    (out / "test").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 0])
    total = n_train + n_dup + n_test
    if fmt == "z2g":
        ids = [int(i) for i in rng.choice(max(100_000, 2 * total), size=total, replace=False)]
    else:
        ids = _hpa_ids(total, rng)
    train_ids, dup_ids, test_ids = ids[:n_train], ids[n_train:n_train + n_dup], ids[n_train + n_dup:]
    train_labels = sample_labels(n_train, fmt, rng)
    test_labels = sample_labels(n_test, fmt, rng)
    sources = rng.choice(n_train, size=n_dup, replace=n_dup > n_train) if n_dup else []
    dups_of: dict[int, list[int]] = {}
    for d, s in enumerate(sources):
        dups_of.setdefault(int(s), []).append(d)

    done = 0

    def tick():
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    # Each image has its own stream, so one image does not depend on how many came before.
    rows, dup_rows = [], []
    for i, (image_id, labels) in enumerate(zip(train_ids, train_labels)):
        img_rng = np.random.default_rng([seed, 1, i])
        arr = draw_field(labels, fmt, size, img_rng, easy)
        _write_image(out / "train", image_id, arr, fmt)
        rows.append((image_id, labels))
        tick()
        for d in dups_of.get(i, []):
            copy = _near_duplicate(arr, np.random.default_rng([seed, 3, d]))
            _write_image(out / "train", dup_ids[d], copy, fmt)
            rows.append((dup_ids[d], labels))
            dup_rows.append((dup_ids[d], image_id))
            tick()
    for i, (image_id, labels) in enumerate(zip(test_ids, test_labels)):
        arr = draw_field(labels, fmt, size, np.random.default_rng([seed, 2, i]), easy)
        _write_image(out / "test", image_id, arr, fmt)
        tick()

    def joined(labels):
        return " ".join(str(x) for x in labels)

    # train.csv goes last: its presence means the folder is complete.
    if fmt == "z2g":
        order = rng.permutation(len(rows))  # the real file is in no particular order
        train_df = pd.DataFrame({"Image": [rows[j][0] for j in order],
                                 "Label": [joined(rows[j][1]) for j in order]})
        write_csv(out / "submission.csv", pd.DataFrame({"Image": test_ids, "Label": ["0"] * n_test}))
    else:
        rows.sort(key=lambda r: r[0])  # the real file is sorted by Id
        train_df = pd.DataFrame({"Id": [r[0] for r in rows], "Target": [joined(r[1]) for r in rows]})
        write_csv(out / "sample_submission.csv",
                  pd.DataFrame({"Id": sorted(test_ids), "Predicted": ["0"] * n_test}))
    if n_dup:
        write_csv(out / "duplicates.csv", pd.DataFrame({"Id": [r[0] for r in dup_rows],
                                                        "duplicate_of": [r[1] for r in dup_rows]}))
    write_csv(out / "train.csv", train_df)
    return out
