"""Data folders in both competition layouts: detection, CSV reading, and every bad input as one clear error."""
from __future__ import annotations

import os

import numpy as np
import pytest

from hpa_fastai.config import TrainConfig
from hpa_fastai.errors import HPAError
from hpa_fastai.data.images import verify_images
from hpa_fastai.data.layouts import (CHANNELS, check_id, detect_format, key_files, parse_labels, read_items,
                                     scan_images)
from hpa_fastai.training.run import prepare

from .conftest import write_png
from .helpers import run_cli


def cfg_for(data, **kw) -> TrainConfig:
    return TrainConfig(data=str(data), arch="cnn", pretrained=False, **kw)


def set_row(data_dir, index: int, text: str) -> None:
    """Replace data row ``index`` (line index + 2) of train.csv."""
    csv_path = data_dir / "train.csv"
    lines = csv_path.read_text().splitlines()
    lines[index + 1] = text
    csv_path.write_text("\n".join(lines) + "\n")


# --- detection and loading -------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["z2g", "hpa2018"])
def test_detect_format(make_data, fmt):
    data = make_data(fmt, n=3)
    found = detect_format(data)
    assert found.name == fmt
    assert found.default_channels == ("rgby" if fmt == "hpa2018" else "rgb")


def test_read_items_z2g(make_z2g):
    data = make_z2g(n=3, labels=["3 1 3", "0", "9"])
    items = read_items(data)
    assert list(items.columns) == ["id", "key", "labels"]
    assert items["id"].tolist() == ["img0", "img1", "img2"]
    assert items["key"].tolist() == [str(data / "train" / f"img{i}.png") for i in range(3)]
    assert items["labels"].tolist() == ["1 3", "0", "9"]  # sorted, duplicates dropped


def test_read_items_hpa2018(make_hpa2018):
    data = make_hpa2018(n=3, labels=["27 0", "14", "5 6"])
    items = read_items(data)
    assert items["id"].tolist() == ["id-0000", "id-0001", "id-0002"]
    assert items["labels"].tolist() == ["0 27", "14", "5 6"]
    key = items["key"].iloc[1]
    assert key_files(key) == [str(data / "train" / f"id-0001_{c}.png") for c in CHANNELS]
    assert all(os.path.isfile(f) for f in key_files(key))


def test_rgb_from_channel_files_needs_no_yellow(make_hpa2018):
    data = make_hpa2018(n=3, stains=("red", "green", "blue"))
    assert len(read_items(data, channels="rgb")) == 3
    with pytest.raises(HPAError, match="yellow.png not found"):
        read_items(data, channels="rgby")


Z2G_ROWS = [("img0", "1 2"), ("img1", "3"), ("img2", "0")]
TOLERATED_CSVS = {
    "bom": "\ufeffImage,Label\nimg0,1 2\nimg1,3\nimg2,0\n",
    "crlf": "Image,Label\r\nimg0,1 2\r\nimg1,3\r\nimg2,0\r\n",
    "padding spaces": "Image , Label \nimg0 ,  1 2  \n  img1,3 \nimg2,0   \n",
    "quoted": '"Image","Label"\n"img0","1 2"\n"img1","3"\n"img2","0"\n',
    "extra columns": "Source,Image,Label,Notes\nx,img0,1 2,a b\ny,img1,3,\nz,img2,0,\"c, d\"\n",
    "columns swapped": "Label,Image\n1 2,img0\n3,img1\n0,img2\n",
    "blank lines, no final newline": "Image,Label\n\nimg0,1 2\n\n\nimg1,3\nimg2,0",
    "trailing commas": "Image,Label\nimg0,1 2,\nimg1,3,\nimg2,0,\n",
    "all at once": '\ufeff"Image" ,Label,Extra\r\n "img0" , "1 2" ,x\r\n\r\nimg1,3 ,\r\nimg2,"0",y\r\n',
}


@pytest.mark.parametrize("name", TOLERATED_CSVS)
def test_tolerated_csv_variants(make_z2g, name):
    data = make_z2g(n=3, labels=[lab for _, lab in Z2G_ROWS])
    (data / "train.csv").write_bytes(TOLERATED_CSVS[name].encode("utf-8"))
    assert detect_format(data).name == "z2g"
    items = read_items(data)
    assert list(zip(items["id"], items["labels"])) == Z2G_ROWS


def test_hpa2018_csv_with_bom_crlf_and_quotes(make_hpa2018):
    data = make_hpa2018(n=2)
    (data / "train.csv").write_bytes(b'\xef\xbb\xbfId,Target\r\n"id-0000","27 3"\r\nid-0001 , 0 \r\n')
    items = read_items(data)
    assert list(zip(items["id"], items["labels"])) == [("id-0000", "3 27"), ("id-0001", "0")]


def test_error_line_numbers_count_blank_lines(make_z2g):
    data = make_z2g(n=3)
    (data / "train.csv").write_text("Image,Label\n\nimg0,1\n\nimg1,x\nimg2,0\n")
    with pytest.raises(HPAError, match=r"train\.csv, line 5: label 'x'"):
        read_items(data)


def test_row_with_an_extra_field_is_an_error_not_a_column_shift(make_z2g):
    # "1,3" instead of "1 3": pandas would silently make the ids the index and read "3" as the label
    data = make_z2g(n=3)
    set_row(data, 0, "img0,1,3")
    with pytest.raises(HPAError, match=r"train\.csv, line 2: 3 fields, but the header has 2"):
        read_items(data)


@pytest.mark.parametrize("image_id", ["../x", "a/b", "a\\b", "..", ""])
def test_check_id_refuses_paths(image_id):
    with pytest.raises(HPAError, match="train.csv, line 7"):
        check_id(image_id, "train.csv, line 7")


def test_check_id_accepts_competition_ids():
    for image_id in ["00070df0-bbc3-11e8-b2bc-ac1f6b6435d0", "10580_1610_C1_1", "a.b"]:
        assert check_id(image_id, "x") == image_id


@pytest.mark.parametrize("text,message", [("", "no label"), ("1.5", "'1.5' is not an integer"),
                                          ("a", "'a' is not an integer"), ("-1", "-1 is outside"),
                                          ("10", "10 is outside the vocabulary 0..9")])
def test_parse_labels_errors(text, message):
    with pytest.raises(HPAError, match=message):
        parse_labels(text, 10, "where")


def test_scan_images_groups_stain_files(make_hpa2018):
    data = make_hpa2018(n=2)
    items = scan_images(data / "train", "rgby")
    assert items["id"].tolist() == ["id-0000", "id-0001"]
    assert key_files(items["key"].iloc[0]) == [str(data / "train" / f"id-0000_{c}.png") for c in CHANNELS]
    (data / "train" / "id-0001_green.png").unlink()
    with pytest.raises(HPAError, match="id-0001_green.png: channel file missing"):
        scan_images(data / "train", "rgby")


def test_scan_images_refuses_rgb_files_for_rgby(make_z2g):
    data = make_z2g(n=2)
    assert scan_images(data / "train", "rgb")["id"].tolist() == ["img0", "img1"]
    with pytest.raises(HPAError, match="needs one file per stain"):
        scan_images(data / "train", "rgby")


# --- bad inputs: one HPAError naming the file (and line) before any model is built ------------

def png_bytes(data_dir, name):
    return (data_dir / "train" / name).read_bytes()


def corrupt(data_dir, name, content: bytes):
    (data_dir / "train" / name).write_bytes(content)
    return [str(data_dir / "train" / name)]


def replace_image(data_dir, name, array):
    write_png(data_dir / "train" / name, array)
    return [str(data_dir / "train" / name)]


def remove_csv(data_dir):
    (data_dir / "train.csv").unlink()
    return [str(data_dir / "train.csv"), "not found"]


def rename_image_folder(data_dir):
    (data_dir / "train").rename(data_dir / "images")
    return [str(data_dir / "train"), "image folder not found"]


def truncate(name, keep):
    def mutate(data_dir):
        content = png_bytes(data_dir, name)
        return corrupt(data_dir, name, content[:keep(len(content))])
    return mutate


def resize_green(data_dir):
    write_png(data_dir / "train" / "id-0001_green.png", np.zeros((20, 16), np.uint8))
    return [str(data_dir / "train" / "id-0001_red.png"), "differ in size", "16x16, 16x20"]


def escape_parent(data_dir):
    write_png(data_dir / "x.png", np.zeros((16, 16, 3), np.uint8))  # the file exists, the id is still refused
    set_row(data_dir, 1, "../x,1")
    return ["train.csv, line 3", "'../x'"]


def escape_subfolder(data_dir):
    write_png(data_dir / "train" / "a" / "b.png", np.zeros((16, 16, 3), np.uint8))
    set_row(data_dir, 1, "a/b,1")
    return ["train.csv, line 3", "'a/b'"]


def row(index, text, *expected):
    def mutate(data_dir):
        set_row(data_dir, index, text)
        return [f"{data_dir / 'train.csv'}, line {index + 2}", *expected]
    return mutate


def csv_text(text, *expected):
    def mutate(data_dir):
        (data_dir / "train.csv").write_text(text)
        return [str(data_dir / "train.csv"), *expected]
    return mutate


def remove(name, line):
    def mutate(data_dir):
        (data_dir / "train" / name).unlink()
        return [f"{data_dir / 'train.csv'}, line {line}", str(data_dir / "train" / name), "not found"]
    return mutate


RNG = np.random.default_rng(0)
BAD_INPUTS = {
    # name: (format, mutation returning the substrings the message must contain)
    "missing csv": ("z2g", remove_csv),
    "missing image folder": ("z2g", rename_image_folder),
    "missing image": ("z2g", remove("img3.png", line=5)),
    "missing channel file": ("hpa2018", remove("id-0002_yellow.png", line=4)),
    "corrupt png": ("z2g", lambda d: corrupt(d, "img1.png", RNG.integers(0, 256, 300, np.uint8).tobytes())),
    "corrupt stain png": ("hpa2018", lambda d: corrupt(d, "id-0001_blue.png", b"\x89PNG\r\n\x1a\n" + bytes(100))),
    "truncated png": ("z2g", truncate("img2.png", lambda n: n // 2)),
    "truncated stain png": ("hpa2018", truncate("id-0003_green.png", lambda n: n - 30)),
    "zero-byte png": ("z2g", lambda d: corrupt(d, "img0.png", b"")),
    "wrong columns": ("z2g", csv_text("Name,Labels\nimg0,1\n", "expected columns Image,Label")),
    "empty csv": ("z2g", csv_text("", "empty")),
    "header-only csv": ("hpa2018", csv_text("Id,Target\n", "no rows")),
    "label outside vocabulary (z2g)": ("z2g", row(2, "img2,3 10", "label 10 is outside the vocabulary 0..9")),
    "label outside vocabulary (hpa2018)": ("hpa2018", row(1, "id-0001,28", "outside the vocabulary 0..27")),
    "negative label": ("z2g", row(0, "img0,-1", "outside the vocabulary")),
    "non-integer label": ("z2g", row(3, "img3,1.0", "'1.0' is not an integer")),
    "comma-separated labels": ("z2g", row(0, "img0,1,3", "3 fields, but the header has 2")),
    "empty label": ("hpa2018", row(2, "id-0002,", "no label")),
    "duplicated id": ("z2g", row(4, "img1,2", "duplicated id 'img1' (first at line 3)")),
    "id escaping to parent": ("z2g", escape_parent),
    "id with a folder": ("z2g", escape_subfolder),
    "RGBA where RGB expected": ("z2g", lambda d: replace_image(d, "img1.png", np.zeros((16, 16, 4), np.uint8))
                                + ["mode is RGBA", "expected 8-bit RGB"]),
    "grayscale where RGB expected": ("z2g", lambda d: replace_image(d, "img1.png", np.zeros((16, 16), np.uint8))
                                     + ["mode is L", "expected 8-bit RGB"]),
    "16-bit where RGB expected": ("z2g", lambda d: replace_image(d, "img1.png", np.zeros((16, 16), np.uint16))
                                  + ["mode is I;16", "expected 8-bit RGB"]),
    "colour stain file in another stain's colour": (
        "hpa2018", lambda d: replace_image(d, "id-0001_red.png", np.stack(
            [np.zeros((16, 16), np.uint8), RNG.integers(50, 256, (16, 16), np.uint8), np.zeros((16, 16), np.uint8)], -1))
        + ["not a red stain file", "outside the red colour"]),
    "RGBA stain file": ("hpa2018", lambda d: replace_image(d, "id-0001_red.png", np.zeros((16, 16, 4), np.uint8))
                        + ["mode is RGBA", "expected 8-bit grayscale or RGB colour"]),
    "16-bit stain file": ("hpa2018", lambda d: replace_image(d, "id-0002_yellow.png",
                                                             np.full((16, 16), 1000, np.uint16))
                          + ["mode is I;16", "expected 8-bit grayscale"]),
    "stain files of different sizes": ("hpa2018", resize_green),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_is_one_clear_error(make_data, name):
    fmt, mutate = BAD_INPUTS[name]
    data = make_data(fmt, n=6)
    expected = mutate(data)
    with pytest.raises(HPAError) as info:
        prepare(cfg_for(data))
    message = str(info.value)
    assert "\n" not in message
    for part in expected:
        assert part in message


def test_missing_data_folder(tmp_path):
    with pytest.raises(HPAError, match=f"{tmp_path / 'nowhere'}: data folder not found"):
        prepare(cfg_for(tmp_path / "nowhere"))


def test_rgby_on_rgb_data_is_refused(make_z2g):
    with pytest.raises(HPAError, match="--channels rgby needs one file per stain"):
        prepare(cfg_for(make_z2g(n=3), channels="rgby"))


def test_header_check_finds_truncated_png(make_z2g):
    # prepare() decodes only a sample fully (channel statistics); the quick check of every image
    # must still catch a cut-off file, or training would stop mid-epoch.
    data = make_z2g(n=4, size=32)
    path = data / "train" / "img2.png"
    path.write_bytes(path.read_bytes()[:-20])
    items = read_items(data)
    assert verify_images(items, "rgb") == {str(path): f"{path}: truncated image (the PNG has no end chunk)"}


def test_png_with_trailing_bytes_is_still_accepted(make_z2g):
    data = make_z2g(n=3)
    path = data / "train" / "img1.png"
    path.write_bytes(path.read_bytes() + b"\x00" * 16)
    assert verify_images(read_items(data), "rgb", deep=True) == {}
    assert verify_images(read_items(data), "rgb") == {}


@pytest.mark.parametrize("case", ["label outside vocabulary (z2g)", "corrupt stain png"])
def test_cli_reports_bad_input_in_one_line(make_data, tmp_path, case):
    fmt, mutate = BAD_INPUTS[case]
    data = make_data(fmt, n=6)
    expected = mutate(data)
    runs = tmp_path / "runs"
    proc = run_cli("--data", data, "--arch", "cnn", "--epochs", "1", "--no-pretrained", "--out", runs,
                   cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    for part in expected:
        assert part in lines[0]
    assert not runs.exists()  # stopped before the run folder and the model


# --- --skip-bad --------------------------------------------------------------------------------

def test_skip_bad_drops_bad_rows_z2g(make_z2g):
    data = make_z2g(n=10)
    (data / "train" / "img1.png").unlink()                       # missing file
    set_row(data, 2, "img2,42")                                   # label outside the vocabulary
    set_row(data, 3, "img3,x")                                    # non-integer label
    (data / "train" / "img4.png").write_bytes(b"not a png")       # corrupt
    img5 = data / "train" / "img5.png"
    img5.write_bytes(img5.read_bytes()[: img5.stat().st_size // 2])  # truncated
    prep = prepare(cfg_for(data, skip_bad=True))
    assert prep.items["id"].tolist() == ["img0", "img6", "img7", "img8", "img9"]
    with pytest.raises(HPAError):
        prepare(cfg_for(data))


def test_skip_bad_drops_bad_rows_hpa2018(make_hpa2018):
    data = make_hpa2018(n=6)
    (data / "train" / "id-0000_yellow.png").unlink()
    (data / "train" / "id-0002_red.png").write_bytes(bytes(64))
    set_row(data, 4, "id-0004,")
    prep = prepare(cfg_for(data, skip_bad=True))
    assert prep.items["id"].tolist() == ["id-0001", "id-0003", "id-0005"]
    assert prep.items["labels"].tolist() == read_items(data, skip_bad=True).set_index("id").loc[
        ["id-0001", "id-0003", "id-0005"], "labels"].tolist()


def test_skip_bad_with_nothing_left_is_an_error(make_z2g):
    data = make_z2g(n=2)
    set_row(data, 0, "img0,99")
    set_row(data, 1, "img1,99")
    with pytest.raises(HPAError, match="no usable rows"):
        prepare(cfg_for(data, skip_bad=True))


def test_scan_images_reads_an_rgb_picture_named_like_a_stain_as_one_image(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "cell_green.png")
    for stain in ("red", "green", "blue"):
        Image.new("L", (8, 8)).save(tmp_path / f"well1_{stain}.png")
    items = scan_images(tmp_path, "rgb")
    assert sorted(items["id"]) == ["cell_green", "well1"]
    assert items.set_index("id").loc["cell_green", "key"] == str(tmp_path / "cell_green.png")
    assert "{channel}" in items.set_index("id").loc["well1", "key"]
