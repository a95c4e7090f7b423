"""Synthetic data: exact competition layouts, reproducibility, label statistics, and a
green stain that sits where the labels say."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from hpa_fastai import synth
from hpa_fastai.errors import HPAError
from hpa_fastai.data.vocab import NAMES

HPA_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-11e8-[0-9a-f]{4}-[0-9a-f]{12}$")


def _files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _header(path):
    return path.read_text().splitlines()[0]


def test_z2g_layout_is_exact(tmp_path):
    out = synth.make_dataset(tmp_path / "z", fmt="z2g", n_train=6, n_test=3, size=32, seed=1)
    assert out == tmp_path / "z"
    assert _header(out / "train.csv") == "Image,Label"
    assert _header(out / "submission.csv") == "Image,Label"
    train = pd.read_csv(out / "train.csv", dtype=str)
    sub = pd.read_csv(out / "submission.csv", dtype=str)
    assert len(train) == 6 and len(sub) == 3
    assert all(s.isdigit() for s in list(train.Image) + list(sub.Image))
    assert not set(train.Image) & set(sub.Image)
    assert train.Image.is_unique and sub.Image.is_unique
    assert set(sub.Label) == {"0"}
    for labels in train.Label:
        ids = [int(x) for x in labels.split()]
        assert ids and len(set(ids)) == len(ids) and all(0 <= i < 10 for i in ids)
    expected = {"train.csv", "submission.csv"}
    expected |= {f"train/{i}.png" for i in train.Image} | {f"test/{i}.png" for i in sub.Image}
    assert set(_files(out)) == expected  # nothing else, no temporary files left behind
    for name in expected - {"train.csv", "submission.csv"}:
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (32, 32)


def test_hpa2018_layout_is_exact(tmp_path):
    out = synth.make_dataset(tmp_path, fmt="hpa2018", n_train=5, n_test=2, size=32, seed=2)
    assert _header(out / "train.csv") == "Id,Target"
    assert _header(out / "sample_submission.csv") == "Id,Predicted"
    train = pd.read_csv(out / "train.csv", dtype=str)
    sub = pd.read_csv(out / "sample_submission.csv", dtype=str)
    assert len(train) == 5 and len(sub) == 2
    assert all(HPA_ID.match(i) for i in list(train.Id) + list(sub.Id))
    assert list(train.Id) == sorted(train.Id)  # as in the real train.csv
    assert set(sub.Predicted) == {"0"}
    for labels in train.Target:
        ids = [int(x) for x in labels.split()]
        assert ids and all(0 <= i < 28 for i in ids)
    expected = {"train.csv", "sample_submission.csv"}
    for split, ids in (("train", train.Id), ("test", sub.Id)):
        expected |= {f"{split}/{i}_{c}.png" for i in ids for c in ("red", "green", "blue", "yellow")}
    assert set(_files(out)) == expected
    for name in expected - {"train.csv", "sample_submission.csv"}:
        with Image.open(out / name) as im:
            assert im.mode == "L" and im.size == (32, 32)


@pytest.mark.parametrize("fmt", ["z2g", "hpa2018"])
def test_same_seed_same_bytes_other_seed_differs(tmp_path, fmt):
    kw = dict(fmt=fmt, n_train=4, n_test=2, size=32, plant_duplicates=1)
    a = synth.make_dataset(tmp_path / "a", seed=7, **kw)
    b = synth.make_dataset(tmp_path / "b", seed=7, **kw)
    c = synth.make_dataset(tmp_path / "c", seed=8, **kw)
    assert _files(a) == _files(b)
    for name in _files(a):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "train.csv").read_bytes() != (c / "train.csv").read_bytes()
    assert _files(a) != _files(c)  # new ids


def test_rerun_into_same_folder_is_identical(tmp_path):
    synth.make_dataset(tmp_path, n_train=3, n_test=1, size=32, seed=3)
    before = {n: (tmp_path / n).read_bytes() for n in _files(tmp_path)}
    synth.make_dataset(tmp_path, n_train=3, n_test=1, size=32, seed=3)
    assert {n: (tmp_path / n).read_bytes() for n in _files(tmp_path)} == before


def test_progress_reports_every_image(tmp_path):
    calls = []
    synth.make_dataset(tmp_path, n_train=3, n_test=2, size=32, plant_duplicates=1,
                       progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, 6) for i in range(1, 7)]


def test_planted_duplicates_are_listed_and_near_identical(tmp_path):
    out = synth.make_dataset(tmp_path, fmt="z2g", n_train=4, n_test=0, size=48, seed=5,
                             plant_duplicates=3)
    assert _header(out / "duplicates.csv") == "Id,duplicate_of"
    dups = pd.read_csv(out / "duplicates.csv", dtype=str)
    train = pd.read_csv(out / "train.csv", dtype=str).set_index("Image")
    assert len(dups) == 3 and len(train) == 7 and train.index.is_unique
    assert not set(dups.Id) & set(dups.duplicate_of)

    def load(i):
        return np.asarray(Image.open(out / "train" / f"{i}.png"), dtype=np.float32)

    for dup, orig in zip(dups.Id, dups.duplicate_of):
        assert train.loc[dup, "Label"] == train.loc[orig, "Label"]
        d, o = load(dup), load(orig)
        assert not np.array_equal(d, o)
        near = np.abs(d - o).mean()
        others = [np.abs(d - load(i)).mean() for i in train.index if i not in (dup, orig)
                  and i not in set(dups.Id)]
        assert near < min(others) / 2, (near, others)


def test_no_duplicates_file_unless_asked(tmp_path):
    synth.make_dataset(tmp_path, n_train=2, n_test=0, size=32)
    assert not (tmp_path / "duplicates.csv").exists()
    assert (tmp_path / "test").is_dir()


@pytest.mark.parametrize("kwargs, word", [
    (dict(fmt="kaggle"), "--format"),
    (dict(size=8), "--size"),
    (dict(n_train=0), "--n-train"),
    (dict(n_test=-1), "--n-test"),
    (dict(plant_duplicates=-2), "--plant-duplicates"),
    (dict(size=32.5), "--size"),
])
def test_bad_arguments_raise_hpa_error(tmp_path, kwargs, word):
    with pytest.raises(HPAError, match=word):
        synth.make_dataset(tmp_path / "x", **{"n_train": 2, "n_test": 1, "size": 32, **kwargs})
    assert not (tmp_path / "x" / "train.csv").exists()


def test_bad_arguments_to_sampling_and_drawing():
    rng = np.random.default_rng(0)
    with pytest.raises(HPAError, match="fmt"):
        synth.sample_labels(3, "nope", rng)
    with pytest.raises(HPAError, match="label 10"):
        synth.draw_field([10], "z2g", 32, rng)
    with pytest.raises(HPAError, match="size"):
        synth.draw_field([0], "z2g", 15, rng)


def _counts(labels, k):
    c = np.zeros(k)
    for labs in labels:
        c[labs] += 1
    return c


def test_sampled_labels_follow_the_real_frequencies():
    n = 5000
    labels = synth.sample_labels(n, "hpa2018", np.random.default_rng(0))
    assert len(labels) == n
    assert all(labs and len(set(labs)) == len(labs) and all(0 <= x < 28 for x in labs)
               for labs in labels)
    freq = _counts(labels, 28) / n
    real = np.asarray(synth.LABEL_FREQ["hpa2018"])
    assert int(np.argmax(freq)) == NAMES["hpa2018"].index("Nucleoplasm")
    common = real >= 0.04
    assert np.all(np.abs(freq[common] - real[common]) < 0.2 * real[common] + 0.01), (freq, real)
    # Rare classes stay rare.
    assert freq[real < 0.002].sum() < 0.02
    # About half the images have one label, as in the real set.
    sizes = np.bincount([len(labs) for labs in labels])
    assert 0.44 < sizes[1] / n < 0.53 and sizes[2] / n > 0.33


def test_sampled_labels_keep_the_real_co_occurrence():
    names = NAMES["z2g"]
    nucleoplasm, nucleoli, speckles = (names.index(x) for x in
                                       ("Nucleoplasm", "Nucleoli", "Nuclear speckles"))
    labels = synth.sample_labels(6000, "z2g", np.random.default_rng(1))
    freq = _counts(labels, 10) / len(labels)
    assert abs(freq[nucleoplasm] - synth.LABEL_FREQ["z2g"][nucleoplasm]) < 0.04

    def p_with(a, b):
        having = [labs for labs in labels if a in labs]
        return sum(b in labs for labs in having) / len(having)

    # Real: P(Nucleoplasm | Nucleoli) = .48 but P(Nucleoplasm | Nuclear speckles) = .05;
    # independent sampling would give ~.47 for both.
    assert p_with(nucleoli, nucleoplasm) > 0.35
    assert p_with(speckles, nucleoplasm) < 0.15


def test_sampling_is_reproducible():
    a = synth.sample_labels(50, "z2g", np.random.default_rng(3))
    b = synth.sample_labels(50, "z2g", np.random.default_rng(3))
    c = synth.sample_labels(50, "z2g", np.random.default_rng(4))
    assert a == b and a != c


def test_draw_field_shape_and_determinism():
    a = synth.draw_field([0, 2], "hpa2018", 40, np.random.default_rng(9))
    b = synth.draw_field([0, 2], "hpa2018", 40, np.random.default_rng(9))
    assert a.shape == (40, 40, 4) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert synth.CHANNELS == ("red", "green", "blue", "yellow")


def _green_in_out(img):
    """Green inside and outside the nuclei, the nuclei found from the blue channel."""
    blue = img[..., 2].astype(float)
    green = img[..., 1].astype(float)
    nucleus = blue > 0.35 * np.percentile(blue, 99.5)
    return green[nucleus], green[~nucleus]


@pytest.mark.parametrize("fmt", ["z2g", "hpa2018"])
@pytest.mark.parametrize("seed", range(4))
def test_nucleoplasm_green_is_inside_the_nuclei(fmt, seed):
    label = NAMES[fmt].index("Nucleoplasm")
    inside, outside = _green_in_out(synth.draw_field([label], fmt, 64, np.random.default_rng(seed)))
    assert inside.mean() > 2 * outside.mean() + 5, (inside.mean(), outside.mean())


@pytest.mark.parametrize("name", ["Plasma membrane", "Cytosol"])
@pytest.mark.parametrize("seed", range(4))
def test_cytoplasmic_green_is_outside_the_nuclei(name, seed):
    label = NAMES["z2g"].index(name)
    img = synth.draw_field([label], "z2g", 64, np.random.default_rng(seed))
    inside, outside = _green_in_out(img)
    # Much of "outside" is empty background, so compare the bright end.
    hi_in, hi_out = np.percentile(inside, 95), np.percentile(outside, 95)
    assert hi_out > 1.5 * hi_in + 5, (hi_out, hi_in)


def test_every_class_of_both_vocabularies_has_a_visible_pattern():
    for fmt, names in NAMES.items():
        for label, name in enumerate(names):
            assert name in synth.PATTERNS, name
            img = synth.draw_field([label], fmt, 64, np.random.default_rng(label), easy=True)
            green = img[..., 1].astype(float)
            assert green.max() > np.median(green) + 60, (fmt, name)


def test_labels_superimpose():
    names = NAMES["hpa2018"]
    both = [names.index("Nucleoplasm"), names.index("Cytosol")]
    img = synth.draw_field(both, "hpa2018", 64, np.random.default_rng(0), easy=True)
    inside, outside = _green_in_out(img)
    cells = img[..., 0] > 0.25 * np.percentile(img[..., 0], 99)  # red marks the cell bodies
    cyto = cells & ~(img[..., 2] > 0.35 * np.percentile(img[..., 2], 99.5))
    assert inside.mean() > 60 and img[..., 1][cyto].mean() > 60


def test_easy_fields_have_stronger_green_contrast():
    label = NAMES["z2g"].index("Nucleoplasm")

    def contrast(easy):
        vals = []
        for seed in range(8):
            inside, outside = _green_in_out(
                synth.draw_field([label], "z2g", 48, np.random.default_rng(seed), easy=easy))
            vals.append(inside.mean() - outside.mean())
        return np.mean(vals)

    assert contrast(True) > 1.2 * contrast(False)


def test_draw_speed_at_full_size():
    rng = np.random.default_rng(0)
    synth.draw_field([0], "hpa2018", 512, rng)
    import time
    t = time.perf_counter()
    for labels in synth.sample_labels(3, "hpa2018", rng):
        synth.draw_field(labels, "hpa2018", 512, rng)
    # Generous bound so a loaded CI machine passes; typical is ~0.08 s per field.
    assert (time.perf_counter() - t) / 3 < 0.6
