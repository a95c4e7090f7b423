"""Start-up remembers what it checked: a run on data that has not changed since the last one checks no
image again and measures no statistics again; a new, changed or damaged file is still checked and
caught; a record that is damaged, edited or not this tool's is ignored, never trusted or fatal."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from hpa_fastai.config import TrainConfig
from hpa_fastai.data import checked
from hpa_fastai.errors import HPAError
from hpa_fastai.training.run import prepare


@pytest.fixture
def spy(monkeypatch):
    """The item keys each start-up checks, and how many times the statistics are measured."""
    seen = {"checked": [], "stats": 0}
    real_verify, real_stats = checked.verify_images, checked.channel_stats

    def verify(df, *args, **kwargs):
        seen["checked"].append(sorted(df["key"]))
        return real_verify(df, *args, **kwargs)

    def stats(*args, **kwargs):
        seen["stats"] += 1
        return real_stats(*args, **kwargs)

    monkeypatch.setattr(checked, "verify_images", verify)
    monkeypatch.setattr(checked, "channel_stats", stats)
    return seen


def _cfg(data, **kw):
    return TrainConfig(data=str(data), arch="cnn", pretrained=False, lr="1e-3", **kw)


def test_a_second_start_checks_nothing_again_and_a_changed_file_is_checked_and_caught(make_hpa2018, spy):
    data = make_hpa2018(n=12, size=16)
    first = prepare(_cfg(data))
    assert len(spy["checked"]) == 1 and len(spy["checked"][0]) == 12 and spy["stats"] == 1
    again = prepare(_cfg(data))
    assert len(spy["checked"]) == 1 and spy["stats"] == 1  # nothing checked or measured again
    assert (again.mean, again.std) == (first.mean, first.std)
    record = json.loads(checked.record_path(data).read_text())
    assert record["folder"] == str(Path(data).resolve()) and "checked again" in record["about"]

    # one stain file cut short (a download that broke off): its image alone is checked, and refused
    stain = data / "train" / f"{first.items['id'].iloc[3]}_yellow.png"
    stain.write_bytes(stain.read_bytes()[:-20])
    with pytest.raises(HPAError, match=rf"{stain}: truncated image"):
        prepare(_cfg(data))
    assert spy["checked"][-1] == [first.items["key"].iloc[3]]


def test_a_file_replaced_by_another_of_the_same_size_and_time_is_checked_again(make_hpa2018, spy):
    data = make_hpa2018(n=6, size=16)
    ts = prepare(_cfg(data))
    stain = data / "train" / f"{ts.items['id'].iloc[0]}_green.png"
    st = stain.stat()
    replacement = stain.with_name("replacement.tmp")
    replacement.write_bytes(b"\0" * st.st_size)  # not a PNG, same size
    os.utime(replacement, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the same modification time
    os.replace(replacement, stain)  # how a download or an editor writes a file: a new inode
    with pytest.raises(HPAError, match=rf"{stain}: not a readable image"):
        prepare(_cfg(data))


def test_new_rows_are_checked_and_the_statistics_follow_a_changed_sample(make_hpa2018, spy):
    data = make_hpa2018(n=8, size=32)
    prepare(_cfg(data))
    for new_id in ("extra-1", "extra-2"):  # two more images and their rows
        for stain in ("red", "green", "blue", "yellow"):
            (data / "train" / f"{new_id}_{stain}.png").write_bytes((data / "train" / f"id-0000_{stain}.png").read_bytes())
        with open(data / "train.csv", "a") as f:
            f.write(f"{new_id},3\n")
    ts = prepare(_cfg(data))
    assert [Path(k).name for k in spy["checked"][-1]] == ["extra-1_{channel}.png", "extra-2_{channel}.png"]
    assert spy["stats"] == 2  # a sample of other images: measured again
    prepare(_cfg(data, size=16))
    assert spy["stats"] == 3  # statistics at another size are measured at that size
    prepare(_cfg(data))
    assert spy["stats"] == 3 and len(spy["checked"]) == 2  # both are remembered
    assert len(ts.items) == 10


@pytest.mark.parametrize("content", [
    b"not json at all",
    b'{"version": 1, "checks": {"header:rgby": {"train/x_{channel}.png": 12}}, "stats": {}}',
    b'{"version": 1, "checks": {}, "stats": {"abc": {"mean": [0.5, 0.5, 0.5, 2.0], "std": [0.1, 0.1, 0.1, 0.1]}}}',
    b'{"version": 1, "checks": {}, "stats": {"abc": {"mean": [NaN, 0.5, 0.5, 0.5], "std": [0.1, 0.1, 0.1, 0.1]}}}',
    b"[" * 100_000,
    b'{"version": 2}',
])
def test_a_damaged_or_foreign_record_is_ignored_and_written_again(make_hpa2018, spy, content, capsys):
    data = make_hpa2018(n=6, size=16)
    first = prepare(_cfg(data))
    path = checked.record_path(data)
    path.write_bytes(content)
    ts = prepare(_cfg(data))
    assert len(spy["checked"]) == 2 and len(spy["checked"][-1]) == 6  # all checked again
    assert (ts.mean, ts.std) == (first.mean, first.std)
    assert "checking every image again" in capsys.readouterr().out
    assert json.loads(path.read_text())["version"] == checked.VERSION  # written anew
    prepare(_cfg(data))
    assert len(spy["checked"]) == 2


def test_a_record_in_place_of_a_fifo_or_folder_does_not_stop_the_run(make_hpa2018, spy):
    data = make_hpa2018(n=6, size=16)
    path = checked.record_path(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    prepare(_cfg(data))  # read without blocking: refused, then replaced
    assert path.is_file() and not path.is_symlink()


def test_statistics_edited_in_the_record_are_measured_again_when_the_sample_changed(make_hpa2018, spy):
    """The record's statistics are used only for the exact sample of unchanged files they came from."""
    data = make_hpa2018(n=6, size=16)
    first = prepare(_cfg(data))
    path = checked.record_path(data)
    record = json.loads(path.read_text())
    (digest,) = record["stats"]
    record["stats"] = {"0" * 16: record["stats"][digest]}  # filed under another sample
    path.write_text(json.dumps(record))
    ts = prepare(_cfg(data))
    assert spy["stats"] == 2 and np.allclose(ts.mean, first.mean)


def test_nothing_is_written_into_the_data_folder(make_hpa2018, spy):
    data = make_hpa2018(n=6, size=16)
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    prepare(_cfg(data))
    prepare(_cfg(data))
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before
    assert str(checked.record_path(data)).startswith(os.environ["XDG_CACHE_HOME"])
