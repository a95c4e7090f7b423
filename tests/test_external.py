"""External data (HPAv18 layout: JPEG or PNG stain files at any resolution) trained together with
the Kaggle set through ``--extra-data``."""
from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from hpa_fastai.config import TrainConfig
from hpa_fastai.errors import HPAError
from hpa_fastai.data.layouts import check_id, parse_labels, read_csv, read_items
from hpa_fastai.training.run import prepare
from hpa_fastai.workflows import train

from .conftest import STAINS, write_train_csv
from .helpers import cli_in_process, read_json

# the first rows of HPAv18RBGY_wodpl.csv
HPAV18_ROWS = [("10580_1610_C1_1", "13 25 0 2 21"), ("10580_1610_C1_2", "13 25 0 2 21"),
               ("10580_1756_B1_1", "13 25 0 2 21"), ("10580_1756_B1_2", "13 25 0 2 21"),
               ("10580_1758_B1_1", "13 25 0 2 21"), ("10580_1758_B1_2", "13 25 0 2 21")]


def write_hpav18(folder, rows=HPAV18_ROWS, size: int = 48, seed: int = 0):
    """An external folder: train.csv (Id,Target) and train/{Id}_{stain}.jpg, 8-bit grayscale JPEG."""
    rng = np.random.default_rng(seed)
    (folder / "train").mkdir(parents=True)
    for image_id, _ in rows:
        for stain in STAINS:
            pixels = rng.integers(0, 200, (size, size), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / "train" / f"{image_id}_{stain}.jpg", format="JPEG", quality=90)
    write_train_csv(folder, "Id,Target", rows)
    return folder


def tiny(data, extra, out, **kw) -> TrainConfig:
    return TrainConfig(**{**dict(data=str(data), extra_data=[str(extra)], out=str(out), arch="cnn", epochs=1, bs=4,
                                 size=32, pretrained=False, lr="1e-3", seed=0, freeze_epochs=0), **kw})


@pytest.mark.slow
def test_external_jpeg_set_trains_together_with_the_kaggle_set(make_hpa2018, tmp_path, capsys):
    kaggle = make_hpa2018(n=8, size=32)
    extra = write_hpav18(tmp_path / "hpav18", size=48)
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
