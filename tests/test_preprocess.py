"""The preprocessed cache: identical pixels, resumable writes, and training that reads it when it is complete."""
from __future__ import annotations

import io
import os
import shutil
import struct
import tempfile
from pathlib import Path

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

from .helpers import cli_in_process, finishes, read_json

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


# --- a cache is a folder anyone can write into: every entry and cache.json checked before use ------

def npy_header(shape, descr="|u1", version=(1, 0)) -> bytes:
    buf = io.BytesIO()
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buf, header) if version == (1, 0) else \
        np.lib.format.write_array_header_2_0(buf, header)
    return buf.getvalue()


def npy_bytes(arr, allow_pickle=False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return buf.getvalue()


def good_entry(path) -> bytes:
    return npy_bytes(np.zeros((4, CACHED, CACHED), np.uint8))


BAD_ENTRIES = {
    # name: what to put in the entry's place (it has been removed)
    "a FIFO": lambda p: os.mkfifo(p),
    "a folder": lambda p: p.mkdir(),
    "a link to /dev/zero": lambda p: p.symlink_to("/dev/zero"),
    "a link to a good array elsewhere": lambda p: (p.with_name("elsewhere").write_bytes(good_entry(p)),
                                                   p.symlink_to(p.with_name("elsewhere"))),
    # a 3 TB array: reading it must not allocate what the header says
    "a header of an enormous shape": lambda p: p.write_bytes(npy_header((4, 10**6, 10**6)) + bytes(4 * CACHED**2)),
    "a version 2 header of an enormous shape": lambda p: p.write_bytes(npy_header((4, 10**6, 10**6), version=(2, 0))),
    "a header of another size": lambda p: p.write_bytes(npy_bytes(np.zeros((4, CACHED + 1, CACHED), np.uint8))),
    "a header of another channel count": lambda p: p.write_bytes(npy_bytes(np.zeros((3, CACHED, CACHED), np.uint8))),
    "float64 pixels": lambda p: p.write_bytes(npy_bytes(np.zeros((4, CACHED, CACHED)))),
    "a pickled object array": lambda p: p.write_bytes(npy_bytes(np.array([None] * 4, dtype=object), allow_pickle=True)),
    "a Fortran-order array": lambda p: p.write_bytes(npy_bytes(np.asfortranarray(np.zeros((4, CACHED, CACHED),
                                                                                          np.uint8)))),
    "trailing data": lambda p: p.write_bytes(good_entry(p) + b"more"),
    "a cut-off array": lambda p: p.write_bytes(good_entry(p)[:-1]),
    "a header of nested brackets": lambda p: p.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", 8000)
                                                           + b"{" + b"(" * 7998 + b"\n"),
    "a negative side": lambda p: p.write_bytes(npy_header((4, -CACHED, CACHED)) + bytes(4 * CACHED**2)),
    "no header": lambda p: p.write_bytes(b"not an array"),
}


@pytest.mark.parametrize("name", BAD_ENTRIES)
def test_a_bad_cache_entry_never_hangs_or_allocates_and_preprocess_writes_it_again(make_hpa2018, capsys, name):
    data = make_hpa2018(n=4, size=SOURCE)
    folder = preprocess(data, CACHED, workers=1)
    cfg = TrainConfig(data=str(data), arch="cnn", pretrained=False, size=CACHED, bs=2, workers=0)
    originals = list(read_items(data, channels="rgby")["key"])
    entry = folder / "id-0001.npy"
    want = np.load(entry)
    entry.unlink()
    BAD_ENTRIES[name](entry)
    fifos = [entry] if name == "a FIFO" else []

    # the loader's read (the DataLoader's, and the header check before training) refuses it at once
    for header_only in (False, True):
        if name == "a header of another size":  # a valid array: the loader resizes it, the cache check refuses it
            assert read_image(str(entry), CHANNEL_SETS["rgby"], CACHED).shape == (CACHED, CACHED, 4)
            continue
        with pytest.raises(HPAError) as info:
            finishes(lambda: read_image(str(entry), CHANNEL_SETS["rgby"], CACHED, header_only=header_only), fifos)
        assert str(entry) in str(info.value) and "\n" not in str(info.value)

    # training reads the originals and names the entry
    capsys.readouterr()
    ts = finishes(lambda: prepare(cfg), fifos)
    assert list(ts.items["key"]) == originals
    out = capsys.readouterr().out
    assert "has 1 unusable of 4 images" in out and "id-0001.npy" in out and "preprocess" in out

    # preprocess, the command that repairs the cache, writes it again
    finishes(lambda: preprocess(data, CACHED, workers=1), fifos)
    assert "caching 1 of 4 images" in capsys.readouterr().out
    assert entry.is_file() and not entry.is_symlink()
    np.testing.assert_array_equal(np.load(entry), want)
    assert list(prepare(cfg).items["key"]) == [str(folder / f"id-{i:04d}.npy") for i in range(4)]


CACHE_JSON_CASES = {
    "nested brackets": lambda p: p.write_text("[" * 200_000),
    "a FIFO": lambda p: os.mkfifo(p),
    "a link to /dev/zero": lambda p: p.symlink_to("/dev/zero"),
    "a folder": lambda p: p.mkdir(),
    "a list": lambda p: p.write_text("[24, \"rgby\"]"),
    "NaN for the size": lambda p: p.write_text('{"size": NaN, "channels": "rgby"}'),
    "another size": lambda p: p.write_text('{"size": 32, "channels": "rgby"}'),
    "2 MB": lambda p: p.write_text('{"size": 24, "channels": "rgby", "pad": "' + "x" * 2_000_000 + '"}'),
}


@pytest.mark.parametrize("name", CACHE_JSON_CASES)
def test_a_bad_cache_json_makes_training_read_the_originals(make_hpa2018, capsys, name):
    data = make_hpa2018(n=3, size=SOURCE)
    folder = preprocess(data, CACHED, workers=1)
    (folder / "cache.json").unlink()
    CACHE_JSON_CASES[name](folder / "cache.json")
    cfg = TrainConfig(data=str(data), arch="cnn", pretrained=False, size=CACHED, bs=2, workers=0)
    capsys.readouterr()
    ts = finishes(lambda: prepare(cfg), [folder / "cache.json"] if name == "a FIFO" else [])
    assert list(ts.items["key"]) == list(read_items(data, channels="rgby")["key"])
    out = capsys.readouterr().out
    assert "cache.json" in out and "decoding the originals instead" in out
    if name != "a folder":  # preprocess writes it anew (a folder in its place is an error: nothing is removed)
        finishes(lambda: preprocess(data, CACHED, workers=1))
        assert read_json(folder / "cache.json")["count"] == 3


def test_preprocess_on_a_read_only_data_folder_writes_the_per_user_cache(make_z2g, capsys, tmp_path, monkeypatch):
    data = make_z2g(n=2, size=SOURCE)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    os.chmod(data, 0o555)
    try:
        if os.access(data, os.W_OK):  # root writes anyway: test_read_only.py mounts a folder read-only instead
            pytest.skip("this user can write into a folder without write permission (root); test_read_only.py "
                        "covers a read-only folder with a read-only mount and in-process")
        code, out, err = cli_in_process(capsys, "preprocess", "--data", data, "--size", "16")
    finally:
        os.chmod(data, 0o755)
    assert code == 0, err
    assert "is read-only: the per-user cache" in out
    assert len(list((tmp_path / "user-cache").rglob("*.npy"))) == 2
    assert not (data / "cache").exists()


@pytest.mark.parametrize("case", ["cache is a file", "mkdir refused", "cache folder refuses files"])
def test_preprocess_where_the_cache_cannot_be_written_is_one_line_naming_the_folder(make_z2g, capsys, monkeypatch,
                                                                                    case):
    data = make_z2g(n=2, size=SOURCE)
    if case == "cache is a file":
        (data / "cache").write_text("not a folder")
    elif case == "mkdir refused":  # what a read-only data folder gives a user who is not root
        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")
        monkeypatch.setattr(Path, "mkdir", refuse)
    else:  # a cache folder made read-only after an earlier run
        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")
        monkeypatch.setattr(tempfile, "mkstemp", refuse)
    code, out, err = cli_in_process(capsys, "preprocess", "--data", data, "--size", "16")
    assert code == 2 and "Traceback" not in err
    line = err.strip()
    assert "\n" not in line and line.startswith("error: ") and str(data) in line, err
    assert "cannot write the cache folder" in line and "--cache" in line
    assert not list(data.rglob("*.npy"))
