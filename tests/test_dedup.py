"""Near-duplicates: the perceptual hash finds planted copies and nothing else, and the training
splits keep each duplicate group on one side."""
from __future__ import annotations

import io
from itertools import combinations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from hpa_fastai.config import TrainConfig
from hpa_fastai.data.splits import make_splitter
from hpa_fastai.data.dedup import find_duplicates, green_stain, hash_images, near_pairs, phash
from hpa_fastai.synth import make_dataset
from hpa_fastai.training.run import prepare

from .helpers import cli_in_process


def planted_groups(data) -> set[frozenset]:
    truth = pd.read_csv(data / "duplicates.csv", dtype=str)
    return {frozenset(pair) for pair in zip(truth["Id"], truth["duplicate_of"])}


def found_groups(csv_path) -> set[frozenset]:
    found = pd.read_csv(csv_path, dtype={"id": str})
    return {frozenset(members) for _, members in found.groupby("group")["id"]}


# Seeds checked against a range of others: at 128 px the planted copies (rescaled, JPEG-encoded or
# shifted by 1-3 px) hash at most 10 bits from their originals, distinct images at least 12.
@pytest.mark.parametrize("fmt, seed", [("hpa2018", 3), ("z2g", 6)])
def test_dedup_finds_exactly_the_planted_duplicates(fmt, seed, tmp_path, capsys):
    data = make_dataset(tmp_path / fmt, fmt, n_train=40, n_test=0, size=128, seed=seed, plant_duplicates=6)
    planted = planted_groups(data)
    assert len(planted) == 6
    code, out, err = cli_in_process(capsys, "dedup", "--data", data, "--max-distance", 10)
    assert code == 0, err
    assert found_groups(data / "duplicates.csv") == planted
    assert "12 of 46 images fall in 6 near-duplicate group(s)" in out
    found = pd.read_csv(data / "duplicates.csv", dtype={"id": str})
    assert list(found.columns) == ["id", "group", "distance"]
    assert (found.groupby("group")["distance"].first() == 0).all() and found["distance"].max() <= 10

    # training now reads the groups from that file: every split keeps each pair on one side
    for n_folds, fold in [(0, 0), (3, 0), (3, 2)]:
        prep = prepare(TrainConfig(data=str(data), n_folds=n_folds, fold=fold, seed=1, size=32))
        splitter = make_splitter(prep.items, 28 if fmt == "hpa2018" else 10, 0.2, 1, n_folds, fold)
        train_idx, valid_idx = splitter(prep.items)
        valid_ids = set(prep.items["id"].iloc[valid_idx])
        assert len(valid_idx) and len(train_idx)
        for pair in planted:
            assert len(pair & valid_ids) in (0, 2), (n_folds, fold, pair)


def test_groups_are_transitive_and_distances_are_to_the_first_member():
    a = 0
    b = a ^ 0b11  # 2 bits from a
    c = b ^ 0b1100  # 2 bits from b, 4 from a
    far = (1 << 64) - 1  # every bit differs
    out = find_duplicates(["a", "x", "b", "c", "far"], np.array([a, far ^ 0xFF, b, c, far], dtype=np.uint64), 3)
    assert list(out["id"]) == ["a", "b", "c"]
    assert list(out["group"]) == [0, 0, 0]
    assert list(out["distance"]) == [0, 2, 4]  # c joins through b although it is 4 bits from a


def test_blocked_pair_search_matches_brute_force():
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, 200, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, 200, dtype=np.uint64)
    hashes[150:] = hashes[:50] ^ (np.uint64(1) << rng.integers(0, 64, 50, dtype=np.uint64))  # 1-bit copies
    expected = {(i, j) for i, j in combinations(range(200), 2)
                if bin(int(hashes[i]) ^ int(hashes[j])).count("1") <= 3}
    for block in (7, 64, None):
        i, j, d = near_pairs(hashes, 3, block=block)
        assert set(zip(i.tolist(), j.tolist())) == expected
        assert all(bin(int(hashes[x]) ^ int(hashes[y])).count("1") == dd for x, y, dd in zip(i, j, d))
    assert len(expected) >= 50


def _jpeg(im: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.convert("L").save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("F")


def _shift(im: Image.Image, dy: int, dx: int) -> Image.Image:
    arr = np.pad(np.asarray(im), 3, mode="edge")
    return Image.fromarray(arr[3 + dy:3 + dy + im.height, 3 + dx:3 + dx + im.width])


def test_hash_of_real_images_survives_resize_jpeg_and_shift(hpa_real):
    """Real 512 px green stains: a copy at HPAv18's 2048 px, a JPEG re-encoding or a 1-2 px shift
    stays within 8 bits; distinct fields are at least 16 bits apart."""
    files = sorted((hpa_real / "kaggle2018" / "train_sample_single_channel" / "images").glob("*_green.png"))
    if not files:
        pytest.skip("no green images in the real sample")
    hashes = hash_images([str(f) for f in files])
    distinct = np.bitwise_count(hashes[:, None] ^ hashes[None, :])[np.triu_indices(len(files), 1)]
    assert distinct.min() >= 16
    for path, h in zip(files, hashes):
        stain = green_stain(str(path))
        copies = [stain.resize((2048, 2048), Image.Resampling.BILINEAR), _jpeg(stain, 75),
                  _shift(stain, 1, -2), _shift(stain, -2, 1), _jpeg(_shift(stain.resize((1024, 1024)), 2, 2), 85)]
        for copy in copies:
            assert int(np.bitwise_count(np.uint64(phash(copy)) ^ h)) <= 8, path.name


def test_splitters_keep_groups_whole_and_folds_partition():
    rng = np.random.default_rng(0)
    n = 60
    labels = [" ".join(map(str, sorted(set(rng.integers(0, 5, rng.integers(1, 3)).tolist())))) for _ in range(n)]
    groups = [f"g{i // 3}" if i < 30 else f"single{i}" for i in range(n)]  # ten groups of three
    df = pd.DataFrame({"labels": labels, "group": groups})
    member_sets = df.groupby("group").groups

    def intact(valid) -> bool:
        valid = set(valid.tolist())
        return all(len(valid & set(rows)) in (0, len(rows)) for rows in member_sets.values())

    train_idx, valid_idx = make_splitter(df, 5, 0.25, seed=3)(df)
    assert intact(np.asarray(valid_idx)) and 0.15 * n <= len(valid_idx) <= 0.25 * n
    assert sorted([*train_idx, *valid_idx]) == list(range(n))
    folds = [np.asarray(make_splitter(df, 5, 0.2, 3, n_folds=4, fold=k)(df)[1]) for k in range(4)]
    assert all(intact(f) for f in folds)
    assert sorted(np.concatenate(folds).tolist()) == list(range(n))


def test_synth_duplicates_csv_is_read_by_prepare(tmp_path, capsys):
    data = make_dataset(tmp_path / "d", "hpa2018", n_train=24, n_test=0, size=16, seed=0, plant_duplicates=4)
    prep = prepare(TrainConfig(data=str(data), size=16))
    assert "4 near-duplicate groups" in capsys.readouterr().out
    by_id = dict(zip(prep.items["id"], prep.items["group"]))
    for pair in planted_groups(data):
        a, b = sorted(pair)
        assert by_id[a] == by_id[b]
    assert prep.items["group"].nunique() == len(prep.items) - 4


def test_dedup_rejects_a_bad_distance_and_an_unknown_duplicates_file(tmp_path, capsys, make_hpa2018):
    data = make_hpa2018(n=4)
    code, _, err = cli_in_process(capsys, "dedup", "--data", data, "--max-distance", 65)
    assert code == 2 and "--max-distance" in err
    (data / "duplicates.csv").write_text("a,b\n1,2\n")
    code, _, err = cli_in_process(capsys, "--data", data, "--epochs", 1, "--arch", "cnn")
    assert code == 2 and "duplicates.csv: expected columns id,group" in err
