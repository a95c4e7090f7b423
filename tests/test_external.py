"""External data (HPAv18 layout: JPEG or PNG stain files at any resolution, grayscale or each stain
in its colour as the Atlas serves them) trained together with the Kaggle set through
``--extra-data``, predicted, cached by ``preprocess`` and hashed by ``dedup``."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from hpa_fastai.config import TrainConfig
from hpa_fastai.errors import HPAError
from hpa_fastai.data.cache import cache_dir, preprocess
from hpa_fastai.data.dedup import hash_images
from hpa_fastai.data.images import STAIN_COLOURS, read_image
from hpa_fastai.data.layouts import CHANNELS, FORMATS, check_id, parse_labels, read_csv, read_items
from hpa_fastai.training.run import prepare
from .helpers import train

from .conftest import STAINS, write_png, write_train_csv
from .helpers import cli_in_process, read_json

# the first rows of HPAv18RBGY_wodpl.csv
HPAV18_ROWS = [("10580_1610_C1_1", "13 25 0 2 21"), ("10580_1610_C1_2", "13 25 0 2 21"),
               ("10580_1756_B1_1", "13 25 0 2 21"), ("10580_1756_B1_2", "13 25 0 2 21"),
               ("10580_1758_B1_1", "13 25 0 2 21"), ("10580_1758_B1_2", "13 25 0 2 21")]


def write_hpav18(folder, rows=HPAV18_ROWS, size: int = 48, seed: int = 0, colour: bool = False):
    """An external folder: train.csv (Id,Target) and train/{Id}_{stain}.jpg, 8-bit grayscale JPEG,
    or with ``colour`` each stain drawn in its colour as the Atlas serves them."""
    rng = np.random.default_rng(seed)
    (folder / "train").mkdir(parents=True)
    for image_id, _ in rows:
        for stain in STAINS:
            pixels = rng.integers(0, 200, (size, size), dtype=np.uint8)
            if colour:
                pixels = in_colour(pixels, stain)
            Image.fromarray(pixels).save(folder / "train" / f"{image_id}_{stain}.jpg", format="JPEG", quality=90)
    write_train_csv(folder, "Id,Target", rows)
    return folder


def in_colour(gray: np.ndarray, stain: str) -> np.ndarray:
    """A grayscale stain as an RGB image of it in its colour."""
    return gray[..., None] * np.asarray(STAIN_COLOURS[stain], np.uint8)


def jpeg_file(path, pixels, quality: int = 90, subsampling: int = -1):
    Image.fromarray(pixels).save(path, format="JPEG", quality=quality, subsampling=subsampling)
    return path


def tiny(data, extra, out, **kw) -> TrainConfig:
    return TrainConfig(**{**dict(data=str(data), extra_data=[str(extra)], out=str(out), arch="cnn", epochs=1, bs=4,
                                 size=32, pretrained=False, lr="1e-3", seed=0, freeze_epochs=0), **kw})


@pytest.mark.slow
@pytest.mark.parametrize("colour", [False, True], ids=["grayscale", "colour"])
def test_external_jpeg_set_trains_together_with_the_kaggle_set(make_hpa2018, tmp_path, capsys, colour):
    kaggle = make_hpa2018(n=8, size=32)
    extra = write_hpav18(tmp_path / "hpav18", size=48, colour=colour)
    prep = prepare(tiny(kaggle, extra, tmp_path / "runs"))
    assert len(prep.items) == 8 + len(HPAV18_ROWS)
    external = prep.items[prep.items["id"].isin([r[0] for r in HPAV18_ROWS])]
    assert list(external["id"]) == [r[0] for r in HPAV18_ROWS]
    assert all(key.endswith("_{channel}.jpg") for key in external["key"])
    assert set(external["labels"]) == {"0 2 13 21 25"}
    capsys.readouterr()
    run_dir = train(tiny(kaggle, extra, tmp_path / "runs"))
    counts = re.search(r"(\d+) train / (\d+) valid images", capsys.readouterr().out)
    assert int(counts[1]) + int(counts[2]) == 14
    assert read_json(run_dir / "config.json")["extra_data"] == [str(extra)]
    assert read_json(run_dir / "model.json")["size"] == 32
    # and the model predicts for a folder of such stain files
    code, _, err = cli_in_process(capsys, "predict", "--learner", run_dir, "--data", extra / "train",
                                  "--out", tmp_path / "labels.csv")
    assert code == 0, err
    assert sorted(pd.read_csv(tmp_path / "labels.csv")["image"]) == sorted(r[0] for r in HPAV18_ROWS)


def test_real_hpav18_labels_parse(hpa_real):
    csv_path = hpa_real / "kaggle2018" / "HPAv18RBGY_wodpl.csv"
    if not csv_path.is_file():
        pytest.skip(f"{csv_path} not found")
    df = read_csv(csv_path)
    assert list(df.columns) == ["Id", "Target"] and len(df) == 74606
    for image_id, target in zip(df["Id"], df["Target"]):
        check_id(image_id, str(csv_path))
        parse_labels(target, 28, str(csv_path))
    assert tuple(df.iloc[0]) == HPAV18_ROWS[0]


def test_jpeg_stain_files_are_found_next_to_png_ones(make_hpa2018, tmp_path):
    kaggle = make_hpa2018(n=3)
    write_hpav18(tmp_path / "ext", rows=HPAV18_ROWS[:2])
    for f in (tmp_path / "ext" / "train").iterdir():
        f.rename(kaggle / "train" / f.name)
    write_train_csv(kaggle, "Id,Target", [(f"id-{i:04d}", "1") for i in range(3)] + HPAV18_ROWS[:2])
    keys = list(read_items(kaggle)["key"])
    assert [k.rsplit(".", 1)[1] for k in keys] == ["png"] * 3 + ["jpg"] * 2


def test_extra_data_errors_name_the_flag_or_file(make_hpa2018, make_z2g, tmp_path, capsys):
    kaggle = make_hpa2018(n=4)
    extra = write_hpav18(tmp_path / "ext", rows=HPAV18_ROWS[:2])
    z2g = make_z2g(n=4)
    with pytest.raises(HPAError, match="--extra-data takes HPA 2018-style data"):
        prepare(tiny(z2g, extra, tmp_path / "runs"))
    with pytest.raises(HPAError, match=r"--extra-data .*: no train\.csv"):
        prepare(tiny(kaggle, tmp_path / "nowhere", tmp_path / "runs"))
    write_train_csv(extra, "Id,Target", [HPAV18_ROWS[0], ("id-0001", "3")])  # id-0001 is also a Kaggle id
    for stain in STAINS:
        source = extra / "train" / f"{HPAV18_ROWS[0][0]}_{stain}.jpg"
        (extra / "train" / f"id-0001_{stain}.jpg").write_bytes(source.read_bytes())
    code, _, err = cli_in_process(capsys, "--data", kaggle, "--extra-data", extra, "--arch", "cnn")
    assert code == 2 and "id 'id-0001' is also in --data" in err and "train.csv" in err


# --- colour stain files: the HPAv18 images as the Atlas serves them ------------------------------

def smooth_stain(rng, side: int = 48) -> np.ndarray:
    """A stain with blobs and noise, so that JPEG behaves as on a real field."""
    yy, xx = np.mgrid[:side, :side]
    field = sum(rng.uniform(60, 200) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
                for cy, cx, r in rng.uniform([0, 0, 3], [side, side, 9], (5, 3)))
    return np.clip(field + rng.normal(0, 4, field.shape), 0, 255).astype(np.uint8)


def test_colour_stain_files_read_as_the_band_of_their_stain(tmp_path):
    rng = np.random.default_rng(0)
    gray = {stain: smooth_stain(rng) for stain in CHANNELS}
    for stain in CHANNELS:
        jpeg_file(tmp_path / f"c_{stain}.jpg", in_colour(gray[stain], stain), quality=95, subsampling=0)
        jpeg_file(tmp_path / f"g_{stain}.jpg", gray[stain], quality=95)
    truth = np.stack([gray[s] for s in CHANNELS], -1).astype(float)
    colour = read_image(str(tmp_path / "c_{channel}.jpg"), CHANNELS)
    grayscale = read_image(str(tmp_path / "g_{channel}.jpg"), CHANNELS)
    assert colour.shape == grayscale.shape == (48, 48, 4)
    # each channel holds its own stain: as close to it as the grayscale JPEG, far from the others
    error = np.abs(colour - truth).mean((0, 1))
    assert (error < np.abs(grayscale - truth).mean((0, 1)) + 1.5).all() and (error < 3).all(), error
    for i, stain in enumerate(CHANNELS):
        others = [np.abs(colour[..., i] - gray[o].astype(float)).mean() for o in CHANNELS if o != stain]
        assert min(others) > 5 * error[i]
    # the quick check before training accepts them; resizing works as for grayscale stains
    assert read_image(str(tmp_path / "c_{channel}.jpg"), CHANNELS, header_only=True).shape == (48, 48, 4)
    assert read_image(str(tmp_path / "c_{channel}.jpg"), CHANNELS, size=24).shape == (24, 24, 4)


def test_a_gray_image_saved_as_rgb_is_read_as_a_grayscale_stain(tmp_path):
    gray = smooth_stain(np.random.default_rng(1))
    for stain in CHANNELS:
        Image.fromarray(np.stack([gray] * 3, -1)).save(tmp_path / f"x_{stain}.png")  # as OpenCV writes a gray image
    arr = read_image(str(tmp_path / "x_{channel}.png"), CHANNELS)
    assert all((arr[..., i] == gray).all() for i in range(4))


def test_colour_stains_from_real_pixels_come_back_closest_with_the_atlas_bands(hpa_real, tmp_path):
    """Real 512 px stains of the Kaggle sample, written as the Atlas's colour JPEGs (quality 75 with
    chroma subsampling, the harsher case), read back: R, G, B and the mean of R and G for yellow
    recover the stain better than any other band or PIL's convert("L"); a stain written in another
    stain's colour is refused. Margins: bench/hpav18.py."""
    folder = hpa_real / "kaggle2018" / "rgby_sample" / "train"
    ids = sorted({p.name.rsplit("_", 1)[0] for p in folder.glob("*_green.png")})[:8]
    if not ids:
        pytest.skip(f"no real RGBY images in {folder}")
    for image_id in ids:
        for stain in CHANNELS:
            gray = np.asarray(Image.open(folder / f"{image_id}_{stain}.png"))
            path = jpeg_file(tmp_path / f"{image_id}_{stain}.jpg", in_colour(gray, stain), quality=75)
            rgb = np.asarray(Image.open(path), float)
            candidates = {"R": rgb[..., 0], "G": rgb[..., 1], "B": rgb[..., 2], "L": np.asarray(
                Image.open(path).convert("L"), float), "mean of R and G": rgb[..., :2].mean(-1)}
            read = read_image(str(path).replace(f"_{stain}.", "_{channel}."), (stain,) * 3)[..., 0]
            rmse = lambda a: float(np.sqrt(((a - gray) ** 2).mean()))  # noqa: E731
            assert rmse(read) <= min(rmse(c) for c in candidates.values()) + 0.5, (image_id, stain)
            assert rmse(read) < 12 and rmse(read) < rmse(candidates["L"]) - 0.5 or stain == "yellow"
            wrong = CHANNELS[(CHANNELS.index(stain) + 1) % 4]
            bad = jpeg_file(tmp_path / f"bad_{stain}.jpg", in_colour(gray, wrong), quality=75)
            with pytest.raises(HPAError, match=f"not a {stain} stain file"):
                read_image(str(bad).replace(f"_{stain}.", "_{channel}."), (stain,) * 3, header_only=True)


def test_preprocess_and_dedup_read_colour_stains(tmp_path):
    rows, rng = HPAV18_ROWS[:4], np.random.default_rng(2)
    colour, gray = tmp_path / "colour", tmp_path / "gray"  # the same stains, as colour JPEGs and grayscale PNGs
    (colour / "train").mkdir(parents=True)
    for image_id, _ in rows:
        for stain in CHANNELS:
            pixels = smooth_stain(rng)
            write_png(gray / "train" / f"{image_id}_{stain}.png", pixels)
            jpeg_file(colour / "train" / f"{image_id}_{stain}.jpg", in_colour(pixels, stain))
    for folder in (colour, gray):
        write_train_csv(folder, "Id,Target", rows)
    folder = preprocess(colour, size=32, workers=1)
    assert folder == cache_dir(colour, "rgby", 32)
    for image_id, _ in rows:
        key = str(colour / "train" / f"{image_id}_{{channel}}.jpg")
        cached = np.load(folder / f"{image_id}.npy").transpose(1, 2, 0)
        assert (cached == read_image(key, CHANNELS, 32)).all()
    hashes = [hash_images(read_items(d, FORMATS["hpa2018"])["key"]) for d in (colour, gray)]
    distance = np.bitwise_count(hashes[0][:, None] ^ hashes[1][None, :])
    # the green band of each colour file hashes as the green stain it was made from
    assert (np.diag(distance) <= 4).all() and (distance[~np.eye(4, dtype=bool)] >= 16).all(), distance


def test_a_colour_file_that_is_not_its_stain_is_dropped_by_skip_bad(make_hpa2018, tmp_path, capsys):
    kaggle = make_hpa2018(n=4)
    extra = write_hpav18(tmp_path / "ext", rows=HPAV18_ROWS[:3], colour=True)
    green = extra / "train" / f"{HPAV18_ROWS[1][0]}_green.jpg"
    blue = np.asarray(Image.open(extra / "train" / f"{HPAV18_ROWS[1][0]}_blue.jpg"))
    Image.fromarray(blue).save(green, format="JPEG", quality=90)  # the blue stain under the green one's name
    code, _, err = cli_in_process(capsys, "--data", kaggle, "--extra-data", extra, "--arch", "cnn", "--out", tmp_path)
    assert code == 2 and err.startswith(f"error: {green}: not a green stain file") and len(err.splitlines()) == 1
    prep = prepare(tiny(kaggle, extra, tmp_path / "runs", skip_bad=True))
    assert HPAV18_ROWS[1][0] not in set(prep.items["id"]) and len(prep.items) == 4 + 2
    assert f"{green}: not a green stain file" in capsys.readouterr().out
