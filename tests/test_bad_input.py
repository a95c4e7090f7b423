"""Every reader fed malformed input: label CSVs, images, config values, learner files, CLI flags.

Each case ends either in the project's own error (``HPAError`` in-process; through the CLI exit
code 2 and one ``error: ...`` line naming the file, line or flag, no traceback) or, where the
input is valid after all, in the right items. A flag value that argparse itself refuses (``--bs 0``)
gets the same single ``error: argument --bs ...`` line. ``tests/test_formats.py`` has the common
CSV and image cases; this module adds breadth and property-based fuzzing. The security section is the
careful attacker's and careless user's: nothing unpickled without ``--trust``, report pages that
escape every value from a file, bounded worker counts, CSV fields and model headers, and outputs
that never write over a command's inputs; after it come the uploads ``serve`` cannot take (refused
before they are read, or named by their own file name), then ``download-hpav18``'s flags and HPAv18
label CSVs, refused before anything is fetched.

Parametrised cases, single-case tests and property-based tests (train.csv text, image bytes,
ids, label text and config values at 150 examples each, model.json at 60) + 2 subprocess tests.
"""
from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import socket
import shutil
import struct
import tempfile
import zlib
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from hpa_fastai.config import TrainConfig
from hpa_fastai.data.images import read_image, verify_images
from hpa_fastai.errors import HPAError
from hpa_fastai.data.layouts import (CHANNEL_SETS, CHANNELS, FORMATS, check_id, detect_format, key_files,
                                     parse_labels, read_items, scan_images)
from hpa_fastai.inference.loading import load_predictor
from .helpers import build_learner
from hpa_fastai.training.run import prepare, validate

from .conftest import write_hpa2018, write_png, write_z2g
from .helpers import cli_in_process, finishes, run_cli

pytestmark = pytest.mark.filterwarnings("ignore:load_learner:UserWarning")  # the --trust cases unpickle on purpose
FUZZ = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def one_line(message: str) -> str:
    assert "\n" not in message and "\r" not in message and len(message.splitlines()) == 1, repr(message)
    return message


def assert_cli_error(code, out, err, *parts):
    """The CLI contract for a bad input: exit 2, one ``error: `` line on stderr naming the culprit."""
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for part in parts:
        assert str(part) in lines[0], (part, lines[0])


def assert_argparse_error(code, err, *parts):
    """argparse's own refusal of a flag value: one ``error: ...`` line, exit 2."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    last = lines[0]
    for part in parts:
        assert part in last, (part, last)


def png_bytes(array=None, mode=None, size=(8, 8), fmt="PNG") -> bytes:
    im = Image.fromarray(np.asarray(array)) if array is not None else Image.new(mode, size)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width: int, height: int, depth: int = 8, colour: int = 2) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0))


RGB_PNG = png_bytes(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
GRAY_PNG = png_bytes(np.random.default_rng(1).integers(0, 256, (8, 8), dtype=np.uint8))
COLOUR_STAIN = np.random.default_rng(2).integers(30, 256, (8, 8, 1), dtype=np.uint8)  # times a stain's colour
NESTED = b"[" * 200_000  # 200 KB of brackets: json.loads raises RecursionError on it


# --- label CSVs ---------------------------------------------------------------------------------

@pytest.fixture
def folders(tmp_path):
    """A z2g folder (img0..img3) and an hpa2018 folder (id-0000..id-0002), plus one odd-named image each."""
    z2g = write_z2g(tmp_path / "z2g", n=4, size=8)
    write_png(z2g / "train" / "画像 1.png", np.zeros((8, 8, 3), np.uint8))
    hpa = write_hpa2018(tmp_path / "hpa2018", n=3, size=8)
    for stain in CHANNELS:
        write_png(hpa / "train" / f"id}}x_{stain}.png", np.zeros((8, 8), np.uint8))
    return {"z2g": z2g, "hpa2018": hpa}


def ok(*rows):
    return ("ok", list(rows))


def err(*parts):
    return ("error", list(parts))


# name: (format, split, CSV bytes, expected): ("ok", [(id, labels)]) or ("error", [parts of the message])
CSV_CASES = {
    # valid after all
    "CR-only line ends": ("z2g", "train", b"Image,Label\rimg0,1\rimg1,2 3\r", ok(("img0", "1"), ("img1", "2 3"))),
    "tabs around fields": ("z2g", "train", b"Image,Label\nimg0\t,\t1\t\n", ok(("img0", "1"))),
    "leading zeros in labels": ("z2g", "train", b"Image,Label\nimg0,01 007\n", ok(("img0", "1 7"))),
    "non-ASCII id with its image": ("z2g", "train", "Image,Label\n画像 1,4\nimg2,0\n".encode(),
                                    ok(("画像 1", "4"), ("img2", "0"))),
    "quoted field with comma in extra column (hpa2018)": (
        "hpa2018", "train", b'Id,Target,Notes\n"id-0000","1 27","a, b"\nid-0002,0,\n', ok(("id-0000", "1 27"), ("id-0002", "0"))),
    "close brace in an id (hpa2018)": ("hpa2018", "train", b"Id,Target\nid}x,5\n", ok(("id}x", "5"))),
    "BOM + CRLF + quotes in sample_submission.csv": (
        "hpa2018", "test", b'\xef\xbb\xbfId,Predicted\r\n"id-0001",\r\nid-0000 , 0\r\n', ok(("id-0001",), ("id-0000",))),
    # errors, naming file and line
    "missing header": ("z2g", "train", b"img0,1\nimg1,2\n", err("train.csv", "expected columns Image,Label")),
    "only blank lines": ("z2g", "train", b"\n\n\r\n", err("train.csv", "empty")),
    "header only, with BOM and CRLF": ("hpa2018", "train", b"\xef\xbb\xbfId,Target\r\n", err("train.csv", "no rows")),
    "NUL in the header": ("z2g", "train", b"Ima\x00ge,Label\nimg0,1\n", err("train.csv", "expected columns")),
    "UTF-16": ("z2g", "train", "Image,Label\nimg0,1\n".encode("utf-16"), err("train.csv", "not a readable CSV")),
    "Latin-1 id": ("z2g", "train", "Image,Label\nimg\xe90,1\n".encode("latin-1"), err("train.csv", "not a readable CSV")),
    "NUL byte in an id": ("z2g", "train", b"Image,Label\nimg0,1\nimg\x001,2\n", err("line 3", "not a plain file name")),
    "newline inside a quoted id": ("z2g", "train", b'Image,Label\nimg0,1\n"img\n1",2\n', err("line 4", "not a plain file name")),
    "line separator U+2028 in an id": ("z2g", "train", "Image,Label\nimg\u20281,2\n".encode(),
                                       err("line 2", "not a plain file name")),
    "absolute path id": ("z2g", "train", b"Image,Label\n/etc/passwd,1\n", err("line 2", "'/etc/passwd'")),
    "Windows path id": ("z2g", "train", b"Image,Label\nC:\\img0,1\n", err("line 2", "not a plain file name")),
    "dot-dot id": ("hpa2018", "train", b"Id,Target\n..,1\n", err("line 2", "not a plain file name")),
    "template field in an id": ("hpa2018", "train", b"Id,Target\nid-{channel},1\n", err("line 2", "not a plain file name")),
    "path id in sample_submission.csv": ("hpa2018", "test", b"Id,Predicted\nid-0000,\n../id-0001,\n",
                                         err("sample_submission.csv, line 3", "'../id-0001'")),
    "duplicated id after stripping": ("z2g", "train", b"Image,Label\nimg1,1\n  img1 ,2\n", err("line 3", "duplicated id 'img1'")),
    "duplicated id, quoted once": ("z2g", "train", b'Image,Label\n"img2",1\nimg2,2\n', err("line 3", "duplicated id 'img2'")),
    "duplicated id in sample_submission.csv": ("hpa2018", "test", b"Id,Predicted\nid-0000,\nid-0000,\n",
                                               err("line 3", "duplicated id")),
    "label 10**30": ("z2g", "train", b"Image,Label\nimg0,1000000000000000000000000000000\n",
                     err("line 2", "outside the vocabulary 0..9")),
    "label of 5000 digits": ("z2g", "train", b"Image,Label\nimg0," + b"9" * 5000 + b"\n", err("line 2", "not an integer")),
    "negative label (hpa2018)": ("hpa2018", "train", b"Id,Target\nid-0000,3 -2\n", err("line 2", "outside the vocabulary 0..27")),
    "label 28 (hpa2018)": ("hpa2018", "train", b"Id,Target\nid-0000,28\n", err("line 2", "outside the vocabulary 0..27")),
    "label with an underscore": ("z2g", "train", b"Image,Label\nimg0,1_0\n", err("line 2", "'1_0' is not an integer")),
    "label with a plus sign": ("z2g", "train", b"Image,Label\nimg0,+3\n", err("line 2", "'+3' is not an integer")),
    "Arabic-Indic digit label": ("z2g", "train", "Image,Label\nimg0,\u0663\n".encode(), err("line 2", "is not an integer")),
    "fullwidth digit label": ("z2g", "train", "Image,Label\nimg0,\uff13\n".encode(), err("line 2", "is not an integer")),
    "hex label": ("z2g", "train", b"Image,Label\nimg0,0x3\n", err("line 2", "'0x3' is not an integer")),
    "exponent label": ("z2g", "train", b"Image,Label\nimg0,1e0\n", err("line 2", "'1e0' is not an integer")),
    "unterminated quote": ("z2g", "train", b'Image,Label\n"img0,1\nimg1,2\n', err("train.csv, line")),
    "extremely long line": ("z2g", "train", b"Image,Label\nimg0," + b"1 " * 100_000 + b"\n",
                            err("train.csv", "not a readable CSV")),
    "extremely long id": ("z2g", "train", b"Image,Label\n" + b"x" * 100_000 + b",1\n", err("line 2", "not found")),
    "id of an image that is a folder": ("z2g", "train", b"Image,Label\nimg9,1\n", err("line 2", "img9.png not found")),
}


@pytest.mark.parametrize("name", CSV_CASES)
def test_label_csv(folders, name):
    fmt, split, content, (outcome, expected) = CSV_CASES[name]
    data = folders[fmt]
    csv_name = "train.csv" if split == "train" else FORMATS[fmt].submission_csv
    (data / csv_name).write_bytes(content)
    (data / "train" / "img9.png").mkdir(exist_ok=True)
    if split == "test":
        shutil.copytree(data / "train", data / "test", dirs_exist_ok=True)
    if outcome == "error":
        with pytest.raises(HPAError) as info:
            fmt_found = detect_format(data) if split == "train" else FORMATS[fmt]
            read_items(data, fmt_found, split=split, labelled=split == "train")
        message = one_line(str(info.value))
        for part in expected:
            assert part in message, (part, message)
        return
    assert split == "test" or detect_format(data).name == fmt
    items = read_items(data, FORMATS[fmt], split=split, labelled=split == "train")
    rows = list(zip(items["id"], items["labels"])) if split == "train" else [(i,) for i in items["id"]]
    assert rows == expected


@pytest.fixture(scope="module")
def fuzz_folder(tmp_path_factory):
    """One folder with both layouts' images: the header of the fuzzed train.csv picks the format."""
    root = tmp_path_factory.mktemp("fuzz")
    write_z2g(root, n=3, size=8)
    write_hpa2018(root / "h", n=2, size=8)
    for f in (root / "h" / "train").iterdir():
        f.rename(root / "train" / f.name)
    return root


IDS = ["img0", "img1", "img2", " img1 ", '"img2"', "id-0000", "id-0001", "../img0", "/abs", "a/b", "a\\b", "",
       "img9", "IMG0", "img0.png", "..", ".", "im\x00g", "画像", "{x}", "}", "C:img0", "img\n1"]
LABELS = ["0", "9", "27", "10", "-1", "1 2", "3 3", '"4 5"', "", "x", "1,2", "1_0", "\u0663", str(10**30), " 5 "]
HEADERS = ["Image,Label", "Label,Image", "\ufeffImage,Label", "Id,Target", "Image,Label,Extra", '"Image","Label"',
           "Id,Target,Id", "Name,Value", ""]
good_row = st.tuples(st.sampled_from(["img0", "img1", "img2", "id-0000", "id-0001"]),
                     st.sampled_from(["0", "1 2", "9", " 5 ", "3 3"])).map(list)
any_row = st.lists(st.sampled_from(IDS) | st.sampled_from(LABELS) | st.text(max_size=6), min_size=1, max_size=3)
csv_text = st.builds(
    lambda header, rows, end, noise: end.join([header] + [",".join(r) for r in rows]) + end + noise,
    st.sampled_from(["Image,Label", "Id,Target"]) | st.sampled_from(HEADERS) | st.text(max_size=12),
    st.lists(good_row | any_row, min_size=1, max_size=6),
    st.sampled_from(["\n", "\r\n", "\r"]),
    st.just("") | st.just("") | st.text(max_size=10))


@settings(max_examples=150, **FUZZ)
@given(content=st.one_of(*[csv_text.map(str.encode)] * 3, st.binary(max_size=80)), skip_bad=st.booleans())
def test_fuzzed_train_csv_loads_well_formed_items_or_raises_hpa_error(fuzz_folder, content, skip_bad):
    data = fuzz_folder
    (data / "train.csv").write_bytes(content)
    try:
        fmt = detect_format(data)
        items = read_items(data, fmt, skip_bad=skip_bad)
    except HPAError as e:
        event("refused")
        one_line(str(e))
        assert "train.csv" in str(e)
        return
    event(f"loaded ({fmt.name})")
    n_classes = {"z2g": 10, "hpa2018": 28}[fmt.name]
    assert len(items) > 0 and items["id"].is_unique
    folder = (data / "train").resolve()
    for image_id, key, labels in zip(items["id"], items["key"], items["labels"]):
        assert check_id(image_id, "x") == image_id
        for f in key_files(key, CHANNEL_SETS[fmt.default_channels]):
            assert Path(f).resolve().parent == folder and os.path.isfile(f)
        ints = [int(t) for t in labels.split()]
        assert ints and ints == sorted(set(ints)) and all(0 <= i < n_classes for i in ints)


@settings(max_examples=150, **FUZZ)
@given(image_id=st.text(alphabet=st.sampled_from(list("ab0._-/\\:{}\x00\n\t \u2028é画")) | st.characters(),
                        max_size=10))
def test_fuzzed_ids_are_accepted_only_as_plain_names_inside_the_folder(image_id):
    folder = Path("/data/train")
    try:
        assert check_id(image_id, "train.csv, line 2") == image_id
    except HPAError as e:
        assert str(e).startswith("train.csv, line 2: ")
        one_line(str(e))
        return
    assert image_id.isprintable() and image_id not in (".", "..")
    for key in (str(folder / f"{image_id}.png"), str(folder / f"{image_id}_{{channel}}.png")):
        for f in key_files(key):
            path = Path(os.path.normpath(f))
            assert path.parent == folder and path.name.startswith(image_id)


@settings(max_examples=150, **FUZZ)
@given(text=st.text(alphabet=st.sampled_from(list("0123456789 -+_.,x\t")) | st.characters(), max_size=12),
       n_classes=st.sampled_from([10, 28]))
def test_fuzzed_label_text_parses_to_class_ids_or_raises_hpa_error(text, n_classes):
    try:
        labels = parse_labels(text, n_classes, "train.csv, line 9")
    except HPAError as e:
        assert str(e).startswith("train.csv, line 9: ")
        return
    tokens = text.split()
    assert all(t.lstrip("-").isascii() and t.lstrip("-").isdigit() for t in tokens)
    assert labels == sorted({int(t) for t in tokens}) and all(0 <= i < n_classes for i in labels)


# --- images -------------------------------------------------------------------------------------

IMAGE_CASES = {
    # name: (content of the file, RGB file (True) or one stain (False), expected: shape or message part)
    "palette PNG as RGB": (lambda: png_bytes(mode="P"), True, "mode is P"),
    "1-bit PNG as RGB": (lambda: png_bytes(mode="1"), True, "mode is 1"),
    "gray+alpha PNG as RGB": (lambda: png_bytes(mode="LA"), True, "mode is LA"),
    "CMYK JPEG as RGB": (lambda: png_bytes(mode="CMYK", fmt="JPEG"), True, "mode is CMYK"),
    "GIF named .png": (lambda: png_bytes(mode="P", fmt="GIF"), True, "mode is P"),
    "JPEG named .png (valid)": (lambda: png_bytes(mode="RGB", fmt="JPEG"), True, (8, 8, 3)),
    "RGBA stain": (lambda: png_bytes(mode="RGBA"), False, "mode is RGBA"),
    "palette stain": (lambda: png_bytes(mode="P"), False, "mode is P"),
    "1-bit stain": (lambda: png_bytes(mode="1"), False, "mode is 1"),
    "gray+alpha stain": (lambda: png_bytes(mode="LA"), False, "mode is LA"),
    "16-bit stain": (lambda: png_bytes(np.full((8, 8), 4000, np.uint16)), False, "mode is I;16"),
    "PNG signature only": (lambda: RGB_PNG[:8], True, "not a readable image"),
    "PNG cut in the header": (lambda: RGB_PNG[:20], True, "not a readable image"),
    "PNG without end chunk": (lambda: RGB_PNG[:-12], True, "no end chunk"),
    "corrupt pixel data": (lambda: png_header(8, 8) + chunk(b"IDAT", b"garbage") + chunk(b"IEND", b""), True, "corrupt"),
    "zero width": (lambda: png_header(0, 8) + chunk(b"IEND", b""), True, "not a readable image"),
    "invalid colour type": (lambda: png_header(8, 8, 8, 7) + chunk(b"IEND", b""), True, "not a readable image"),
    "decompression bomb header": (lambda: png_header(100_000, 100_000) + chunk(b"IEND", b""), True, "decompression bomb"),
    "text file named .png": (lambda: b"Image,Label\nimg0,1\n", False, "not a readable image"),
    "zero-byte stain": (lambda: b"", False, "not a readable image"),
    # HPAv18 stain files come as colour JPEGs: the stain in its colour on black
    "colour stain JPEG (valid)": (lambda: png_bytes(COLOUR_STAIN * np.uint8([0, 0, 1]), fmt="JPEG"), False, (8, 8, 4)),
    "colour stain PNG (valid)": (lambda: png_bytes(COLOUR_STAIN * np.uint8([0, 0, 1])), False, (8, 8, 4)),
    "gray saved as RGB (valid)": (lambda: png_bytes(COLOUR_STAIN * np.uint8([1, 1, 1])), False, (8, 8, 4)),
    "colour stain in another stain's colour": (lambda: png_bytes(COLOUR_STAIN * np.uint8([0, 1, 0])), False,
                                               "not a blue stain file"),
    "colour picture as a stain": (lambda: RGB_PNG, False, "not a blue stain file"),
    "colour stain JPEG cut short": (lambda: png_bytes(COLOUR_STAIN * np.uint8([0, 0, 1]), fmt="JPEG")[:-10], False,
                                    "truncated or corrupt"),
}


@pytest.mark.parametrize("name", IMAGE_CASES)
def test_image(tmp_path, name):
    make, rgb, expected = IMAGE_CASES[name]
    if rgb:
        key = path = tmp_path / "img.png"
        channels = CHANNEL_SETS["rgb"]
    else:
        for stain in CHANNELS:
            (tmp_path / f"img_{stain}.png").write_bytes(GRAY_PNG)
        key, path = tmp_path / "img_{channel}.png", tmp_path / "img_blue.png"
        channels = CHANNEL_SETS["rgby"]
    path.write_bytes(make())
    outcomes = []
    for header_only in (True, False):  # the quick check of every image and the full decode
        try:
            outcomes.append(read_image(str(key), channels, size=None, header_only=header_only).shape)
        except HPAError as e:
            outcomes.append(one_line(str(e)))
    if isinstance(expected, tuple):
        assert outcomes == [expected, expected]
        return
    # each check either decodes the right shape or refuses naming the file; one of them refuses
    # (a missing end chunk is only the quick check's business, broken pixels only the decode's)
    refused = [o for o in outcomes if isinstance(o, str)]
    assert all(o == (8, 8, len(channels)) for o in outcomes if not isinstance(o, str)), outcomes
    assert refused and all(o.startswith(str(path)) for o in refused), outcomes
    assert any(expected in o for o in refused), outcomes


def test_image_that_is_a_folder_or_missing(tmp_path):
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(HPAError, match="dir.png: not a readable image"):
        read_image(str(tmp_path / "dir.png"))
    with pytest.raises(HPAError, match="gone.png: image file not found"):
        read_image(str(tmp_path / "gone.png"))
    keys = [str(tmp_path / "gone.png"), str(tmp_path / "dir.png")]
    assert sorted(verify_images(pd.DataFrame({"key": keys}), "rgb", deep=True)) == sorted(keys)
    with pytest.raises(HPAError, match="no images"):
        scan_images(tmp_path, "rgb")  # dir.png is a folder, not an image


def mutated(seed: bytes):
    """A valid PNG cut, overwritten or extended somewhere."""
    return st.tuples(st.sampled_from(["cut", "overwrite", "insert"]), st.integers(0, len(seed)),
                     st.binary(min_size=1, max_size=8)).map(lambda m: (
                         seed[:m[1]] if m[0] == "cut" else
                         seed[:m[1]] + m[2] + seed[m[1] + len(m[2]):] if m[0] == "overwrite" else
                         seed[:m[1]] + m[2] + seed[m[1]:]))


@settings(max_examples=150, **FUZZ)
@given(content=mutated(RGB_PNG) | mutated(GRAY_PNG) | st.binary(max_size=64), stain=st.booleans(),
       header_only=st.booleans(), size=st.sampled_from([None, 8, 12]))
def test_fuzzed_image_bytes_decode_to_the_right_shape_or_raise_hpa_error(content, stain, header_only, size):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if stain:
            for c in CHANNELS:
                (tmp / f"x_{c}.png").write_bytes(GRAY_PNG)
            key, bad, channels = str(tmp / "x_{channel}.png"), tmp / "x_green.png", CHANNEL_SETS["rgby"]
        else:
            key, bad, channels = str(tmp / "x.png"), tmp / "x.png", CHANNEL_SETS["rgb"]
        bad.write_bytes(content)
        try:
            arr = read_image(key, channels, size=size, header_only=header_only)
            event("decoded")
        except HPAError as e:
            event("refused")
            assert str(e).startswith(str(bad)) or str(e).startswith(str(tmp / "x_red.png")), str(e)
            one_line(str(e))
            return
        assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == len(channels)
        if not header_only:
            assert arr.shape[:2] == ((size, size) if size else arr.shape[:2])


# --- configuration values -----------------------------------------------------------------------

CONFIG_CASES = [
    ({"lr": "nan"}, "--lr"), ({"lr": "inf"}, "--lr"), ({"lr": "-1e-3"}, "--lr"), ({"lr": "1e400"}, "--lr"),
    ({"lr": "fast"}, "--lr"), ({"lr": ""}, "--lr"),
    ({"valid_pct": 1.0}, "--valid-pct"), ({"valid_pct": 0.0}, "--valid-pct"), ({"valid_pct": math.nan}, "--valid-pct"),
    ({"valid_pct": -0.1}, "--valid-pct"),
    ({"fold": 7, "n_folds": 5}, "--fold"), ({"fold": -1, "n_folds": 5}, "--fold"), ({"n_folds": 1}, "--n-folds"),
    ({"n_folds": -2}, "--n-folds"),
    ({"threshold": math.nan}, "--threshold"), ({"threshold": 1.0}, "--threshold"), ({"threshold": -0.5}, "--threshold"),
    ({"epochs": 0}, "--epochs"), ({"epochs": math.nan}, "--epochs"), ({"epochs": "ten"}, "--epochs"),
    ({"epochs": True}, "--epochs"),
    ({"bs": 0}, "--bs"), ({"bs": -8}, "--bs"), ({"bs": 2.5}, "--bs"),
    ({"size": 4}, "--size"), ({"size": 10**6}, "--size"), ({"size": math.inf}, "--size"),
    ({"seed": -1}, "--seed"), ({"seed": 2**40}, "--seed"),
    ({"focal_gamma": math.nan}, "--focal-gamma"), ({"focal_gamma": -1.0}, "--focal-gamma"),
    ({"focal_gamma": math.inf}, "--focal-gamma"),
    ({"patience": 0}, "--patience"), ({"workers": -1}, "--workers"), ({"freeze_epochs": -1}, "--freeze-epochs"),
    ({"lr_find_iters": 0}, "--lr-find-iters"),
    ({"arch": "resnet1000"}, "--arch"), ({"arch": None}, "--arch"), ({"channels": "rgbx"}, "--channels"),
    ({"loss": "hinge"}, "--loss"), ({"monitor": "accuracy"}, "--monitor"), ({"precision": "fp8"}, "--precision"),
    ({"log": "comet"}, "--log"), ({"log": ["none", "wandb"]}, "--log"), ({"log": []}, "--log"),
    ({"log": [3]}, "--log"), ({"weights": "/no/such/weights.pth"}, "--weights"),
    ({"duplicates": "/no/such/duplicates.csv"}, "--duplicates"), ({"cache": " "}, "--cache"),
    ({"cache": "a\x1b[2Jb"}, "--cache"), ({"callback": "no_colon"}, "--callback"), ({"callback": ":Cb"}, "--callback"),
    ({"callback": "mod:not-a-name"}, "--callback"), ({"callback": ["mod:Cb", 5]}, "--callback"),
    ({"loss": "asl", "asl_gamma_neg": math.nan}, "--asl-gamma-neg"), ({"asl_gamma_pos": -1.0}, "--asl-gamma-pos"),
    ({"asl_clip": 0.7}, "--asl-clip"), ({"asl_clip": -0.1}, "--asl-clip"),
    ({"oversample": True, "oversample_cap": 0.5}, "--oversample-cap"), ({"oversample_cap": math.inf}, "--oversample-cap"),
    ({"progressive_size": 4}, "--progressive-size"), ({"size": 64, "progressive_size": 64}, "--progressive-size"),
    ({"progressive_epochs": 2}, "--progressive-epochs"),
    ({"progressive_size": 16, "progressive_epochs": 10, "epochs": 10}, "--progressive-epochs"),
    # the plain cnn pools four times: below 16 px its last pooling has nothing left
    ({"size": 12}, "--size 12 is below the 16 pixels cnn takes"), ({"size": 15}, "--size 15"),
    ({"size": 32, "progressive_size": 8}, "--progressive-size 8 is below the 16 pixels cnn takes"),
    ({"ema": True, "swa": True}, "--ema and --swa"), ({"swa_epochs": 2}, "--swa-epochs needs --swa"),
    ({"swa": True, "swa_epochs": 0}, "--swa-epochs"), ({"swa": True, "swa_epochs": 11, "epochs": 10}, "--swa-epochs"),
    ({"accumulate": 0}, "--accumulate"), ({"accumulate": 10**6}, "--accumulate"), ({"accumulate": 2.5}, "--accumulate"),
    ({"mixup": True, "cutmix": True}, "--mixup and --cutmix"), ({"mixup": True, "bs": 1}, "--mixup"),
    ({"cutmix": True, "bs": 1}, "--cutmix"), ({"ema": "yes"}, "--ema"),
    ({"weights": "/no/such/run"}, "--weights"),
]


@pytest.mark.parametrize("overrides,flag", CONFIG_CASES, ids=[str(c[0]) for c in CONFIG_CASES])
def test_config_value(overrides, flag):
    cfg = TrainConfig(**{"data": "/nowhere", "arch": "cnn", "pretrained": False, **overrides})
    with pytest.raises(HPAError) as info:
        validate(cfg)
    assert one_line(str(info.value)).startswith(flag)


def test_a_size_the_architecture_cannot_take_is_refused_before_any_run_folder(make_z2g, tmp_path, capsys):
    data = make_z2g(n=6, size=12)
    common = ["--data", data, "--arch", "cnn", "--no-pretrained", "--epochs", "1", "--bs", "2", "--lr", "1e-3",
              "--out", tmp_path / "runs"]
    assert_cli_error(*cli_in_process(capsys, *common, "--size", "8"), "--size 8", "16 pixels")
    # the automatic size is the images' own, 12 px: the message says what to pass instead
    assert_cli_error(*cli_in_process(capsys, *common), "12x12", "--size 16 or more")
    assert_cli_error(*cli_in_process(capsys, "lr-find", *common, "--size", "15"), "--size 15", "16 pixels")
    assert not (tmp_path / "runs").exists()
    code, out, err = cli_in_process(capsys, *common, "--size", "16")  # what the message advises trains
    assert code == 0, err


@pytest.mark.parametrize("overrides,message", [
    ({"bs": 100000}, "--bs 100000 is larger than the 7 training images"),
    ({"n_folds": 100, "bs": 2}, "--n-folds 100 is more than the 8 images"),
    ({"valid_pct": 0.05, "bs": 2}, "--valid-pct 0.05 leaves none of the 8 images for validation"),
])
def test_config_value_too_large_for_the_data(make_z2g, overrides, message):
    prep = prepare(TrainConfig(data=str(make_z2g(n=8, size=16)), arch="cnn", pretrained=False, **overrides))
    with pytest.raises(HPAError, match=message):
        build_learner(prep)


def test_progressive_size_not_below_the_automatic_size_is_refused_before_training(make_z2g, tmp_path, capsys):
    code, out, err = cli_in_process(capsys, "--data", make_z2g(n=8, size=16), "--arch", "cnn", "--no-pretrained",
                                    "--progressive-size", "16", "--out", tmp_path / "runs")
    assert_cli_error(code, out, err, "--progressive-size 16 must be smaller than the image size 16")
    assert not (tmp_path / "runs").exists()


ANY_VALUE = (st.integers(-10**12, 10**12) | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=5)
             | st.none() | st.booleans() | st.lists(st.integers(), max_size=2))
CONFIG_FUZZ = {
    "epochs": st.integers(-2, 5), "bs": st.integers(-2, 64), "size": st.none() | st.integers(-1, 10**5),
    "lr": st.sampled_from(["auto", "1e-3", "0", "-1", "nan", "inf", "1e400", "x", " 3e-4 "]),
    "lr_find_iters": st.none() | st.integers(-1, 200), "seed": st.integers(-2, 2**33),
    "valid_pct": st.floats(-1, 2) | st.sampled_from([math.nan, math.inf]), "n_folds": st.integers(-1, 6),
    "fold": st.integers(-1, 7), "patience": st.integers(-1, 5), "threshold": st.floats(allow_nan=True),
    "workers": st.none() | st.integers(-2, 4), "freeze_epochs": st.integers(-2, 2),
    "focal_gamma": st.floats(allow_nan=True, allow_infinity=True), "loss": st.sampled_from(["bce", "focal", "hinge"]),
    "monitor": st.sampled_from(["f1_macro", "valid_loss", "auc"]), "channels": st.sampled_from(["auto", "rgb", "rgbx"]),
    "precision": st.sampled_from(["auto", "fp32", "fp4"]), "arch": st.sampled_from(["cnn", "resnet18", "nope"]),
}


@settings(max_examples=150, **FUZZ)
@given(values=st.fixed_dictionaries({}, optional=CONFIG_FUZZ),
       wrong=st.dictionaries(st.sampled_from(sorted(CONFIG_FUZZ)), ANY_VALUE, max_size=2))
def test_fuzzed_config_values_validate_or_raise_hpa_error_naming_the_flag(values, wrong):
    cfg = TrainConfig(**{"arch": "cnn", **values, **wrong})
    try:
        validate(cfg)
        event("valid")
    except HPAError as e:
        assert one_line(str(e)).startswith("--"), str(e)
        return
    assert type(cfg.epochs) is int and cfg.epochs >= 1 and type(cfg.bs) is int and cfg.bs >= 1
    assert cfg.size is None or (type(cfg.size) is int and 8 <= cfg.size <= 4096)
    assert cfg.lr == "auto" or (math.isfinite(float(cfg.lr)) and float(cfg.lr) > 0)
    assert 0 < cfg.valid_pct < 1 and 0 < cfg.threshold < 1 and 0 <= cfg.seed < 2**32
    assert cfg.n_folds == 0 or (cfg.n_folds >= 2 and 0 <= cfg.fold < cfg.n_folds)
    assert math.isfinite(cfg.focal_gamma) and cfg.focal_gamma >= 0 and cfg.freeze_epochs >= 0
    assert cfg.loss in ("bce", "focal") and cfg.channels in ("auto", "rgb", "rgby")


# --- learner files ------------------------------------------------------------------------------

def write_safe_model(folder: Path, fmt: str = "z2g", channels: str = "rgb", size: int = 16) -> Path:
    """A run folder's model.json + model.safetensors for an untrained cnn: enough to load and predict."""
    from safetensors.torch import save_file

    from hpa_fastai.models import create_model
    from hpa_fastai.data.vocab import class_names, vocab_for

    folder.mkdir(parents=True, exist_ok=True)
    n_in, n_classes = len(CHANNEL_SETS[channels]), len(vocab_for(fmt))
    torch.manual_seed(0)
    model, _ = create_model("cnn", n_in, n_classes, pretrained=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    meta = {"arch": "cnn", "format": fmt, "channels": channels, "n_in": n_in, "size": size, "mean": [0.5] * n_in,
            "std": [0.25] * n_in, "vocab": vocab_for(fmt), "names": class_names(fmt),
            "thresholds": [0.5] * n_classes, "loss": "bce", "focal_gamma": 2.0}
    (folder / "model.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture(scope="module")
def safe_model(tmp_path_factory):
    return write_safe_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def rgby_model(tmp_path_factory):
    return write_safe_model(tmp_path_factory.mktemp("rgby"), "hpa2018", "rgby")


def edit_meta(**changes):
    def mutate(run):
        meta = json.loads((run / "model.json").read_text())
        meta.update(changes)
        for key in [k for k, v in changes.items() if v is ...]:
            del meta[key]
        (run / "model.json").write_text(json.dumps(meta))
        return run
    return mutate


def write(name, content: bytes, target=None):
    def mutate(run):
        (run / name).write_bytes(content(run) if callable(content) else content)
        return run / (target or "")
    return mutate


def other_arch_weights(run):
    from safetensors.torch import save

    from hpa_fastai.models import create_model

    return save({k: v.contiguous() for k, v in create_model("cnn", 4, 10, pretrained=False)[0].state_dict().items()})


def nan_weights(value):
    def make(run):
        from safetensors.torch import load_file, save

        state = load_file(str(run / "model.safetensors"))
        state["0.0.weight"] = torch.full_like(state["0.0.weight"], value)
        return save(state)
    return make


LEARNER_CASES = {
    # name: (mutation of a copy of the good run folder returning the path to load, message parts)
    "model.json is a number": (write("model.json", b"5"), ["model.json", "a JSON int, not an object"]),
    "model.json is null": (write("model.json", b"null"), ["model.json", "not an object"]),
    "model.json is a list of the keys": (write("model.json", json.dumps(
        ["arch", "channels", "size", "mean", "std", "vocab", "names", "thresholds", "format"]).encode()),
        ["model.json", "not an object"]),
    "model.json is not UTF-8": (write("model.json", b"\xff\xfe{}"), ["model.json", "not valid JSON"]),
    "model.json is empty": (write("model.json", b""), ["model.json", "not valid JSON"]),
    "model.json lacks thresholds": (edit_meta(thresholds=...), ["model.json", "missing thresholds"]),
    "arch is a number": (edit_meta(arch=5), ["'arch'"]),
    "unknown arch": (edit_meta(arch="resnet1000"), ["'arch'", "resnet1000"]),
    "channels is a number": (edit_meta(channels=3), ["'channels'"]),
    "format unknown": (edit_meta(format="hpa2021"), ["'format'"]),
    "size is text": (edit_meta(size="big"), ["'size'"]),
    "size is huge": (edit_meta(size=10**9), ["'size'"]),
    "size is true": (edit_meta(size=True), ["'size'"]),
    "size below what the arch takes": (edit_meta(size=12), ["model.json", "'size' 12 is below the 16 pixels cnn takes"]),
    "vocab too short": (edit_meta(vocab=["0"]), ["'vocab'"]),
    "names is a string": (edit_meta(names="Mitochondria"), ["'names'"]),
    "threshold NaN": (edit_meta(thresholds=[math.nan] * 10), ["'thresholds'"]),
    "threshold above 1": (edit_meta(thresholds=[0.5] * 9 + [2]), ["'thresholds'"]),
    "mean for 4 channels on an RGB model": (edit_meta(mean=[0.5] * 4), ["'mean'"]),
    "std of zero": (edit_meta(std=[0, 0.2, 0.2]), ["'std'"]),
    "loss unknown": (edit_meta(loss="hinge"), ["'loss'"]),
    "rgby model.json over RGB weights": (edit_meta(channels="rgby", mean=[0.5] * 4, std=[0.2] * 4),
                                         ["model.safetensors", "do not fit cnn"]),
    "safetensors truncated": (write("model.safetensors", lambda r: (r / "model.safetensors").read_bytes()[:500]),
                              ["model.safetensors", "cannot read weights"]),
    "safetensors zero bytes": (write("model.safetensors", b""), ["model.safetensors", "cannot read weights"]),
    "safetensors huge header length": (write("model.safetensors", b"\xff" * 8 + b"{}"),
                                       ["model.safetensors", "cannot read weights"]),
    "safetensors of another shape": (write("model.safetensors", other_arch_weights), ["model.safetensors", "do not fit"]),
    "safetensors given, model.json missing": (lambda r: ((r / "model.json").unlink(), r / "model.safetensors")[1],
                                             ["model.json", "cannot read the model description"]),
    "export.pkl zero bytes (--trust)": (write("export.pkl", b"", "export.pkl"), ["export.pkl", "not a loadable"]),
    "export.pkl garbage (--trust)": (write("export.pkl", b"\x80\x04garbage", "export.pkl"), ["export.pkl", "not a loadable"]),
    "export.pkl holds a dict (--trust)": (lambda r: (torch.save({"a": 1}, r / "export.pkl"), r / "export.pkl")[1],
                                          ["export.pkl", "not a loadable"]),
    "folder with neither export": (lambda r: ([f.unlink() for f in r.iterdir()], r)[1], ["no model.json"]),
    "unknown suffix": (write("model.bin", b"x", "model.bin"), ["expected a run folder"]),
    "all-NaN weights": (write("model.safetensors", nan_weights(math.nan)),
                        ["model.safetensors", "'0.0.weight'", "not finite"]),
    "infinite weights": (write("model.safetensors", nan_weights(math.inf)), ["model.safetensors", "not finite"]),
    "std of 1e-300": (edit_meta(std=[1e-300] * 3), ["'std'"]),
    "std of 1e6": (edit_meta(std=[1e6] * 3), ["'std'"]),
    "mean of 1e6": (edit_meta(mean=[1e6] * 3), ["'mean'"]),
    "safetensors header not JSON": (write("model.safetensors", struct.pack("<Q", 4) + b"{{{{"),
                                    ["model.safetensors", "cannot read weights"]),
    "safetensors header length past the end": (write("model.safetensors", struct.pack("<Q", 10**6) + b"{}"),
                                               ["model.safetensors", "cannot read weights"]),
    "safetensors header of nested brackets": (write("model.safetensors", struct.pack("<Q", len(NESTED)) + NESTED),
                                              ["model.safetensors", "cannot read weights", "nested too deeply"]),
    "safetensors a FIFO": (lambda r: ((r / "model.safetensors").unlink(), os.mkfifo(r / "model.safetensors"),
                                      r / "model.json")[-1], ["model.safetensors", "not a regular file"]),
    "model.json of nested brackets": (write("model.json", NESTED), ["model.json", "not valid JSON", "nested too deeply"]),
    "model.json a FIFO": (lambda r: ((r / "model.json").unlink(), os.mkfifo(r / "model.json"), r / "model.json")[-1],
                          ["model.json", "not a regular file"]),
    "model.json a link to /dev/zero": (lambda r: ((r / "model.json").unlink(), (r / "model.json").symlink_to(
        "/dev/zero"), r / "model.json")[-1], ["model.json", "not a regular file"]),
    "model.json of 2 MB": (edit_meta(padding="x" * 2_000_000), ["model.json", "over the 1048576"]),
    "model.json with a number of 5000 digits": (write("model.json", b'{"size": ' + b"9" * 5000 + b"}"),
                                                ["model.json", "not valid JSON"]),
    "Infinity as a mean": (write("model.json", lambda r: (r / "model.json").read_bytes().replace(
        b'"mean": [0.5, 0.5, 0.5]', b'"mean": [Infinity, 0.5, 0.5]')), ["model.json", "'mean'"]),
    "1e999 as a std": (write("model.json", lambda r: (r / "model.json").read_bytes().replace(
        b'"std": [0.25, 0.25, 0.25]', b'"std": [1e999, 0.25, 0.25]')), ["model.json", "'std'"]),
}


@pytest.mark.parametrize("name", LEARNER_CASES)
def test_learner_file(safe_model, tmp_path, name):
    mutate, parts = LEARNER_CASES[name]
    run = tmp_path / "run"
    shutil.copytree(safe_model, run)
    path = mutate(run)
    with pytest.raises(HPAError) as info:  # never blocked by a FIFO in a file's place
        finishes(lambda: load_predictor(path, trust=True, cpu=True), [run / "model.json", run / "model.safetensors"])
    message = one_line(str(info.value))
    for part in parts:
        assert part in message, (part, message)


def test_the_good_model_loads_and_predicts(safe_model, make_z2g):
    result = load_predictor(safe_model, cpu=True).predict(make_z2g(n=1, size=16) / "train" / "img0.png")
    assert len(result["all_probabilities"]) == 10


def test_empty_export_pkl_in_runs_is_refused_without_trust(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "r").mkdir(parents=True)
    (tmp_path / "runs" / "r" / "export.pkl").write_bytes(b"")
    with pytest.raises(HPAError, match="refusing to unpickle"):  # inside ./runs is no longer trusted
        load_predictor("runs/r", cpu=True)
    with pytest.raises(HPAError, match="not a loadable fastai learner"):
        load_predictor("runs/r", trust=True, cpu=True)
    (tmp_path / "elsewhere.pkl").write_bytes(b"")
    with pytest.raises(HPAError, match="refusing to unpickle"):
        load_predictor(tmp_path / "elsewhere.pkl", cpu=True)


json_value = st.recursive(st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats() | st.text(max_size=6),
                          lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                          max_leaves=12)


floats = st.floats(allow_nan=True, allow_infinity=True)
PLAUSIBLE_META = {  # values near the valid ones, so that some fuzzed files load
    "size": st.integers(-5, 5000), "arch": st.sampled_from(["cnn", "resnet18", "timm:no_such_model", "CNN"]),
    "thresholds": st.lists(st.floats(-0.5, 1.5) | floats, min_size=9, max_size=11),
    "mean": st.lists(st.floats(-1e3, 1e3) | floats, min_size=2, max_size=4),
    "std": st.lists(st.floats(-1, 1e3) | floats, min_size=2, max_size=4), "focal_gamma": floats,
    "loss": st.sampled_from(["bce", "focal", "mse"]), "format": st.sampled_from(["z2g", "hpa2018", "Z2G"]),
    "channels": st.sampled_from(["rgb", "rgby", "RGB"]), "names": st.lists(st.text(max_size=3), min_size=9, max_size=11),
}


@settings(max_examples=60, **FUZZ)
@given(data=st.data())
def test_fuzzed_model_json_loads_or_raises_hpa_error(safe_model, data):
    good = json.loads((safe_model / "model.json").read_text())
    keys = data.draw(st.lists(st.sampled_from(sorted(good)), max_size=3, unique=True))
    changes = {k: data.draw(PLAUSIBLE_META.get(k, json_value) | json_value | st.just(...)) for k in keys}
    meta = data.draw(st.just({k: v for k, v in {**good, **changes}.items() if v is not ...}) | json_value)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        shutil.copy(safe_model / "model.safetensors", run)
        (run / "model.json").write_text(json.dumps(meta))
        try:
            pred = load_predictor(run, cpu=True)
            event("loaded")
        except HPAError as e:
            event("refused")
            assert str(run) in one_line(str(e))
            return
    assert isinstance(meta, dict) and pred.channels == "rgb" and 1 <= pred.size <= 4096
    assert pred.thresholds.shape == (10,) and np.all((pred.thresholds >= 0) & (pred.thresholds <= 1))


# --- --resume -----------------------------------------------------------------------------------

def resume_folder(run, make_z2g, config, checkpoint):
    data = make_z2g(n=4, size=16)
    run.mkdir()
    good = {"data": str(data), "arch": "cnn", "epochs": 1, "bs": 2, "lr": "1e-3", "pretrained": False,
            "size": 16, "channels": "rgb", "workers": 0, "lr_used": 1e-3, "pretrained_used": False}
    text = config(good) if callable(config) else config
    if text == "fifo":
        os.mkfifo(run / "config.json")
    else:
        (run / "config.json").write_text(text if isinstance(text, str) else json.dumps(text))
    if isinstance(checkpoint, bytes):
        (run / "checkpoint.pth").write_bytes(checkpoint)
    else:
        torch.save(checkpoint, run / "checkpoint.pth")


FULL_CHECKPOINT = {k: 0 for k in ("model", "opt", "phase", "epochs_done", "rng", "smooth_loss", "history")}
RESUME_CASES = {
    "config.json not JSON": ("{oops", FULL_CHECKPOINT, ["config.json", "not valid JSON"]),
    "config.json of nested brackets": (NESTED.decode(), FULL_CHECKPOINT, ["config.json", "nested too deeply"]),
    "config.json with a NaN learning rate": (lambda c: json.dumps({**c, "lr_used": math.nan}), FULL_CHECKPOINT,
                                             ["config.json", "NaN is not a finite number"]),
    "config.json a FIFO": ("fifo", FULL_CHECKPOINT, ["no config.json"]),
    "config.json a list": ("[1, 2]", FULL_CHECKPOINT, ["config.json", "not the config of a run"]),
    "config.json without lr_used": (lambda c: {k: v for k, v in c.items() if k != "lr_used"}, FULL_CHECKPOINT,
                                    ["config.json", "lr_used"]),
    "config.json with a text epoch count": (lambda c: {**c, "epochs": "ten"}, FULL_CHECKPOINT, ["--epochs must be int"]),
    "config.json with an unknown arch": (lambda c: {**c, "arch": "resnet1000"}, FULL_CHECKPOINT, ["--arch"]),
    "checkpoint zero bytes": (lambda c: c, b"", ["checkpoint.pth", "unreadable checkpoint"]),
    "checkpoint garbage": (lambda c: c, b"PK\x03\x04garbage", ["checkpoint.pth", "unreadable checkpoint"]),
    "checkpoint truncated": (lambda c: c, "truncated", ["checkpoint.pth", "unreadable checkpoint"]),
    "checkpoint a list": (lambda c: c, [1, 2], ["checkpoint.pth", "not a checkpoint"]),
    "checkpoint without its phase": (lambda c: c, {k: v for k, v in FULL_CHECKPOINT.items() if k != "phase"},
                                     ["checkpoint.pth", "missing phase"]),
    # the optimizer state of fastai's Adam, which earlier versions trained with
    "checkpoint from fastai's Adam": (lambda c: c, {**FULL_CHECKPOINT, "opt": {"state": [], "hypers": [{"lr": 1e-3}]}},
                                      ["checkpoint.pth", "earlier version", "start the run again"]),
}


@pytest.mark.parametrize("name", RESUME_CASES)
def test_resume_folder(make_z2g, tmp_path, capsys, name):
    config, checkpoint, parts = RESUME_CASES[name]
    if checkpoint == "truncated":
        buf = io.BytesIO()
        torch.save({"model": {"w": torch.zeros(1000)}, **FULL_CHECKPOINT}, buf)
        checkpoint = buf.getvalue()[:len(buf.getvalue()) // 2]
    run = tmp_path / "run"
    resume_folder(run, make_z2g, config, checkpoint)
    before = sorted(p.name for p in run.iterdir())
    assert_cli_error(*finishes(lambda: cli_in_process(capsys, "--resume", run), [run / "config.json"]), *parts)
    assert sorted(p.name for p in run.iterdir()) == before  # nothing written into the run folder


# --- CLI flags ----------------------------------------------------------------------------------

@pytest.mark.parametrize("args,parts", [
    (["--bs", "0"], ["--bs"]), (["--bs", "-1"], ["--bs"]), (["--bs", "abc"], ["--bs"]),
    (["--epochs", "1.5"], ["--epochs"]), (["--size", "0"], ["--size"]), (["--seed", "x"], ["--seed"]),
    (["--valid-pct", "half"], ["--valid-pct"]), (["--channels", "rgbx"], ["--channels"]),
    (["--frobnicate"], ["--frobnicate"]), (["predict", "--bs", "0"], ["--bs"]),
    (["predict", "--threshold", "high"], ["--threshold"]),
])
def test_flag_refused_by_the_parser(capsys, args, parts):
    code, _, err = cli_in_process(capsys, *args)
    assert_argparse_error(code, err, *parts)


@pytest.mark.parametrize("args,flag", [
    (["--lr", "nan"], "--lr"), (["--lr", "inf"], "--lr"), (["--lr", "-0.1"], "--lr"), (["--valid-pct", "1"], "--valid-pct"),
    (["--valid-pct", "nan"], "--valid-pct"), (["--fold", "7", "--n-folds", "5"], "--fold"),
    (["--n-folds", "1"], "--n-folds"), (["--threshold", "nan"], "--threshold"), (["--seed", "-1"], "--seed"),
    (["--focal-gamma", "nan"], "--focal-gamma"), (["--size", "100000"], "--size"), (["--workers", "-1"], "--workers"),
    (["--weights", "/no/such.pth"], "--weights"), (["lr-find", "--lr", "inf"], "--lr"),
    (["--ema", "--swa"], "--ema and --swa"), (["--accumulate", "0"], "--accumulate"),
    (["--mixup", "--cutmix"], "--mixup and --cutmix"),
    (["cv", "--n-folds", "1"], "--n-folds"),
    pytest.param(["--precision", "fp16"], "--precision fp16 needs a CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is refused only without CUDA")),
])
def test_flag_refused_before_any_data_is_read(capsys, tmp_path, args, flag):
    code, out, err = cli_in_process(capsys, *args, "--data", tmp_path / "nowhere", "--arch", "cnn", "--no-pretrained",
                                    "--out", tmp_path / "runs")
    assert_cli_error(code, out, err, flag)
    assert not (tmp_path / "runs").exists()


def _weights_case(kind: str, folder: Path) -> Path:
    from hpa_fastai.modelfile import save
    from hpa_fastai.models import create_model

    if kind == "pickle":
        (folder / "export.pkl").write_bytes(b"\x80\x04N.")
        return folder / "export.pkl"
    if kind == "folder without model.json":
        (folder / "half").mkdir()
        return folder / "half"
    if kind == "nothing in common":
        torch.save({"encoder.weight": torch.zeros(2, 2)}, folder / "other.pth")
        return folder / "other.pth"
    model, _ = create_model("resnet18", 3, 10, pretrained=False)  # a run of another architecture than --arch
    save(model.state_dict(), {"arch": "resnet18", "format": "z2g", "channels": "rgb", "n_in": 3, "size": 16,
                              "mean": [0.5] * 3, "std": [0.2] * 3, "vocab": [str(i) for i in range(10)],
                              "names": [f"c{i}" for i in range(10)], "thresholds": [0.5] * 10}, folder / "run")
    return folder / "run"


@pytest.mark.parametrize("kind, parts", [
    ("pickle", ["a pickle is never loaded as starting weights"]),
    ("folder without model.json", ["a folder without model.json"]),
    ("nothing in common", ["no parameters in common with cnn"]),
    ("another architecture's run", ["a run of resnet18, and this run's --arch is cnn: pass --arch resnet18"]),
])
def test_weights_that_cannot_start_this_model_are_one_line(make_z2g, tmp_path, capsys, kind, parts):
    weights = _weights_case(kind, tmp_path)
    code, out, err = cli_in_process(capsys, "--data", make_z2g(n=8, size=16), "--arch", "cnn", "--weights", weights,
                                    "--epochs", "1", "--bs", "2", "--lr", "1e-3", "--out", tmp_path / "runs")
    assert_cli_error(code, out, err, f"--weights {weights}", *parts)


def test_batch_size_larger_than_the_data_set_marks_the_run_failed(make_z2g, tmp_path, capsys):
    data = make_z2g(n=8, size=16)
    code, out, err = cli_in_process(capsys, "--data", data, "--arch", "cnn", "--no-pretrained", "--bs", "100000",
                                    "--lr", "1e-3", "--out", tmp_path / "runs")
    assert_cli_error(code, out, err, "--bs 100000")
    (run,) = (tmp_path / "runs").iterdir()
    assert json.loads((run / "status.json").read_text())["status"] == "failed"
    assert not any((run / f).exists() for f in ("checkpoint.pth", "export.pkl", "model.safetensors"))


@pytest.mark.parametrize("command,args,parts", [
    ("predict", ["--threshold", "nan"], ["--threshold"]), ("predict", ["--threshold", "1"], ["--threshold"]),
    ("predict", ["--workers", "-1"], ["--workers"]), ("predict", ["--out", "{blocker}/sub.csv"], ["cannot write"]),
    ("predict", ["--out", "{tmp}"], ["cannot write"]),
    ("predict", ["--data", "{images}/broken.png"], ["broken.png", "not a readable image"]),
    ("predict", ["--data", "{bad_csv}"], ["submission.csv, line 3", "'../img0'"]),
    ("evaluate", ["--threshold", "2"], ["--threshold"]), ("evaluate", ["--out", "{blocker}/eval"], ["cannot write"]),
    ("evaluate", ["--data", "{bad_csv}"], ["train.csv, line 2", "outside the vocabulary"]),
    *[pytest.param(command, ["--precision", "fp16"], ["--precision fp16 needs a CUDA GPU"],
                   marks=pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is refused only without CUDA"))
      for command in ("predict", "evaluate")],
])
def test_predict_and_evaluate_leave_no_output_after_an_error(safe_model, make_z2g, tmp_path, capsys, command, args,
                                                             parts):
    data = make_z2g(n=3, size=16)
    images = tmp_path / "images"
    images.mkdir()
    (images / "broken.png").write_bytes(RGB_PNG[:40])
    bad_csv = make_z2g(n=3, size=16, name="bad")
    shutil.copytree(bad_csv / "train", bad_csv / "test")
    (bad_csv / "submission.csv").write_text("Image,Label\nimg0,0\n../img0,0\n")
    (bad_csv / "train.csv").write_text("Image,Label\nimg0,12\n")
    (tmp_path / "blocker").write_text("a file, not a folder")
    names = {"blocker": tmp_path / "blocker", "tmp": tmp_path, "images": images, "bad_csv": bad_csv}
    args = [a.format(**names) for a in args]
    out = tmp_path / "out" / ("sub.csv" if command == "predict" else "eval")
    full = [command, "--learner", safe_model, "--data", data / ("train" if command == "predict" else ""),
            "--out", out, *args]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert_cli_error(*cli_in_process(capsys, *full), *parts)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no temporary or partial files either


def test_predict_on_a_folder_gives_every_image_a_row_when_stems_clash(safe_model, rgby_model, tmp_path, capsys):
    rgb = tmp_path / "rgb"
    rgb.mkdir()
    for name, fmt in [("a.png", "PNG"), ("a.jpg", "JPEG"), ("a.tif", "TIFF"), ("b.png", "PNG"), ("a.png.tif", "TIFF")]:
        Image.fromarray(np.full((16, 16, 3), len(name) * 9, np.uint8)).save(rgb / name, fmt)
    code, out, err = cli_in_process(capsys, "predict", "--learner", safe_model, "--data", rgb, "--out",
                                    tmp_path / "rgb.csv")
    assert code == 0, err
    # unique stems stay ids; clashing ones become file names, and "a.png.tif" then clashes with "a.png"
    assert sorted(pd.read_csv(tmp_path / "rgb.csv")["image"]) == ["a.jpg", "a.png", "a.png.tif", "a.tif", "b"]
    rgby = tmp_path / "rgby"
    rgby.mkdir()
    for stem, fmt, suffix in [("x", "PNG", "png"), ("x", "JPEG", "jpg"), ("y", "PNG", "png")]:
        for stain in CHANNELS:
            Image.fromarray(np.zeros((16, 16), np.uint8)).save(rgby / f"{stem}_{stain}.{suffix}", fmt)
    code, out, err = cli_in_process(capsys, "predict", "--learner", rgby_model, "--data", rgby, "--out",
                                    tmp_path / "rgby.csv")
    assert code == 0, err
    assert sorted(pd.read_csv(tmp_path / "rgby.csv")["image"]) == [
        "x_{red,green,blue,yellow}.jpg", "x_{red,green,blue,yellow}.png", "y"]
    # explain and --cam name them the same way, so no image's heatmaps replace another's
    code, out, err = cli_in_process(capsys, "explain", rgb / "a.png", rgb / "a.jpg", rgb / "b.png",
                                    "--learner", safe_model, "--out", tmp_path / "cams")
    assert code == 0, err
    assert set(pd.read_csv(tmp_path / "cams" / "explanations.csv")["image"]) == {"a.png", "a.jpg", "b"}


@pytest.mark.parametrize("args,parts", [
    (["--classes", "10"], ["--classes 10", "not a class of this model (0..9)"]),
    (["--classes", "-1"], ["--classes", "must be class ids"]),
    (["--bs", "100000"], ["--bs", "at most 256"]),
    (["--threshold", "1.5"], ["--threshold"]),
    (["{images}/missing.png"], ["missing.png", "not found"]),
    (["{images}/broken.png"], ["broken.png", "not a readable image"]),
])
def test_explain_refuses_bad_input_and_writes_nothing(safe_model, make_z2g, tmp_path, capsys, args, parts):
    images = make_z2g(n=2, size=16) / "train"
    (images / "broken.png").write_bytes(RGB_PNG[:40])
    out = tmp_path / "cams"
    args = [a.format(images=images) for a in args]
    flags = [a for a in args if a.startswith("-") or a[0].isdigit()]
    assert_cli_error(*cli_in_process(capsys, "explain", images / "img0.png", *[a for a in args if a not in flags],
                                     "--learner", safe_model, "--out", out, *flags), *parts)
    assert not out.exists()


def test_explain_with_an_rgby_model_on_an_rgb_image(rgby_model, make_z2g, tmp_path, capsys):
    image = make_z2g(n=1, size=16) / "train" / "img0.png"
    assert_cli_error(*cli_in_process(capsys, "explain", image, "--learner", rgby_model, "--out", tmp_path / "c"),
                     "img0.png", "RGBY")
    assert not (tmp_path / "c").exists()


def test_predict_cam_refuses_an_ensemble(safe_model, make_z2g, tmp_path, capsys):
    images = make_z2g(n=2, size=16) / "train"
    assert_cli_error(*cli_in_process(capsys, "predict", "--learner", safe_model, safe_model, "--data", images,
                                     "--out", tmp_path / "p.csv", "--cam", tmp_path / "c"), "--cam", "one model")
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "c").exists()


def test_rgby_model_on_a_submission_csv_with_a_path_id(rgby_model, make_hpa2018, tmp_path, capsys):
    data = make_hpa2018(n=2, size=16)
    shutil.copytree(data / "train", data / "test")
    (data / "sample_submission.csv").write_text("Id,Predicted\nid-0000,0\nid-0001/../../x,0\n")
    out = tmp_path / "sub.csv"
    assert_cli_error(*cli_in_process(capsys, "predict", "--learner", rgby_model, "--data", data, "--out", out),
                     "sample_submission.csv, line 3")
    assert not out.exists()


# --- through a real process: stderr holds nothing but the one line ------------------------------

def test_subprocess_lr_nan_is_one_line(tmp_path):
    proc = run_cli("--lr", "nan", "--arch", "cnn", "--out", tmp_path / "runs", cwd=tmp_path, timeout=300)
    assert_cli_error(proc.returncode, proc.stdout, proc.stderr, "--lr")
    assert proc.stdout == "" and not (tmp_path / "runs").exists()


def test_subprocess_predict_with_a_model_json_that_is_not_an_object(safe_model, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(safe_model, run)
    (run / "model.json").write_text("[]")
    proc = run_cli("predict", "--learner", run, "--out", tmp_path / "sub.csv", cwd=tmp_path, timeout=300)
    assert_cli_error(proc.returncode, proc.stdout, proc.stderr, "model.json", "not an object")
    assert not (tmp_path / "sub.csv").exists()


def test_predict_with_a_model_json_of_nested_brackets_is_one_line(safe_model, make_z2g, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(safe_model, run)
    (run / "model.json").write_bytes(NESTED)
    code, out, err = cli_in_process(capsys, "predict", "--learner", run, "--data", make_z2g(n=2, size=16),
                                    "--out", tmp_path / "labels.csv")
    assert_cli_error(code, out, err, "model.json", "not valid JSON (nested too deeply)")
    assert not (tmp_path / "labels.csv").exists()


# --- JSON files: every one the tool reads is bounded, parsed without recursion errors, and no FIFO -----

def test_one_unreadable_json_file_leaves_the_runs_table_and_the_report_working(tmp_path, capsys):
    from hpa_fastai.runs.table import collect_runs

    out = tmp_path / "runs"
    good = fake_run(out / "20240101-000000-cnn", "data/z2g", **{"metrics.json": {"epochs_run": 2, "f1_macro": 0.5}})
    nested = fake_run(out / "20240102-000000-cnn", "data/z2g", **{"metrics.json": NESTED})
    nan = fake_run(out / "20240103-000000-cnn", "data/z2g",
                   **{"metrics.json": '{"f1_macro": NaN, "seconds": Infinity, "epochs_run": 3}'})
    fifo = fake_run(out / "20240104-000000-cnn", "data/z2g")
    (fifo / "metrics.json").unlink()
    os.mkfifo(fifo / "metrics.json")
    nested_config = fake_run(out / "20240105-000000-cnn", "data/z2g", **{"config.json": NESTED})
    code, stdout, err = finishes(lambda: cli_in_process(capsys, "runs", out), [fifo / "metrics.json"])
    assert code == 0, err
    table = finishes(lambda: collect_runs(out), [fifo / "metrics.json"]).set_index("run")
    assert sorted(table.index) == sorted(r.name for r in (good, nested, nan, fifo, nested_config))
    assert table.loc[good.name, "f1"] == 0.5 and table.loc[nan.name, "epochs"] == 3
    assert pd.isna(table.loc[nan.name, "f1"]) and pd.isna(table.loc[nested.name, "f1"])
    assert table.loc[nested_config.name, "status"] == "finished" and pd.isna(table.loc[nested_config.name, "arch"])
    code, _, err = cli_in_process(capsys, "report", nested)  # the report shows what the other files hold
    assert code == 0, err
    assert (nested / "report.html").is_file()
    # report needs the run's config: a damaged one is one line naming it
    assert_cli_error(*cli_in_process(capsys, "report", nested_config), "config.json", "nested too deeply")
    (nested_config / "config.json").unlink()
    os.mkfifo(nested_config / "config.json")
    assert_cli_error(*finishes(lambda: cli_in_process(capsys, "report", nested_config),
                               [nested_config / "config.json"]), "config.json", "not a regular file")


def test_download_settings_of_nested_brackets_are_one_line(capsys, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("Id,Target\n10580_1610_C1_1,0\n")
    out = tmp_path / "hpav18"
    out.mkdir()
    (out / "hpav18.json").write_bytes(NESTED)
    code, stdout, err = cli_in_process(capsys, "download-hpav18", labels, "--base-url", NO_SERVER, "--out", out)
    assert_cli_error(code, stdout, err, "hpav18.json", "nested too deeply")


@pytest.mark.parametrize("text,part", [
    (NESTED, "nested too deeply"), (b'{"a": NaN}', "NaN is not a finite number"),
    (b'{"a": -Infinity}', "-Infinity is not a finite number"), (b'{"a": 1e999}', "1e999 is not a finite number"),
    (b"\xff\xfe{}", "not UTF-8"), (b'{"a": ' + b"1" * 5000 + b"}", "integer"), (b"", "Expecting value"),
])
def test_the_json_reader_refuses_with_one_line_naming_the_file(tmp_path, text, part):
    from hpa_fastai.jsonfile import read_json

    path = tmp_path / "x.json"
    path.write_bytes(text)
    with pytest.raises(HPAError) as info:
        read_json(path, "test file")
    message = one_line(str(info.value))
    assert message.startswith(f"{path}: not valid JSON") and part in message, message


def test_the_json_reader_bounds_the_size_and_reads_only_regular_files(tmp_path):
    from hpa_fastai.jsonfile import AS_NONE, KEEP, read_json

    big = tmp_path / "big.json"
    big.write_text('{"a": "' + "x" * 2000 + '"}')
    with pytest.raises(HPAError, match="over the 1000 a test file may have"):
        read_json(big, "test file", max_bytes=1000)
    assert len(read_json(big, "test file", max_bytes=3000)["a"]) == 2000
    os.mkfifo(tmp_path / "fifo.json")
    for path in (tmp_path / "fifo.json", tmp_path, Path("/dev/zero")):
        with pytest.raises(HPAError, match="not a regular file"):
            finishes(lambda: read_json(path, "test file"), [tmp_path / "fifo.json"])
    with pytest.raises(HPAError, match="No such file"):
        read_json(tmp_path / "missing.json", "test file")
    assert read_json(tmp_path / "missing.json", "test file", missing={}) == {}
    (tmp_path / "nan.json").write_text('[NaN, Infinity, 1e999, 0.5]')
    assert read_json(tmp_path / "nan.json", nonfinite=AS_NONE) == [None, None, None, 0.5]
    kept = read_json(tmp_path / "nan.json", nonfinite=KEEP)
    assert math.isnan(kept[0]) and kept[1:] == [math.inf, math.inf, 0.5]


# --- security and robustness: consent to unpickle, escaped pages, bounded resources, safe outputs -----

class Payload:
    """Unpickling this creates the folder ``marker``: proof that a pickle ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def planted_run(folder: Path, marker: Path) -> Path:
    """A run folder holding only a config and an export.pkl whose unpickling creates ``marker``."""
    import pickle

    folder.mkdir(parents=True)
    (folder / "export.pkl").write_bytes(pickle.dumps(Payload(marker)))
    (folder / "config.json").write_text("{}")
    (folder / "status.json").write_text('{"status": "finished"}')
    return folder


@pytest.mark.parametrize("learner", ["runs/r", "runs/r/export.pkl", "runs/latest", "elsewhere/export.pkl"])
def test_export_pkl_is_never_unpickled_without_trust_wherever_it_is(tmp_path, monkeypatch, learner):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "payload-ran"
    planted_run(tmp_path / "runs" / "r", marker)
    (tmp_path / "runs" / "latest").symlink_to("r")
    planted_run(tmp_path / "elsewhere", marker)
    with pytest.raises(HPAError) as info:
        load_predictor(learner, cpu=True)
    message = one_line(str(info.value))
    assert "refusing to unpickle" in message and "--trust" in message and "export.pkl" in message
    assert not marker.exists()
    with pytest.raises(HPAError, match="not a loadable fastai learner"):
        load_predictor(learner, trust=True, cpu=True)  # with consent it is unpickled (and then refused)
    assert marker.exists()


@pytest.mark.parametrize("command", ["predict", "evaluate", "export", "report", "runs"])
def test_no_command_unpickles_a_planted_runs_latest(make_z2g, tmp_path, monkeypatch, capsys, command):
    data = make_z2g(n=2, size=16)
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "payload-ran"
    planted_run(tmp_path / "runs" / "r", marker)
    (tmp_path / "runs" / "latest").symlink_to("r")
    args = {"predict": ["--data", data / "train", "--out", tmp_path / "sub.csv"],
            "evaluate": ["--data", data, "--out", tmp_path / "eval"],
            "export": ["--onnx", "--out", tmp_path / "model.onnx"],
            "report": ["runs/latest"], "runs": []}[command]
    code, out, err = cli_in_process(capsys, command, *args)
    if command in ("report", "runs"):
        assert code == 0, err
    else:
        assert_cli_error(code, out, err, "export.pkl", "--trust")
    assert not marker.exists()


def test_control_characters_never_reach_the_console(safe_model, tmp_path, capsys):
    from hpa_fastai.console import console, log, table

    evil = "a\x1b]0;owned\x07b\x1b[2Jc\rd\x9be\u202ef"
    capsys.readouterr()
    log(evil)
    console.print(table(evil, pd.DataFrame({"x": [evil], "y": [1.5]})))
    out = capsys.readouterr().out
    assert not any(c in out for c in "\x1b\x07\r\x9b\u202e") and "owned" in out
    images = tmp_path / "images"
    write_png(images / "x\x1b[2J.png", np.zeros((16, 16, 3), np.uint8))
    code, out, err = cli_in_process(capsys, "predict", "--learner", safe_model, "--data", images, "--out",
                                    tmp_path / "labels.csv")
    assert code == 0, err
    assert "\x1b" not in out + err and "x\\x1b[2J" in out


def test_class_names_with_rich_markup_are_printed_literally(safe_model, make_z2g, tmp_path, capsys):
    data = make_z2g(n=3, size=16)
    run = shutil.copytree(safe_model, tmp_path / "run")
    edit_meta(names=[f"[/]x{i}" for i in range(10)])(run)
    code, out, err = cli_in_process(capsys, "predict", "--learner", run, "--data", data / "train", "--out",
                                    tmp_path / "labels.csv")
    assert code == 0, err
    assert "[/]x" in out
    code, out, err = cli_in_process(capsys, "evaluate", "--learner", run, "--data", data, "--out", tmp_path / "eval")
    assert code == 0, err
    assert "[/]x9" in out


def test_a_bad_image_in_a_worker_process_is_one_short_line(safe_model, tmp_path, capsys):
    images = tmp_path / "images"
    for name in ("a", "b"):
        write_png(images / f"{name}.png", np.zeros((16, 16, 3), np.uint8))
    (images / "broken.png").write_bytes(RGB_PNG[:40])  # read by a worker, after the first batch
    code, out, err = cli_in_process(capsys, "predict", "--learner", safe_model, "--data", images, "--out",
                                    tmp_path / "labels.csv", "--workers", "2", "--bs", "1")
    assert_cli_error(code, out, err, "broken.png", "not a readable image")
    assert len(err) < 400 and "Traceback" not in err and "DataLoader" not in err
    assert not (tmp_path / "labels.csv").exists()


def test_train_csv_is_read_once_and_stops_at_the_first_bad_row(make_z2g, tmp_path, capsys):
    data = make_z2g(n=2, size=16)
    rows = "".join(f"missing{i},1\n" for i in range(300_000)).encode()
    (data / "train.csv").write_bytes(b"Image,Label\n" + rows + b"\xff\xfe,1\n")  # not UTF-8 at the very end
    code, out, err = cli_in_process(capsys, "--data", data, "--arch", "cnn", "--no-pretrained", "--out",
                                    tmp_path / "runs")
    assert_cli_error(code, out, err, "train.csv, line 2", "missing0.png not found")


def test_an_over_long_field_names_its_line_and_skip_bad_skips_it(make_z2g, caplog):
    data = make_z2g(n=3, size=16)
    (data / "train.csv").write_text("Image,Label\nimg0,1\nimg1," + "1 " * 100_000 + "\nimg2,3\n")
    with pytest.raises(HPAError) as info:
        read_items(data, detect_format(data))
    assert "train.csv, line 3" in one_line(str(info.value))
    items = read_items(data, detect_format(data), skip_bad=True)
    skipped = [r.getMessage() for r in caplog.records]
    assert list(items["id"]) == ["img0", "img2"] and any("line 3" in s for s in skipped)


WORKER_COMMANDS = ["train", "cv", "predict", "evaluate", "preprocess"]


@pytest.mark.parametrize("command", WORKER_COMMANDS)
@pytest.mark.parametrize("workers", [str(10**20), "65"])
def test_workers_above_the_cap_are_refused_before_anything_starts(safe_model, make_z2g, tmp_path, capsys, command,
                                                                  workers):
    data = make_z2g(n=4, size=16)
    train_args = ["--data", data, "--arch", "cnn", "--no-pretrained", "--lr", "1e-3", "--out", tmp_path / "runs"]
    args = {"train": train_args, "cv": train_args,
            "predict": ["--learner", safe_model, "--data", data / "train", "--out", tmp_path / "sub.csv"],
            "evaluate": ["--learner", safe_model, "--data", data, "--out", tmp_path / "eval"],
            "preprocess": ["--data", data, "--size", "8"]}[command]
    assert_cli_error(*cli_in_process(capsys, *([] if command == "train" else [command]), *args, "--workers", workers),
                     "--workers", "64")
    assert not any((tmp_path / p).exists() for p in ("runs", "sub.csv", "eval")) and not (data / "cache").exists()


def test_worker_count_is_bounded_by_cores_and_images(caplog):
    from hpa_fastai.config import MAX_WORKERS
    from hpa_fastai.data.pipeline import bound_workers

    cores = len(os.sched_getaffinity(0))
    assert bound_workers(MAX_WORKERS, 6, default=0) == min(cores, 6)
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 1 and f"--workers {MAX_WORKERS} lowered to {min(cores, 6)}" in notes[0]
    assert bound_workers(None, 3, default=8) <= 3 and bound_workers(0, 3, default=8) == 0
    assert bound_workers(None, 100, default=0) == 0  # the CPU default is unchanged


def test_a_giant_arch_over_tiny_weights_is_refused_from_the_header_before_building(safe_model, tmp_path, monkeypatch):
    import hpa_fastai.models as models
    from safetensors.torch import save_file

    run = shutil.copytree(safe_model, tmp_path / "run")
    save_file({"w": torch.zeros(1)}, str(run / "model.safetensors"))  # 68 bytes
    assert (run / "model.safetensors").stat().st_size < 100
    edit_meta(arch="timm:vit_giant_patch14_224", size=224)(run)  # the one size this ViT takes

    def built(*args, **kwargs):
        pytest.fail("the model was built before the weights' names and shapes were checked")

    monkeypatch.setattr(models, "create_model", built)
    with pytest.raises(HPAError) as info:
        load_predictor(run, cpu=True)
    message = one_line(str(info.value))
    assert "model.safetensors" in message and "do not fit timm:vit_giant_patch14_224" in message
    assert "'0.model.cls_token'" in message  # the first name the model has and the file lacks


def test_weights_that_do_not_fit_name_the_first_mismatching_key_and_shapes(safe_model, tmp_path):
    run = shutil.copytree(safe_model, tmp_path / "run")
    edit_meta(channels="rgby", mean=[0.5] * 4, std=[0.2] * 4)(run)
    with pytest.raises(HPAError) as info:
        load_predictor(run, cpu=True)
    message = one_line(str(info.value))
    assert "'0.0.weight'" in message and "(32, 3, 3, 3)" in message and "(32, 4, 3, 3)" in message


@pytest.mark.parametrize("cv, part", [
    ({"runs": ["."], "thresholds": [0.5] * 10}, "'.'"),
    ({"runs": [], "thresholds": [0.5] * 10}, "no fold runs"),
    ({"runs": ["../run"], "thresholds": [0.5] * 10}, "'../run'"),
    ({"runs": "fold0", "thresholds": [0.5] * 10}, "no fold runs"),
    ({"runs": ["fold0", 3], "thresholds": [0.5] * 10}, "3"),
    ({"runs": ["fold0"], "thresholds": "x"}, "thresholds"),
    ({"runs": ["nested"], "thresholds": [0.5] * 10}, "nested"),
    (NESTED.decode(), "nested too deeply"),
    ('{"runs": ["fold0"], "thresholds": [NaN, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]}', "NaN"),
])
def test_cv_json_names_only_fold_folders_inside_it(safe_model, tmp_path, cv, part):
    folder = tmp_path / "cv"
    shutil.copytree(safe_model, folder / "fold0")
    shutil.copytree(safe_model, tmp_path / "run")
    (folder / "nested").mkdir()
    (folder / "nested" / "cv.json").write_text(json.dumps({"runs": [".."], "thresholds": [0.5] * 10}))
    (folder / "cv.json").write_text(cv if isinstance(cv, str) else json.dumps(cv))
    with pytest.raises(HPAError) as info:
        load_predictor(folder, cpu=True)
    message = one_line(str(info.value))
    assert "cv.json" in message and part in message


def fake_run(folder: Path, data: Path | str, keys=(), channels="rgb", **files) -> Path:
    """A run folder written by hand (no training): config, status, metrics, history and validation
    predictions for ``keys``; ``files`` replace any of them (a dict or frame, or text)."""
    folder.mkdir(parents=True)
    n = len(keys)
    contents = {
        "config.json": {"data": str(data), "arch": "cnn", "channels": channels, "size": 16, "threshold": 0.5},
        "status.json": {"status": "finished"},
        "metrics.json": {},
        "history.csv": pd.DataFrame({"epoch": [1], "phase": ["train"], "train_loss": [0.7], "valid_loss": [0.6],
                                     "f1_macro": [0.1], "lr": [1e-3], "seconds": [1.0]}),
        "valid_predictions.csv": pd.DataFrame({"id": [f"v{i}" for i in range(n)], "key": [str(k) for k in keys],
                                               "labels": ["1"] * n, "predicted": ["2"] * n,
                                               "probs": [" ".join(["0.5"] * 10)] * n}),
        **files}
    for name, value in contents.items():
        if isinstance(value, pd.DataFrame):
            value.to_csv(folder / name, index=False)
        elif isinstance(value, bytes):
            (folder / name).write_bytes(value)
        else:
            (folder / name).write_text(value if isinstance(value, str) else json.dumps(value))
    return folder


def write_runs_folder(out: Path, arch="[/]evil", **metrics) -> Path:
    fake_run(out / "20240101-000000-cnn", "data/z2g", **{"metrics.json": {"epochs_run": 2, "best_epoch": 1,
                                                                           "f1_macro": 0.5, "seconds": 3.0}})
    odd = {"epochs_run": "many", "best_epoch": [1], "f1_macro": "high", "f1_macro_tuned": None, "seconds": "slow",
           "threshold": "x", **metrics}
    fake_run(out / "20240102-000000-odd", "[bold]data[/bold]", **{
        "config.json": {"data": "[bold]data[/bold]", "arch": arch, "channels": ["x"], "size": "big"},
        "metrics.json": odd, "status.json": {"status": "[/]"}})
    return out


@pytest.mark.parametrize("sort", ["date", "epochs", "f1", "size", "arch"])
def test_runs_table_survives_odd_values_in_one_run_folder(tmp_path, capsys, sort):
    out = write_runs_folder(tmp_path / "runs")
    code, stdout, err = cli_in_process(capsys, "runs", out, "--sort", sort, "--csv", tmp_path / "runs.csv")
    assert code == 0, err
    assert "[/]evil" in stdout and "20240101-000000-cnn" in stdout
    assert len(pd.read_csv(tmp_path / "runs.csv")) == 2


# A value that breaks out of HTML text, of an attribute, and of a style or script context.
XSS = '<script>alert(1)</script>"\'><img src=x onerror=alert(2)>'
HTML_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "b", "nav", "a", "table", "tr", "th",
             "td", "span", "img", "div", "figure", "figcaption", "br"}


class Tags(HTMLParser):
    """The tags and attribute names of a page."""

    def __init__(self, text):
        super().__init__()
        self.tags, self.attrs = set(), set()
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.attrs.update(name for name, _ in attrs)


def hostile_run(folder: Path) -> Path:
    """A run folder with XSS in every value a page shows, and text where numbers belong."""
    return fake_run(folder, XSS, **{
        "config.json": {"data": XSS, "arch": XSS, "channels": XSS, "size": XSS, "lr": XSS, "lr_used": XSS, XSS: XSS},
        "status.json": {"status": XSS, "seconds": XSS},
        "metrics.json": {k: XSS for k in ("best_epoch", "epochs_run", "f1_macro", "f1_macro_tuned", "f1_samples",
                                          "f1_samples_tuned", "threshold", "seconds", "valid_images")}
        | {"per_class": [{k: XSS for k in ("class", "name", "threshold", "precision", "recall", "f1", "support")}]},
        "lr_find.json": {"suggestions": {XSS: XSS}},
        "lr_find.png": RGB_PNG,
        "model.json": {"names": [XSS]},
        "history.csv": pd.DataFrame({"epoch": [XSS], "phase": [XSS], "valid_loss": [XSS], "f1_macro": [XSS],
                                     XSS: [XSS]}),
        "valid_predictions.csv": pd.DataFrame({"id": [XSS], "key": [XSS], "labels": [XSS], "predicted": [XSS],
                                               "probs": [XSS]})})


def assert_no_markup_from_files(text: str):
    parsed = Tags(text)
    assert parsed.tags <= HTML_TAGS, parsed.tags - HTML_TAGS
    assert not any(a.startswith("on") for a in parsed.attrs), parsed.attrs
    assert "<script" not in text.lower() and "&lt;script&gt;" in text


def test_report_and_comparison_escape_every_value_read_from_the_run_folder(tmp_path, capsys):
    from hpa_fastai.reporting import write_comparison, write_report

    first = hostile_run(tmp_path / "<img src=x onerror=alert(3)>")
    second = hostile_run(tmp_path / "runs2" / "<b onmouseover=alert(4)>")
    assert_no_markup_from_files(write_report(first).read_text())
    assert_no_markup_from_files(write_comparison([first, second], tmp_path / "c.html").read_text())
    code, _, err = cli_in_process(capsys, "report", second)
    assert code == 0, err
    assert_no_markup_from_files((second / "report.html").read_text())


def test_report_grid_reads_no_fifo(make_z2g, tmp_path):
    import threading

    from hpa_fastai.reporting import write_report

    data = make_z2g(n=2, size=16)
    fifo = data / "train" / "pipe.png"
    os.mkfifo(fifo)
    run = fake_run(tmp_path / "run", data, keys=[data / "train" / "img0.png", fifo])
    done = {}
    worker = threading.Thread(target=lambda: done.update(path=write_report(run)), daemon=True)
    worker.start()
    worker.join(60)
    if worker.is_alive():  # blocked opening the FIFO: give it a writer so the thread can end
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
        worker.join(10)
        pytest.fail("report blocked on a FIFO named in valid_predictions.csv")
    text = done["path"].read_text()
    assert "pipe.png" in text and "not a regular file" in text and 'class="thumb"' not in text


@pytest.mark.parametrize("where", ["outside", "symlink out", "dot-dot", "no data folder recorded"])
def test_report_grid_embeds_only_images_inside_the_recorded_data_folder(make_z2g, tmp_path, where):
    from hpa_fastai.reporting import write_report

    data = make_z2g(n=2, size=16)
    secret = write_png(tmp_path / "private" / "secret.png", np.full((16, 16, 3), 200, np.uint8))
    key = {"outside": secret, "symlink out": data / "train" / "link.png",
           "dot-dot": f"{data}/train/../../private/secret.png",
           "no data folder recorded": data / "train" / "img0.png"}[where]
    if where == "symlink out":
        key.symlink_to(secret)
    run = fake_run(tmp_path / "run", data, keys=[key])
    if where == "no data folder recorded":
        (run / "config.json").write_text(json.dumps({"arch": "cnn", "channels": "rgb"}))
    text = write_report(run).read_text()
    assert 'class="thumb"' not in text
    assert ("no data folder" if where == "no data folder recorded" else "outside the data folder") in text


def test_ids_and_class_names_with_dollar_signs_are_plotted_as_text(safe_model, make_z2g, tmp_path, capsys):
    data = make_z2g(n=3, size=16)
    ids = ["a$^$0", "b$_$1", "c$x$2"]
    for i, image_id in enumerate(ids):
        (data / "train" / f"img{i}.png").rename(data / "train" / f"{image_id}.png")
    (data / "train.csv").write_text("Image,Label\n" + "".join(f"{image_id},{i}\n" for i, image_id in enumerate(ids)))
    run = shutil.copytree(safe_model, tmp_path / "run")
    edit_meta(names=[f"class$^${i}" for i in range(10)])(run)
    code, _, err = cli_in_process(capsys, "evaluate", "--learner", run, "--data", data, "--out", tmp_path / "eval")
    assert code == 0, err
    assert (tmp_path / "eval" / "samples.png").is_file() and (tmp_path / "eval" / "per_class_f1.png").is_file()
    pytest.importorskip("tensorboard")
    from hpa_fastai.reporting import log_tensorboard_summary

    per_class = [{"class": 0, "name": "x$^$", "threshold": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0,
                  "support": 1}]
    log_tensorboard_summary(run, {"epochs_run": 1, "f1_macro": 0.0, "per_class": per_class},
                            [{"id": "a$^$0", "image": np.zeros((8, 8, 3), np.uint8), "true": [0], "predicted": [0]}])
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def test_one_pixel_images_without_size_are_refused_naming_the_flag(make_z2g, tmp_path, capsys):
    data = make_z2g(n=4, size=1)
    code, out, err = cli_in_process(capsys, "--data", data, "--arch", "cnn", "--no-pretrained", "--epochs", "1",
                                    "--bs", "2", "--lr", "1e-3", "--out", tmp_path / "runs")
    assert_cli_error(code, out, err, "--size", "1x1")
    statuses = [json.loads(p.read_text())["status"] for p in (tmp_path / "runs").glob("*/status.json")]
    assert "running" not in statuses


def test_an_unexpected_error_before_the_first_epoch_marks_the_run_failed(make_z2g, tmp_path, monkeypatch):
    import hpa_fastai.training.schedule as schedule
    from hpa_fastai.training import train

    def broken_lr_find(*args, **kwargs):
        raise ZeroDivisionError("inside a library")

    monkeypatch.setattr(schedule, "find_lr", broken_lr_find)
    with pytest.raises(ZeroDivisionError):
        train(TrainConfig(data=str(make_z2g(n=8, size=16)), arch="cnn", pretrained=False, epochs=1, bs=2,
                                   out=str(tmp_path / "runs")))
    (status,) = (tmp_path / "runs").glob("*/status.json")
    assert json.loads(status.read_text())["status"] == "failed"


def test_run_folders_started_together_never_collide(tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from hpa_fastai.runs.folder import make_run_dir

    made = []
    with ThreadPoolExecutor(8) as pool:
        made = list(pool.map(lambda _: make_run_dir(tmp_path / "runs", "cnn", name="same"), range(120)))
    assert len(set(made)) == 120
    # another process creating the folder between a check and the mkdir
    monkeypatch.setattr(Path, "exists", lambda self: False)
    assert make_run_dir(tmp_path / "runs", "cnn", name="same").name == "same-121"


@pytest.fixture
def case_folder(safe_model, make_z2g, tmp_path):
    """A learner run folder, a competition folder with a test split and a folder of images, all copies."""
    run = shutil.copytree(safe_model, tmp_path / "run")
    fake_files = fake_run(tmp_path / "scratch", "x")
    for name in ("config.json", "status.json", "metrics.json", "history.csv"):
        shutil.copy(fake_files / name, run / name)
    shutil.rmtree(fake_files)
    data = make_z2g(n=3, size=16)
    shutil.copytree(data / "train", data / "test")
    (data / "submission.csv").write_text("Image,Label\nimg0,0\nimg1,0\n")
    other = fake_run(tmp_path / "other", data)  # a run folder that the command does not read
    return {"run": run, "data": data, "images": data / "train", "tmp": tmp_path, "other": other}


def snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


OVERWRITE_CASES = {
    "predict over train.csv": (["predict", "--learner", "{run}", "--data", "{data}", "--out", "{data}/train.csv"],
                               ["--out", "train.csv"]),
    "predict over the submission template": (["predict", "--learner", "{run}", "--data", "{data}", "--out",
                                              "{data}/submission.csv"], ["--out", "submission.csv"]),
    "predict over an image it reads": (["predict", "--learner", "{run}", "--data", "{images}", "--out",
                                        "{images}/img0.png"], ["--out", "img0.png"]),
    "predict over the model": (["predict", "--learner", "{run}", "--data", "{images}", "--out", "{run}/model.json"],
                               ["--out", "model.json"]),
    "predict over a run file": (["predict", "--learner", "{run}", "--data", "{images}", "--out", "{run}/metrics.json"],
                                ["--out", "metrics.json"]),
    "evaluate into the run folder": (["evaluate", "--learner", "{run}", "--data", "{data}", "--out", "{run}"],
                                     ["--out", "per_class.csv"]),
    "evaluate into an existing file": (["evaluate", "--learner", "{run}", "--data", "{data}", "--out",
                                        "{data}/train.csv"], ["--out", "train.csv", "not a folder"]),
    "report over the run's config": (["report", "{run}", "--out", "{run}/config.json"], ["--out", "config.json"]),
    "comparison over a run's metrics": (["report", "{run}", "{run}", "--out", "{run}/metrics.json"],
                                        ["--out", "metrics.json"]),
    "export over the weights": (["export", "--onnx", "--learner", "{run}", "--out", "{run}/model.safetensors"],
                                ["--out", "model.safetensors"]),
    "predict over another run's config": (["predict", "--learner", "{run}", "--data", "{images}", "--out",
                                           "{other}/config.json"], ["--out", "config.json"]),
    "report over another run's report": (["report", "{run}", "--out", "{other}/report.html"], ["--out", "report.html"]),
    "runs table over a run's history": (["runs", "{tmp}", "--csv", "{run}/history.csv"], ["--csv", "history.csv"]),
    "dedup over train.csv": (["dedup", "--data", "{data}", "--out", "{data}/train.csv"], ["--out", "train.csv"]),
    "predict --out ''": (["predict", "--learner", "{run}", "--data", "{images}", "--out", ""], ["--out", "empty"]),
    "predict --cam ''": (["predict", "--learner", "{run}", "--data", "{images}", "--out", "{tmp}/p.csv", "--cam", ""],
                         ["--cam", "empty"]),
    "predict --cam into a file": (["predict", "--learner", "{run}", "--data", "{images}", "--out", "{tmp}/p.csv",
                                   "--cam", "{data}/train.csv"], ["--cam", "not a folder"]),
    "explain --out ''": (["explain", "{images}/img0.png", "--learner", "{run}", "--out", ""], ["--out", "empty"]),
    "explain into a file": (["explain", "{images}/img0.png", "--learner", "{run}", "--out", "{data}/train.csv"],
                            ["--out", "not a folder"]),
    "evaluate --out ''": (["evaluate", "--learner", "{run}", "--data", "{data}", "--out", ""], ["--out", "empty"]),
    "report --out ''": (["report", "{run}", "--out", ""], ["--out", "empty"]),
    "export --out ''": (["export", "--onnx", "--learner", "{run}", "--out", ""], ["--out", "empty"]),
    "dedup --out ''": (["dedup", "--data", "{data}", "--out", ""], ["--out", "empty"]),
    "runs --csv ''": (["runs", "{tmp}", "--csv", ""], ["--csv", "empty"]),
    "train --out ''": (["--data", "{data}", "--arch", "cnn", "--no-pretrained", "--out", ""], ["--out", "empty"]),
    "synth --out ''": (["synth", "--out", "", "--n-train", "2", "--n-test", "0", "--size", "16"], ["--out", "empty"]),
}


@pytest.mark.parametrize("name", OVERWRITE_CASES)
def test_no_command_writes_over_its_inputs_or_a_run_folder(case_folder, capsys, monkeypatch, name):
    args, parts = OVERWRITE_CASES[name]
    monkeypatch.chdir(case_folder["tmp"])
    before = snapshot(case_folder["tmp"])
    assert_cli_error(*cli_in_process(capsys, *[a.format(**case_folder) for a in args]), *parts)
    assert snapshot(case_folder["tmp"]) == before


def test_the_default_outputs_next_to_a_run_are_still_written(case_folder, capsys):
    run, data = case_folder["run"], case_folder["data"]
    code, _, err = cli_in_process(capsys, "report", run)
    assert code == 0, err
    code, _, err = cli_in_process(capsys, "report", run, "--out", run / "report.html")
    assert code == 0, err
    for _ in range(2):  # again over its own earlier output
        code, _, err = cli_in_process(capsys, "evaluate", "--learner", run, "--data", data)
        assert code == 0, err
    assert (run / "evaluate" / "per_class.csv").is_file()
    for _ in range(2):  # a new file beside the data, then again over this command's own output
        code, _, err = cli_in_process(capsys, "predict", "--learner", run, "--data", data, "--out", data / "sub.csv")
        assert code == 0, err


def test_ids_that_a_spreadsheet_would_run_are_prefixed_in_csvs_for_people(safe_model, make_z2g, tmp_path, capsys):
    images = tmp_path / "images"
    for name in ("=cmd", "+x", "-y", "@z"):
        write_png(images / f"{name}.png", np.zeros((16, 16, 3), np.uint8))
    code, _, err = cli_in_process(capsys, "predict", "--learner", safe_model, "--data", images, "--out",
                                  tmp_path / "labels.csv")
    assert code == 0, err
    labels = pd.read_csv(tmp_path / "labels.csv", dtype=str)
    assert sorted(labels["image"]) == ["'+x", "'-y", "'=cmd", "'@z"]
    # a Kaggle submission keeps its ids verbatim: Kaggle matches them exactly
    data = make_z2g(n=2, size=16)
    (data / "test").mkdir()
    shutil.copy(data / "train" / "img0.png", data / "test" / "=1.png")
    (data / "submission.csv").write_text("Image,Label\n=1,0\n")
    code, _, err = cli_in_process(capsys, "predict", "--learner", safe_model, "--data", data, "--out",
                                  tmp_path / "sub.csv")
    assert code == 0, err
    assert list(pd.read_csv(tmp_path / "sub.csv", dtype=str)["Image"]) == ["=1"]
    run = shutil.copytree(safe_model, tmp_path / "run")
    edit_meta(names=["=SUM(1)"] + [f"c{i}" for i in range(9)])(run)
    code, _, err = cli_in_process(capsys, "evaluate", "--learner", run, "--data", data, "--out", tmp_path / "eval")
    assert code == 0, err
    assert pd.read_csv(tmp_path / "eval" / "per_class.csv", dtype=str)["name"][0] == "'=SUM(1)"
    out = write_runs_folder(tmp_path / "runs", arch="=HYPERLINK(\"http://x\")")
    code, _, err = cli_in_process(capsys, "runs", out, "--csv", tmp_path / "runs.csv")
    assert code == 0, err
    assert "'=HYPERLINK(\"http://x\")" in set(pd.read_csv(tmp_path / "runs.csv", dtype=str)["arch"])


# --- serve: uploads the web app cannot take --------------------------------------------------------

@pytest.mark.skipif(importlib.util.find_spec("gradio") is None, reason="gradio not installed")
@pytest.mark.parametrize("examples", ["missing", "file"])
def test_serve_refuses_examples_that_are_not_a_folder(safe_model, tmp_path, capsys, examples):
    path = tmp_path / "examples"
    if examples == "file":
        path.write_text("not a folder")
    assert_cli_error(*cli_in_process(capsys, "serve", "--learner", safe_model, "--examples", path),
                     f"--examples {path}: not a folder of images")


def test_serve_names_an_upload_that_is_gone_by_its_own_name(safe_model, tmp_path):
    from hpa_fastai.inference.loading import load_predictor
    from hpa_fastai.serve.app import answer

    deleted = tmp_path / "0123abcd" / "cells.png"  # where Gradio had put an upload the server has deleted
    verdict = answer(load_predictor(safe_model), [deleted]).verdict.replace("\\", "")
    assert verdict.startswith("**Cannot read this input.** cells.png: no longer on the server") and "drop it again" in verdict
    assert str(tmp_path) not in verdict and "0123abcd" not in verdict


def upload_through_the_cap(folder, headers: dict) -> tuple[int, str, bool]:
    """An upload request with ``headers`` through ``UploadCap`` in front of a stand-in for Gradio:
    (status, body, whether it reached Gradio)."""
    import asyncio

    from hpa_fastai.serve.tempfolder import UploadCap

    reached, sent = [], []

    async def gradio(scope, receive, send):
        reached.append(True)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"[]"})

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/gradio_api/upload",
             "headers": [(k.encode(), v.encode()) for k, v in headers.items()]}
    asyncio.run(UploadCap(gradio, folder)(scope, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:]).decode(), bool(reached)


@pytest.mark.parametrize("headers,status,message", [
    ({"content-length": str(3 * 2**20)}, 413,
     "this upload is 3 MiB, more than the server holds at once (1 MiB of uploads and heatmaps, 10 files); drop "
     "fewer or smaller files"),
    ({}, 411, "an upload must state its size (Content-Length)"),
    ({"content-length": "-5"}, 411, "an upload must state its size (Content-Length)"),
    ({"transfer-encoding": "chunked", "content-length": "10"}, 411, "an upload must state its size (Content-Length)"),
    ({"content-length": str(2**20)}, 200, "[]"),
])
def test_serve_refuses_an_upload_it_cannot_hold_before_reading_it(tmp_path, headers, status, message):
    from hpa_fastai.serve.tempfolder import TempFolder

    with TempFolder(2**20, 10, parent=tmp_path) as folder:
        assert upload_through_the_cap(folder, headers) == (status, message, status == 200)
        assert upload_through_the_cap(folder, {"content-length": str(2**20)})[0] == 200  # nothing stays reserved


def test_serve_is_full_while_the_files_requests_are_reading_fill_the_cap(tmp_path):
    from hpa_fastai.serve.tempfolder import TempFolder

    with TempFolder(2**20, 10, parent=tmp_path) as folder:
        held = folder.path / "0123abcd" / "stain.png"
        held.parent.mkdir()
        held.write_bytes(b"x" * 900_000)
        with folder.in_use([held]):
            status, body, reached = upload_through_the_cap(folder, {"content-length": "200000"})
            assert status == 503 and body.startswith("the server is full") and not reached
            assert held.exists()
        assert upload_through_the_cap(folder, {"content-length": "200000"})[0] == 200
        assert not held.exists() and not held.parent.exists()  # then the oldest goes first


# --- download-hpav18: flags and the label CSV ---------------------------------------------------

# nothing listens on port 9 of 127.0.0.1: a case that reached the network would fail differently
NO_SERVER = "http://127.0.0.1:9/images/"


@pytest.mark.parametrize("args,flag", [
    (["--connections", "0"], "--connections"), (["--connections", "1000"], "--connections"),
    (["--retries", "-1"], "--retries"), (["--retries", "100"], "--retries"), (["--timeout", "0"], "--timeout"),
    (["--timeout", "nan"], "--timeout"), (["--backoff", "-1"], "--backoff"), (["--backoff", "inf"], "--backoff"),
    (["--size", "4"], "--size"), (["--size", "100000"], "--size"), (["--ids", "0"], "--ids"),
    (["--classes", "28"], "--classes"), (["--classes", "rare"], "--classes"), (["--classes", "-1"], "--classes"),
    (["--base-url", "ftp://example.org/images/"], "--base-url"), (["--base-url", "file:///etc"], "--base-url"),
    (["--base-url", "http://a b/"], "--base-url"), (["--format", "jpg", "--size", "64"], "--format jpg"),
    (["--out", " "], "--out"),
])
def test_download_flag_refused_before_anything_is_read_or_fetched(capsys, tmp_path, args, flag):
    code, out, err = cli_in_process(capsys, "download-hpav18", tmp_path / "labels.csv", "--base-url", NO_SERVER,
                                    "--out", tmp_path / "out", *args)
    assert_cli_error(code, out, err, flag)
    assert not (tmp_path / "out").exists()


HPAV18_LABEL_CASES = {
    # name: (content of the label CSV, parts of the message besides the file)
    "no such file": (None, ["file not found"]),
    "empty": ("", ["empty"]),
    "Kaggle z2g columns": ("Image,Label\nimg0,1\n", ["expected columns Id,Target"]),
    "header only": ("Id,Target\n", ["no rows"]),
    "id with a folder": ("Id,Target\n10580_1610_C1_1,0\n../10580_1610_C1_2,1\n", ["line 3", "not a plain file name"]),
    "id without an underscore": ("Id,Target\n10580,0\n", ["line 2", "not an HPAv18 id"]),
    "id starting with an underscore": ("Id,Target\n_1610_C1_1,0\n", ["line 2", "not an HPAv18 id"]),
    "label outside the vocabulary": ("Id,Target\n10580_1610_C1_1,28\n", ["line 2", "outside the vocabulary 0..27"]),
    "duplicated id": ("Id,Target\n10580_1610_C1_1,0\n10580_1610_C1_1,1\n", ["line 3", "duplicated id"]),
    # its file names would pass 255 bytes: refused when read, not on every rerun at the same file
    "id too long for a file name": ("Id,Target\n10580_1610_C1_1,0\n10580_" + "1" * 250 + ",1\n",
                                    ["line 3", "256 bytes long", "at most 229"]),
    "too many fields": ("Id,Target\n10580_1610_C1_1,0,3\n", ["line 2", "3 fields"]),
    "no image with --classes": ("Id,Target\n10580_1610_C1_1,0\n", ["--classes 27", "no image"]),
}


@pytest.mark.parametrize("name", HPAV18_LABEL_CASES)
def test_download_label_csv(capsys, tmp_path, name):
    content, parts = HPAV18_LABEL_CASES[name]
    labels = tmp_path / "HPAv18RBGY_wodpl.csv"
    if content is not None:
        labels.write_text(content)
    code, out, err = cli_in_process(capsys, "download-hpav18", labels, "--base-url", NO_SERVER, "--out",
                                    tmp_path / "out", "--classes", "27")
    assert_cli_error(code, out, err, *([] if "--classes" in parts[0] else [labels]), *parts)
    assert not (tmp_path / "out").exists()


def test_download_never_writes_over_its_label_csv_a_file_or_a_competition_folder(capsys, tmp_path):
    out = tmp_path / "hpav18"
    out.mkdir()
    labels = out / "train.csv"
    labels.write_text("Id,Target\n10580_1610_C1_1,0\n")
    code, stdout, err = cli_in_process(capsys, "download-hpav18", labels, "--base-url", NO_SERVER, "--out", out)
    assert_cli_error(code, stdout, err, "--out", "which this command reads")
    assert labels.read_text() == "Id,Target\n10580_1610_C1_1,0\n" and sorted(os.listdir(out)) == ["train.csv"]
    (tmp_path / "file").write_text("x")
    code, stdout, err = cli_in_process(capsys, "download-hpav18", labels, "--base-url", NO_SERVER, "--out",
                                       tmp_path / "file")
    assert_cli_error(code, stdout, err, "--out", "not a folder")
    kaggle = write_hpa2018(tmp_path / "hpa2018", n=2)  # the competition's folder is no place for HPAv18
    before = (kaggle / "train.csv").read_text()
    code, stdout, err = cli_in_process(capsys, "download-hpav18", labels, "--base-url", NO_SERVER, "--out", kaggle)
    assert_cli_error(code, stdout, err, "--out", "train.csv that download-hpav18 did not write")
    assert (kaggle / "train.csv").read_text() == before


# --- tune: search spaces and the search's flags, refused before any trial ----------------------------

SPACE_CASES = {  # the space file's text -> what the one error line names
    "unknown field": ('learning_rate = { low = 1e-4, high = 1e-2 }\n', ["'learning_rate'", "not a training flag"]),
    "a flag's other spelling": ('focal-gamma = { low = 1.0, high = 2.0 }\n', ["did you mean focal_gamma"]),
    "empty range": ('lr = { low = 1e-2, high = 1e-4, log = true }\n', ["'lr'", "is empty"]),
    "one-value range": ('wd = { low = 0.01, high = 0.01 }\n', ["'wd'", "is empty"]),
    "log range through zero": ('wd = { low = 0.0, high = 0.1, log = true }\n', ["'wd'", "above 0"]),
    "value the flag refuses": ('valid_pct = { choices = [0.0, 0.2] }\n', ["'valid_pct'", "--valid-pct must be between"]),
    "range end the flag refuses": ('bs = { low = 0, high = 64 }\n', ["'bs'", "--bs must be at least 1"]),
    "a value inside an integer range the flag refuses": ('n_folds = { low = 0, high = 3 }\n', ["'n_folds'", "(got 1)"]),
    "fractions for a whole-number flag": ('bs = { low = 8.5, high = 32 }\n', ["'bs'", "whole numbers"]),
    "unknown loss": ('loss = { choices = ["bce", "hinge"] }\n', ["'loss'", "--loss must be one of"]),
    "unknown architecture": ('arch = { choices = ["resnet18", "vgg99"] }\n', ["'arch'", "unknown architecture"]),
    "not searchable": ('seed = { choices = [1, 2] }\n', ["'seed'", "--seed cannot be searched"]),
    "not a table": ('lr = 0.001\n', ["'lr'", "must be a table"]),
    "choices and a range": ('lr = { choices = ["auto"], low = 1e-3, high = 1e-2 }\n', ["'lr'", "not both"]),
    "empty choices": ('loss = { choices = [] }\n', ["'loss'", "non-empty list"]),
    "a choice twice": ('bs = { choices = [16, 16] }\n', ["'bs'", "listed twice"]),
    "unknown key": ('lr = { lo = 1e-3, high = 1e-2 }\n', ["'lr'", "unknown key 'lo'"]),
    "half a range": ('lr = { low = 1e-3 }\n', ["'lr'", "both low and high"]),
    "a range of text": ('loss = { low = 1, high = 2 }\n', ["'loss'", "not a number"]),
    "infinite end": ('lr = { low = 1e-3, high = inf }\n', ["'lr'", "finite"]),
    "not TOML": ('lr = { low = \n', ["not valid TOML"]),
    "empty file": ('', ["names no field"]),
    "not UTF-8": (b'lr = { low = 1e-3, high = 1e-2 } # \xff\n', ["not UTF-8"]),
}


@pytest.mark.parametrize("name", SPACE_CASES)
def test_tune_space(make_z2g, tmp_path, capsys, name):
    text, parts = SPACE_CASES[name]
    space = tmp_path / "space.toml"
    space.write_bytes(text if isinstance(text, bytes) else text.encode())
    code, out, err = cli_in_process(capsys, "tune", "--data", make_z2g(n=8), "--arch", "cnn", "--no-pretrained",
                                    "--out", tmp_path / "runs", "--space", space)
    assert_cli_error(code, out, err, f"--space {space}", *parts)
    assert not (tmp_path / "runs").exists()  # nothing written: no study folder, no journal


def test_tune_space_file_that_is_missing_a_folder_or_a_fifo(make_z2g, tmp_path, capsys):
    data = make_z2g(n=8)
    fifo = tmp_path / "space.fifo"
    os.mkfifo(fifo)
    for space, part in ((tmp_path / "missing.toml", "cannot read"), (tmp_path, "not a regular file"),
                        (fifo, "not a regular file")):
        code, out, err = finishes(lambda: cli_in_process(capsys, "tune", "--data", data, "--arch", "cnn", "--out",
                                                         tmp_path / "runs", "--space", space), [fifo])
        assert_cli_error(code, out, err, f"--space {space}", part)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args,parts", [
    (["--study", "a/b"], ["--study", "plain name"]), (["--study", ""], ["--study"]),
    (["--storage", "sqlite:///study.db"], ["--storage", "PostgreSQL URL"]),
    (["--storage", "postgresql://u:p@host/db with space"], ["--storage"]),
    (["--jobs", "0"], ["--jobs"]), (["--jobs", "65"], ["--jobs"]), (["--n-trials", "0"], ["--n-trials"]),
    (["--timeout", "-5"], ["--timeout"]), (["--timeout", "nan"], ["--timeout"]), (["--confirm", "-1"], ["--confirm"]),
    (["--resume", "runs/x"], ["--resume is not for tune"]), (["--wd", "nan"], ["--wd"]), (["--wd", "2"], ["--wd"]),
])
def test_tune_flag_refused_before_any_data_is_read(capsys, tmp_path, args, parts):
    code, out, err = cli_in_process(capsys, "tune", *args, "--data", tmp_path / "nowhere", "--arch", "cnn",
                                    "--out", tmp_path / "runs")
    assert_cli_error(code, out, err, *parts)
    assert not (tmp_path / "runs").exists()


def test_tune_refuses_a_server_it_cannot_reach_in_one_line_without_the_password(make_z2g, tmp_path, capsys):
    pytest.importorskip("psycopg")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, out, err = cli_in_process(capsys, "tune", "--data", make_z2g(n=8), "--arch", "cnn", "--out",
                                    tmp_path / "runs", "--storage", f"postgresql://hpa:secret@127.0.0.1:{port}/db")
    assert_cli_error(code, out, err, "--storage postgresql+psycopg://hpa:***@127.0.0.1", "cannot use the database")
    assert "secret" not in out + err and not (tmp_path / "runs").exists()
