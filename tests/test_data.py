"""Images to batches: channel order, per-channel normalisation, multi-hot labels, stratified folds, real PNGs."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from fastai.data.transforms import IndexSplitter
from PIL import Image

from hpa_fastai.config import TrainConfig
from hpa_fastai.data.images import channel_stats, read_image
from hpa_fastai.data.pipeline import ReadImage, make_dls
from hpa_fastai.data.splits import make_splitter, stratified_valid_idx
from hpa_fastai.errors import HPAError
from hpa_fastai.data.layouts import CHANNEL_SETS, key_files, read_items
from hpa_fastai.data.training_set import MAX_AUTO_SIZE
from hpa_fastai.training.run import prepare
from hpa_fastai.data.vocab import vocab_for

from .conftest import STAIN_VALUES, STAINS

CPU = torch.device("cpu")


def dls_for(items, fmt, channels, size, mean, std, valid_idx, bs, augment=True):
    return make_dls(items, vocab_for(fmt), channels, size, mean, std, IndexSplitter(valid_idx), bs=bs,
                    workers=0, seed=0, device=CPU, augment=augment)


def numpy_pixels(items, channels) -> np.ndarray:
    """All pixels of all items, (N, C) on the 0..1 scale, read with PIL directly (not the package)."""
    per_item = []
    for key in items["key"]:
        files = key_files(key, CHANNEL_SETS[channels])
        arrays = [np.asarray(Image.open(f)) for f in files]
        arr = arrays[0] if len(arrays) == 1 else np.stack(arrays, axis=-1)
        per_item.append(arr.reshape(-1, arr.shape[-1]))
    return np.concatenate(per_item) / 255.0


# --- channel order --------------------------------------------------------------------------------

@pytest.mark.parametrize("channels,expected", [("rgby", [10, 20, 30, 40]), ("rgb", [10, 20, 30])])
def test_stain_files_land_in_channel_order(make_hpa2018, channels, expected):
    data = make_hpa2018(n=4, values=STAIN_VALUES)
    items = read_items(data, channels=channels)
    arr = read_image(items["key"].iloc[0], CHANNEL_SETS[channels])
    assert arr.shape == (16, 16, len(expected)) and arr.dtype == np.uint8
    x = ReadImage(channels, size=24)(items["key"].iloc[0])
    assert x.shape == (len(expected), 24, 24) and x.dtype == torch.uint8
    for c, value in enumerate(expected):
        assert (arr[..., c] == value).all()
        assert (x[c] == value).all()

    # after normalisation each channel is (v/255 - mean) / std of its own stain
    mean, std = [0.1, 0.2, 0.3, 0.4][: len(expected)], [0.5, 0.25, 0.2, 0.1][: len(expected)]
    dls = dls_for(items, "hpa2018", channels, 16, mean, std, valid_idx=[2, 3], bs=2)
    for xb, _ in [dls.valid.one_batch(), dls_for(items, "hpa2018", channels, 16, mean, std, [2, 3], 2,
                                                  augment=False).train.one_batch()]:
        assert xb.shape == (2, len(expected), 16, 16) and xb.dtype == torch.float32
        for c, value in enumerate(expected):
            want = (value / 255 - mean[c]) / std[c]
            assert torch.allclose(xb[:, c], torch.full_like(xb[:, c], want), atol=1e-4), (c, xb[:, c].mean(), want)


def test_rgb_image_channel_order(make_z2g):
    data = make_z2g(n=4, value=(10, 20, 30))
    items = read_items(data)
    x = ReadImage("rgb")(items["key"].iloc[0])
    assert x.shape == (3, 16, 16)
    assert [int(x[c].unique()) for c in range(3)] == [10, 20, 30]
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.3, 0.4]
    xb, _ = dls_for(items, "z2g", "rgb", 16, mean, std, [2, 3], bs=2).valid.one_batch()
    got = xb.mean(dim=(0, 2, 3))
    want = torch.tensor([(v / 255 - m) / s for v, m, s in zip((10, 20, 30), mean, std)])
    assert torch.allclose(got, want, atol=1e-4)


def test_single_rgb_file_cannot_feed_four_channels(make_z2g):
    items = read_items(make_z2g(n=2))
    with pytest.raises(HPAError, match="4-channel"):
        read_image(items["key"].iloc[0], CHANNEL_SETS["rgby"])


# --- normalisation statistics ---------------------------------------------------------------------

@pytest.mark.parametrize("fmt,channels", [("z2g", "rgb"), ("hpa2018", "rgb"), ("hpa2018", "rgby")])
def test_channel_stats_match_numpy(make_data, fmt, channels):
    items = read_items(make_data(fmt, n=6, size=20), channels=channels)
    mean, std = channel_stats(items["key"], channels, size=20, n=64)
    pixels = numpy_pixels(items, channels)
    assert len(mean) == len(std) == len(channels)
    np.testing.assert_allclose(mean, pixels.mean(0), atol=2e-6)
    np.testing.assert_allclose(std, pixels.std(0), atol=2e-6)
    assert len(set(np.round(mean, 2))) == len(channels)  # the fixture gives each channel its own range


@pytest.mark.parametrize("fmt,channels", [("z2g", "rgb"), ("hpa2018", "rgby")])
def test_normalised_batch_has_zero_mean_unit_std(make_data, fmt, channels):
    n_train = 8
    items = read_items(make_data(fmt, n=n_train + 2, size=16), channels=channels)
    train_keys = items["key"].iloc[:n_train]
    mean, std = channel_stats(train_keys, channels, size=16)
    dls = dls_for(items, fmt, channels, 16, mean, std, valid_idx=[n_train, n_train + 1], bs=n_train, augment=False)
    xb, _ = dls.train.one_batch()  # one batch = the whole training set
    assert xb.shape == (n_train, len(channels), 16, 16)
    per_channel = xb.transpose(0, 1).reshape(len(channels), -1)
    assert torch.allclose(per_channel.mean(1), torch.zeros(len(channels)), atol=1e-3)
    assert torch.allclose(per_channel.std(1, unbiased=False), torch.ones(len(channels)), atol=1e-3)
    xv, _ = dls.valid.one_batch()  # unseen images: close, not exact
    valid = xv.transpose(0, 1).reshape(len(channels), -1)
    assert valid.mean(1).abs().max() < 0.15 and (valid.std(1) - 1).abs().max() < 0.15


def test_prepare_stats_are_per_channel(make_hpa2018):
    prep = prepare(TrainConfig(data=str(make_hpa2018(n=6)), arch="cnn", pretrained=False))
    assert prep.cfg.channels == "rgby" and prep.cfg.size == 16
    pixels = numpy_pixels(prep.items, "rgby")
    np.testing.assert_allclose(prep.mean, pixels.mean(0), atol=2e-6)
    np.testing.assert_allclose(prep.std, pixels.std(0), atol=2e-6)


# --- labels ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,labels", [
    ("z2g", ["0 7", "3", "7 9", "3", "0", "9"]),
    ("hpa2018", ["27 0", "14", "0", "25 2", "27", "11"]),
])
def test_labels_are_multi_hot_over_the_full_vocabulary(make_data, fmt, labels):
    width = len(vocab_for(fmt))
    items = read_items(make_data(fmt, n=6, labels=labels))
    valid_idx = [1, 2, 4, 5]
    channels = "rgb" if fmt == "z2g" else "rgby"
    dls = dls_for(items, fmt, channels, 16, [0.5] * len(channels), [0.25] * len(channels), valid_idx, bs=4)
    assert list(dls.vocab) == [str(i) for i in range(width)]
    _, yb = dls.valid.one_batch()  # the valid loader keeps row order
    assert yb.shape == (4, width) and yb.dtype == torch.float32
    expected = torch.zeros(4, width)
    for row, i in enumerate(valid_idx):
        for lab in labels[i].split():
            expected[row, int(lab)] = 1
    assert torch.equal(yb.cpu(), expected)


# --- stratified folds on the real HPA 2018 labels -------------------------------------------------

def test_stratified_folds_on_real_train_csv(hpa_real):
    csv_path = hpa_real / "kaggle2018" / "train.csv"
    if not csv_path.is_file():
        pytest.skip(f"{csv_path} not found")
    labels = pd.read_csv(csv_path)["Target"]
    assert len(labels) == 31072
    n_folds, seed = 5, 42
    y = np.zeros((len(labels), 28), bool)
    for i, text in enumerate(labels):
        y[i, [int(t) for t in text.split()]] = True
    share_all = y.mean(0)
    folds = [stratified_valid_idx(labels, 28, n_folds, k, seed) for k in range(n_folds)]
    joined = np.concatenate(folds)
    assert len(joined) == len(labels) and len(np.unique(joined)) == len(labels)  # disjoint, cover all
    counts = y.sum(0)
    for k, valid in enumerate(folds):
        assert abs(len(valid) - len(labels) / n_folds) < 0.02 * len(labels), k
        # each class's share of the fold is its share of the whole set (within 1 percentage point) ...
        assert np.abs(y[valid].mean(0) - share_all).max() < 0.01, k
        # ... and every class, down to the 11 images of class 27, gets a fifth of its images (+-1);
        # a random split misses this by several images for the rare classes
        assert (np.abs(y[valid].sum(0) - counts / n_folds) <= 1).all(), (k, y[valid].sum(0) - counts / n_folds)
    np.testing.assert_array_equal(stratified_valid_idx(labels, 28, n_folds, 2, seed), folds[2])
    splitter = make_splitter(pd.DataFrame({"labels": labels}), 28, 0.2, seed, n_folds=n_folds, fold=3)
    np.testing.assert_array_equal(np.sort(splitter(range(len(labels)))[1]), np.sort(folds[3]))


# --- real 512x512 stain PNGs ----------------------------------------------------------------------

@pytest.fixture
def real_rgby(hpa_real, tmp_path):
    """An HPA 2018 folder of 3 ids, each assembled from four different real single-stain files
    (labels meaningless); returns (data folder, {id: {stain: real file}})."""
    sample = hpa_real / "kaggle2018" / "train_sample_single_channel"
    if not (sample / "files.csv").is_file():
        pytest.skip(f"{sample} not found")
    files = pd.read_csv(sample / "files.csv")
    data = tmp_path / "real"
    (data / "train").mkdir(parents=True)
    sources = {}
    for i in range(3):
        image_id = f"real-{i}"
        sources[image_id] = {}
        for stain in STAINS:
            src = sample / "images" / files[files["channel"] == stain]["file"].iloc[i]
            (data / "train" / f"{image_id}_{stain}.png").symlink_to(src)
            sources[image_id][stain] = src
    (data / "train.csv").write_text("Id,Target\n" + "".join(f"real-{i},{i}\n" for i in range(3)))
    return data, sources


def test_real_stain_pngs_load_at_native_size(real_rgby):
    data, sources = real_rgby
    items = read_items(data)
    arr = read_image(items["key"].iloc[0], CHANNEL_SETS["rgby"], size=None)
    assert arr.shape == (512, 512, 4) and arr.dtype == np.uint8
    for c, stain in enumerate(STAINS):
        np.testing.assert_array_equal(arr[..., c], np.asarray(Image.open(sources["real-0"][stain])))


def test_real_stain_pngs_make_batches(real_rgby):
    data, _ = real_rgby
    prep = prepare(TrainConfig(data=str(data), arch="cnn", pretrained=False, size=64))
    assert prep.cfg.size == 64 and len(prep.mean) == 4 and all(0 < s < 1 for s in prep.std)
    dls = dls_for(prep.items, "hpa2018", "rgby", 64, prep.mean, prep.std, valid_idx=[2], bs=2)
    xb, yb = dls.train.one_batch()
    assert xb.shape == (2, 4, 64, 64) and xb.dtype == torch.float32 and torch.isfinite(xb).all()
    assert yb.shape == (2, 28)
    stds = xb.transpose(0, 1).reshape(4, -1).std(1)
    assert (stds > 0.1).all()  # real structure in every channel, not a constant image
    assert not torch.equal(xb[:, 0], xb[:, 1])  # four different files, four different channels


def test_real_images_default_size_is_capped(real_rgby):
    data, _ = real_rgby
    assert prepare(TrainConfig(data=str(data), arch="cnn", pretrained=False)).cfg.size == MAX_AUTO_SIZE
