"""A read-only data folder (Kaggle's /kaggle/input) preprocesses, dedups and trains: what those
commands derive from it goes into a per-user cache folder of that data set (or under ``--cache`` /
``$HPA_FASTAI_CACHE``), training finds it there, and nothing is written into the data folder.

The end-to-end test mounts the data folder read-only (a bind mount in a mount namespace of its own,
so it never outlives the test); the in-process tests stand in for the mount by having the
writability probe answer no, which is how the code tells (root passes any permission check, so a
chmod would not do)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from hpa_fastai import paths
from hpa_fastai.config import TrainConfig
from hpa_fastai.data.cache import preprocess
from hpa_fastai.data.dedup import dedup
from hpa_fastai.training import prepare

from .conftest import write_z2g
from .helpers import REPO


def with_duplicate(data_dir):
    """A Zero-to-GANs folder in which img12 is a copy of img0 (a near-duplicate pair for dedup)."""
    data_dir = write_z2g(data_dir, n=12, size=32)
    shutil.copy(data_dir / "train" / "img0.png", data_dir / "train" / "img12.png")
    with open(data_dir / "train.csv", "a") as f:
        f.write("img12,0\n")
    return data_dir


def listing(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_mtime_ns) for p in folder.rglob("*"))


@pytest.fixture
def read_only(monkeypatch, tmp_path):
    """The data folders that the writability probe calls read-only, and the per-user cache in tmp_path."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    monkeypatch.delenv(paths.CACHE_ENV, raising=False)
    folders = set()
    real = paths.writable
    monkeypatch.setattr(paths, "writable", lambda folder: folder.resolve() not in folders and real(folder))
    return lambda folder: folders.add(folder.resolve()) or folder


def test_preprocess_dedup_and_training_of_a_read_only_folder_use_the_per_user_cache(tmp_path, read_only, capsys):
    data = read_only(with_duplicate(tmp_path / "input" / "hpa"))
    before = listing(data)
    folder = preprocess(data, 16, workers=1)
    user_cache = tmp_path / "user-cache" / "hpa_fastai"
    assert folder.parent.parent.parent == user_cache and folder.name == "rgb_16"
    assert len(list(folder.glob("*.npy"))) == 13
    out = capsys.readouterr().out
    assert f"{data} is read-only: the per-user cache" in out and str(folder) in out
    csv, dups, _ = dedup(data)
    assert csv == folder.parent.parent / "duplicates.csv" and set(dups["id"]) == {"img0", "img12"}
    capsys.readouterr()
    ts = prepare(TrainConfig(data=str(data), arch="cnn", pretrained=False, size=16, bs=4, workers=0))
    out = capsys.readouterr().out
    assert f"reading 13 images from the preprocessed cache {folder}" in out
    assert f"{csv}: 2 images in 1 near-duplicate groups" in out
    assert ts.items.set_index("id").loc["img12", "group"] == "img0"
    assert listing(data) == before  # nothing written into the data folder


def test_cache_flag_and_environment_variable_put_a_folder_per_data_set_there(tmp_path, monkeypatch, capsys):
    # two data sets of the same name never share entries
    first, second = write_z2g(tmp_path / "a" / "data", n=3, size=24), write_z2g(tmp_path / "b" / "data", n=3, size=24)
    a = preprocess(first, 16, workers=1, cache=str(tmp_path / "flag"))
    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "env"))
    b = preprocess(second, 16, workers=1)
    assert a.is_relative_to(tmp_path / "flag") and b.is_relative_to(tmp_path / "env")
    assert a.parent.parent.name != b.parent.parent.name and a.parent.parent.name.startswith("data-")
    assert "$HPA_FASTAI_CACHE" in capsys.readouterr().out
    assert not (first / "cache").exists() and not (second / "cache").exists()
    monkeypatch.delenv(paths.CACHE_ENV)
    capsys.readouterr()
    prepare(TrainConfig(data=str(first), arch="cnn", pretrained=False, size=16, bs=2, workers=0,
                        cache=str(tmp_path / "flag")))
    assert f"from the preprocessed cache {a}" in capsys.readouterr().out
    # without the flag the data folder is writable, has no cache, and the originals are decoded
    ts = prepare(TrainConfig(data=str(first), arch="cnn", pretrained=False, size=16, bs=2, workers=0))
    assert all(k.endswith(".png") for k in ts.items["key"])


def test_a_cache_made_in_the_data_folder_is_read_after_it_became_read_only(tmp_path, read_only, capsys):
    data = write_z2g(tmp_path / "data", n=3, size=24)
    folder = preprocess(data, 16, workers=1)
    assert folder == data / "cache" / "rgb_16"
    read_only(data)
    capsys.readouterr()
    prepare(TrainConfig(data=str(data), arch="cnn", pretrained=False, size=16, bs=2, workers=0))
    assert f"from the preprocessed cache {folder}" in capsys.readouterr().out


def test_duplicates_flag_names_the_list_that_training_keeps_together(tmp_path, capsys):
    data = with_duplicate(tmp_path / "data")
    csv, _, _ = dedup(data, out=tmp_path / "elsewhere.csv")
    assert not (data / "duplicates.csv").exists()
    ts = prepare(TrainConfig(data=str(data), arch="cnn", pretrained=False, size=16, bs=4, workers=0))
    assert "group" not in ts.items  # not found where training looks by default
    ts = prepare(TrainConfig(data=str(data), arch="cnn", pretrained=False, size=16, bs=4, workers=0,
                             duplicates=str(csv)))
    assert ts.items.set_index("id").loc["img12", "group"] == "img0"


def test_the_bundled_sample_is_never_written_into(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    monkeypatch.delenv(paths.CACHE_ENV, raising=False)
    folder, why = paths.derived_dir(paths.SAMPLE_DIR)
    assert folder.is_relative_to(tmp_path / "user-cache") and "bundled sample" in why


def _mount_works() -> bool:
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o ro none /mnt"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.slow
def test_a_read_only_mount_preprocesses_dedups_and_trains_from_the_command_line(tmp_path):
    if not _mount_works():
        pytest.skip("no mount namespace for a read-only bind mount here (needs root and unshare); "
                    "the in-process tests above take the same code path")
    source = with_duplicate(tmp_path / "source")
    data = tmp_path / "input" / "hpa"  # the read-only view of source, as /kaggle/input/<dataset>
    data.mkdir(parents=True)
    before = listing(source)
    env = {k: v for k, v in os.environ.items() if k != paths.CACHE_ENV}
    env.update(PYTHONPATH=str(REPO), XDG_CACHE_HOME=str(tmp_path / "user-cache"))

    def cli(*args):
        script = f'mount --bind "{source}" "{data}" && mount -o remount,bind,ro "{data}" && exec "$@"'
        return subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", sys.executable, str(REPO / "run.py"),
                               *map(str, args)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)

    probe = subprocess.run(["unshare", "-m", "sh", "-c", f'mount --bind "{source}" "{data}" && mount -o '
                            f'remount,bind,ro "{data}" && touch "{data}/x"'], capture_output=True, text=True)
    assert probe.returncode != 0 and "Read-only file system" in probe.stderr  # the mount is read-only
    pre = cli("preprocess", "--data", data, "--size", "16", "--workers", "1")
    assert pre.returncode == 0 and "Traceback" not in pre.stderr, pre.stderr
    assert "is read-only: the per-user cache" in pre.stdout
    dd = cli("dedup", "--data", data)
    assert dd.returncode == 0, dd.stderr
    assert "now keeps each group on one side of the split" in dd.stdout
    train = cli("--data", data, "--arch", "cnn", "--no-pretrained", "--epochs", "1", "--size", "16", "--bs", "4",
                "--lr", "1e-3", "--out", tmp_path / "runs")
    assert train.returncode == 0, train.stderr[-2000:]
    user_cache = str(tmp_path / "user-cache" / "hpa_fastai")
    assert f"reading 13 images from the preprocessed cache {user_cache}" in train.stdout
    assert "2 images in 1 near-duplicate groups" in train.stdout
    assert listing(source) == before  # the data folder is as it was
