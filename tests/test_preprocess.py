"""The preprocessed cache: identical pixels, resumable writes, and training that reads it when it is complete."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from fastai.data.transforms import IndexSplitter
from PIL import Image

from hpa_fastai.config import TrainConfig
from hpa_fastai.data.images import read_image
from hpa_fastai.data.pipeline import ReadImage, make_dls
from hpa_fastai.errors import HPAError
from hpa_fastai.data.layouts import CHANNEL_SETS, key_files, read_items
from hpa_fastai.data.cache import cache_dir, preprocess
from hpa_fastai.training.run import prepare
from hpa_fastai.data.vocab import vocab_for

from .helpers import cli_in_process, read_json

SOURCE, CACHED = 40, 24  # source images are resized on the way into the cache


def cached(data, channels, image_id, size=CACHED) -> np.ndarray:
    return np.load(cache_dir(data, channels, size) / f"{image_id}.npy")


@pytest.mark.parametrize("fmt,channels,workers", [("hpa2018", "rgby", 2), ("hpa2018", "rgb", 1), ("z2g", "rgb", 1)])
def test_cached_pixels_are_read_images_pixels(make_data, fmt, channels, workers):
    data = make_data(fmt, n=5, size=SOURCE)
    folder = preprocess(data, CACHED, channels, workers=workers)
    assert folder == data / "cache" / f"{channels}_{CACHED}"
    meta = read_json(folder / "cache.json")
    assert (meta["size"], meta["channels"], meta["count"]) == (CACHED, channels, 5)
    items = read_items(data, channels=channels)
    for image_id, key in zip(items["id"], items["key"]):
        arr = cached(data, channels, image_id)
        assert arr.dtype == np.uint8 and arr.shape == (len(channels), CACHED, CACHED)
        np.testing.assert_array_equal(arr, read_image(key, CHANNEL_SETS[channels], CACHED).transpose(2, 0, 1))
        npy = str(folder / f"{image_id}.npy")
        assert torch.equal(ReadImage(channels, CACHED)(npy), ReadImage(channels, CACHED)(key))
        # a model of another size still gets the size it asks for
        assert read_image(npy, CHANNEL_SETS[channels], 16).shape == (16, 16, len(channels))


def test_stains_are_resized_each_as_on_its_own(make_hpa2018):
    data = make_hpa2018(n=1, size=SOURCE)
    key = read_items(data)["key"].iloc[0]
    alone = [np.asarray(Image.open(f).resize((CACHED, CACHED), Image.BILINEAR)) for f in key_files(key)]
    np.testing.assert_array_equal(read_image(key, CHANNEL_SETS["rgby"], CACHED), np.stack(alone, axis=-1))


def test_rerun_skips_valid_files_and_redoes_damaged_ones(make_hpa2018, capsys):
    data = make_hpa2018(n=6, size=SOURCE)
    folder = preprocess(data, CACHED, workers=1)
    ids = sorted(p.stem for p in folder.glob("*.npy"))
    want = {i: cached(data, "rgby", i) for i in ids}
    before = {i: (folder / f"{i}.npy").stat().st_mtime_ns for i in ids}
    truncated, deleted, garbage, outdated = ids[:4]
    (folder / f"{truncated}.npy").write_bytes((folder / f"{truncated}.npy").read_bytes()[:500])
    (folder / f"{deleted}.npy").unlink()
    (folder / f"{garbage}.npy").write_bytes(b"not an array")
    source = data / "train" / f"{outdated}_green.png"
    later = (folder / f"{outdated}.npy").stat().st_mtime + 10
    os.utime(source, (later, later))  # the source changed after it was cached
    capsys.readouterr()
    preprocess(data, CACHED, workers=1)
    assert "caching 4 of 6 images" in capsys.readouterr().out
    for i in ids:
        np.testing.assert_array_equal(cached(data, "rgby", i), want[i])
        redone = (folder / f"{i}.npy").stat().st_mtime_ns != before[i]
        assert redone == (i in (truncated, deleted, garbage, outdated)), i
    assert not list(folder.glob("*.tmp"))  # no half-written leftovers
    preprocess(data, CACHED, workers=1)
    assert "already cached" in capsys.readouterr().out


def test_training_reads_the_cache_and_gets_the_same_batches(make_hpa2018, capsys):
    data = make_hpa2018(n=8, size=SOURCE)
    cfg = TrainConfig(data=str(data), arch="cnn", pretrained=False, size=CACHED, bs=4, workers=0)
    plain = prepare(cfg)
    folder = preprocess(data, CACHED, workers=1)
    prep = prepare(cfg)
    assert all(k == str(folder / f"{i}.npy") for i, k in zip(prep.items["id"], prep.items["key"]))
    assert (prep.mean, prep.std) == (plain.mean, plain.std)

    def batches(items):
        dls = make_dls(items, vocab_for("hpa2018"), "rgby", CACHED, prep.mean, prep.std, IndexSplitter([6, 7]),
                       bs=2, workers=0, seed=0, device=torch.device("cpu"), augment=False)
        return [dls.train.one_batch(), dls.valid.one_batch()]

    for (xb, yb), (xc, yc) in zip(batches(plain.items), batches(prep.items)):
        assert torch.equal(xb, xc) and torch.equal(yb, yc)

    # an incomplete cache is not used: training decodes the originals and says why
    (folder / f"{prep.items['id'].iloc[0]}.npy").unlink()
    capsys.readouterr()
    assert list(prepare(cfg).items["key"]) == list(plain.items["key"])
    assert "lacks 1 of 8 images" in capsys.readouterr().out
    # nor is a cache of another size
    shutil.rmtree(folder)
    preprocess(data, CACHED + 8, workers=1)
    assert list(prepare(cfg).items["key"]) == list(plain.items["key"])


def test_cli_preprocess(make_z2g, capsys, tmp_path):
    data = make_z2g(n=4, size=SOURCE)
    code, out, err = cli_in_process(capsys, "preprocess", "--data", data, "--size", "32")
    assert code == 0, err
    assert "cache ready: 4 images" in out
    assert read_json(data / "cache" / "rgb_32" / "cache.json")["count"] == 4
    code, _, err = cli_in_process(capsys, "preprocess", "--data", tmp_path / "missing", "--size", "32")
    assert code == 2 and "data folder not found" in err


@pytest.mark.parametrize("kwargs,message", [
    ({"data": "missing"}, "data folder not found"),
    ({"size": 4}, "--size must be at least 8"),
    ({"channels": "rgby"}, "needs one file per stain"),
])
def test_bad_input_is_an_hpa_error(make_z2g, tmp_path, kwargs, message):
    data = make_z2g(n=2)
    args = {"data": data, "size": 16, **kwargs}
    if args["data"] == "missing":
        args["data"] = tmp_path / "missing"
    with pytest.raises(HPAError, match=message):
        preprocess(**args)


def test_a_cached_array_of_other_channels_is_refused(make_hpa2018):
    data = make_hpa2018(n=2, size=SOURCE)
    folder = preprocess(data, CACHED, workers=1)
    with pytest.raises(HPAError, match=r"expected uint8 \(3, H, W\)"):
        read_image(str(next(folder.glob("*.npy"))), CHANNEL_SETS["rgb"])
