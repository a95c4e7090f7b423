"""``run.py download-hpav18`` against a local image server on 127.0.0.1 laid out like the Atlas's
(``/images/<antibody>/<rest of the id>_<stain>.jpg``, colour JPEGs), which can drop connections,
answer 404 and 5xx, cut a file short, send a page that is no image, trickle a file a few bytes at a
time, and hold a file half-sent until the test lets it go."""
from __future__ import annotations

import io
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from hpa_fastai.data.hpav18 import MAX_ID_BYTES, stain_url
from hpa_fastai.data.images import STAIN_COLOURS, read_image
from hpa_fastai.data.layouts import CHANNELS, FORMATS, read_items
from hpa_fastai.tools.hpav18_download import download

from .helpers import REPO, cli_in_process

# ids as HPAv18RBGY_wodpl.csv has them (the last two are rare classes), with made-up labels
ROWS = [("10580_1610_C1_1", "13 25 0 2 21"), ("10580_1610_C1_2", "13 25"), ("10580_1756_B1_1", "0"),
        ("24089_si27_F4_11", "16 0"), ("1055_E6_1", "8 5"), ("1055_E6_2", "27")]
SIDE = 48


def stain_pixels(image_id: str, stain: str) -> np.ndarray:
    """A grayscale stain with some structure, different for every file."""
    rng = np.random.default_rng(zlib.crc32(f"{image_id}_{stain}".encode()))
    yy, xx = np.mgrid[:SIDE, :SIDE]
    field = np.zeros((SIDE, SIDE))
    for _ in range(4):
        cy, cx, r = rng.uniform(0, SIDE, 2).tolist() + [rng.uniform(4, 10)]
        field += rng.uniform(80, 200) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    return np.clip(field + rng.normal(0, 4, field.shape), 0, 255).astype(np.uint8)


def colour_jpeg(gray: np.ndarray, stain: str) -> bytes:
    """The stain drawn in its colour, as the Atlas serves it."""
    buf = io.BytesIO()
    Image.fromarray(gray[..., None] * np.asarray(STAIN_COLOURS[stain], np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


class FakeAtlas:
    """The image server. ``faults[path]`` lists what the next requests of ``path`` get instead of the
    file: "drop" (the connection closes unanswered), an HTTP status, "cut" (the declared length, then
    half the bytes and a closed connection), "short" (a file cut in half, with a length to match),
    "html" (a web page with status 200), ("trickle", n, seconds) (the file, n bytes at a time with a
    pause between). After ``hold_after`` files, each request gets half its file and then waits for
    ``release``."""

    def __init__(self, rows=ROWS, missing=()):
        self.files = {}
        for image_id, _ in rows:
            for stain in CHANNELS:
                if (image_id, stain) not in missing:
                    self.files[self.path(image_id, stain)] = colour_jpeg(stain_pixels(image_id, stain), stain)
        self.faults: dict[str, list] = {}
        self.requests: list[str] = []
        self.hold_after = None
        self.release = threading.Event()
        self.closing = threading.Event()
        self.lock = threading.Lock()
        atlas = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # kept-alive connections, as the real server

            def log_message(self, *args):
                pass

            def do_GET(self):
                atlas.handle(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/images/"

    @staticmethod
    def path(image_id: str, stain: str) -> str:
        antibody, _, rest = image_id.partition("_")
        return f"/images/{antibody}/{rest}_{stain}.jpg"

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        with self.lock:
            self.requests.append(h.path)
            fault = self.faults.get(h.path, []).pop(0) if self.faults.get(h.path) else None
            served = sum(1 for p in self.requests if p in self.files)
        body = self.files.get(h.path)
        if fault == "drop":
            h.close_connection = True
            return
        if isinstance(fault, int) or body is None:
            h.send_response(fault if isinstance(fault, int) else 404)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        hold = self.hold_after is not None and served > self.hold_after
        if fault == "short":
            body = body[:len(body) // 2]
        if fault == "html":
            body = b"<html><body>The Human Protein Atlas is being updated</body></html>"
        h.send_response(200)
        h.send_header("Content-Type", "text/html" if fault == "html" else "image/jpeg")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if isinstance(fault, tuple) and fault[0] == "trickle":
            _, step, pause = fault
            try:
                for at in range(0, len(body), step):
                    h.wfile.write(body[at:at + step])
                    if self.closing.wait(pause):
                        break
            except OSError:  # the client gave up on the file
                pass
            h.close_connection = True
            return
        if fault == "cut" or hold:
            h.wfile.write(body[:len(body) // 2])
            h.wfile.flush()
            if hold:
                self.release.wait(30)
            h.close_connection = True
            return
        h.wfile.write(body)

    def close(self):
        self.closing.set()
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def atlas():
    server = FakeAtlas()
    yield server
    server.close()


def write_labels(folder: Path, rows=ROWS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "HPAv18RBGY_wodpl.csv"
    path.write_text("Id,Target\n" + "".join(f"{i},{t}\n" for i, t in rows))
    return path


def settings(labels, out, atlas, **kw) -> dict:
    """``download``'s parameters for the fake server: quick retries."""
    return {**dict(labels=labels, out=out, base_url=atlas.base_url, connections=3, retries=3, backoff=0.01,
                   timeout=10.0), **kw}


def final_files(out: Path) -> set[str]:
    return {p.name for p in (out / "train").iterdir() if not p.name.startswith(".")}


def test_the_url_is_the_one_the_2018_scripts_used():
    assert stain_url("http://v18.proteinatlas.org/images/", "10580_1610_C1_1", "red") == \
        "http://v18.proteinatlas.org/images/10580/1610_C1_1_red.jpg"
    assert stain_url("http://host/x", "24089_si27_F4_11", "yellow") == "http://host/x/24089/si27_F4_11_yellow.jpg"


def test_download_writes_the_layout_extra_data_reads(atlas, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="hpa_fastai")
    labels = write_labels(tmp_path)
    calls = []
    result = download(**settings(labels, tmp_path / "hpav18", atlas), progress=lambda *c: calls.append(c))
    out = result.out
    assert (result.fetched, result.complete, result.missing, result.failed) == (24, 6, [], [])
    # without --size the server's colour JPEGs are kept byte for byte, and fetched once each
    for image_id, _ in ROWS:
        for stain in CHANNELS:
            assert (out / "train" / f"{image_id}_{stain}.jpg").read_bytes() == atlas.files[atlas.path(image_id, stain)]
    assert sorted(atlas.requests) == sorted(atlas.files)
    train = pd.read_csv(out / "train.csv", dtype=str)
    assert list(train.itertuples(index=False, name=None)) == [(i, " ".join(sorted(t.split(), key=int))) for i, t in ROWS]
    items = read_items(out, FORMATS["hpa2018"], "train")
    arr = read_image(items["key"].iloc[0], CHANNELS)
    expected = np.stack([stain_pixels(ROWS[0][0], s) for s in CHANNELS], -1).astype(float)
    assert np.abs(arr - expected).mean() < 3  # each stain's own band, through JPEG
    # the library prints nothing: its lines are log records, its progress a callback after each file
    assert "24 to fetch" in caplog.text
    assert calls == [(n, 24) for n in range(1, 25)]


def test_size_stores_grayscale_pngs_of_the_stain(atlas, tmp_path):
    labels = write_labels(tmp_path)
    cut = atlas.path("10580_1610_C1_2", "green")
    atlas.faults = {cut: ["short"]}  # decoded at a reduced scale, a cut-off file is still caught
    out = download(**settings(labels, tmp_path / "hpav18", atlas, size=32)).out
    assert atlas.requests.count(cut) == 2
    for image_id, _ in ROWS:
        for stain in CHANNELS:
            im = Image.open(out / "train" / f"{image_id}_{stain}.png")
            assert (im.mode, im.size) == ("L", (32, 32))
            expected = np.asarray(Image.fromarray(stain_pixels(image_id, stain)).resize((32, 32), Image.BILINEAR))
            assert np.abs(np.asarray(im, float) - expected).mean() < 3
    # a later run into the folder must store its images the same way
    with pytest.raises(Exception, match="--size 32"):
        download(**settings(labels, out, atlas, size=64))


def test_retries_dropped_connections_5xx_and_cut_files_but_not_404(tmp_path, capsys):
    atlas = FakeAtlas(missing={("1055_E6_1", "green")})
    try:
        where = dict(dropped=("10580_1610_C1_1", "red"), busy=("10580_1610_C1_2", "blue"),
                     cut=("10580_1756_B1_1", "yellow"), short=("24089_si27_F4_11", "green"), broken=("1055_E6_2", "red"))
        p = {name: atlas.path(*file) for name, file in where.items()}
        atlas.faults = {p["dropped"]: ["drop", "drop"], p["busy"]: [500, 503, 429], p["cut"]: ["cut"],
                        p["short"]: ["short", "short"], p["broken"]: [500] * 10}
        labels = write_labels(tmp_path)
        out = tmp_path / "hpav18"
        code, stdout, err = cli_in_process(capsys, "download-hpav18", labels, "--out", out, "--base-url", atlas.base_url,
                                           "--retries", "3", "--backoff", "0.01", "--connections", "4")
        assert code == 0, err
        count = {path: atlas.requests.count(path) for path in set(atlas.requests)}
        assert (count[p["dropped"]], count[p["busy"]], count[p["cut"]], count[p["short"]]) == (3, 4, 2, 3)
        assert count[p["broken"]] == 4  # 1 + --retries 3
        assert count[atlas.path("1055_E6_1", "green")] == 1  # a 404 is not retried
        for name in ("dropped", "busy", "cut", "short"):
            image_id, stain = where[name]
            assert (out / "train" / f"{image_id}_{stain}.jpg").read_bytes() == atlas.files[p[name]]
        assert not [f for f in os.listdir(out / "train") if f.startswith(".")]  # no temporary file left
        assert list(pd.read_csv(out / "train.csv")["Id"]) == [r[0] for r in ROWS[:4]]
        failed = pd.read_csv(out / "failed.csv")
        assert sorted(zip(failed["Id"], failed["stain"])) == [("1055_E6_1", "green"), ("1055_E6_2", "red")]
        assert "HTTP 404" in failed.set_index("Id").loc["1055_E6_1", "reason"]
        assert "HTTP 500 (4 tries)" in failed.set_index("Id").loc["1055_E6_2", "reason"]
        assert "1 file(s) not on the server (HTTP 404)" in stdout and "1 file(s) failed after every retry" in stdout
        # progress in a log: a line per 5% with the rate and the time left
        assert "24 to fetch" in stdout and "HPAv18 files: 24/24 (100%)" in stdout and "/s, ETA" in stdout

        # the next run asks only for what is still missing, and clears failed.csv once all is there
        atlas.requests.clear()
        atlas.faults.clear()
        atlas.files[atlas.path("1055_E6_1", "green")] = colour_jpeg(stain_pixels("1055_E6_1", "green"), "green")
        code, stdout, err = cli_in_process(capsys, "download-hpav18", labels, "--out", out, "--base-url", atlas.base_url,
                                           "--backoff", "0.01")
        assert code == 0, err
        assert sorted(atlas.requests) == sorted([atlas.path("1055_E6_1", "green"), p["broken"]])
        assert len(pd.read_csv(out / "train.csv")) == 6 and not (out / "failed.csv").exists()
    finally:
        atlas.close()


def test_classes_and_ids_fetch_a_part(atlas, tmp_path):
    labels = write_labels(tmp_path)
    result = download(**settings(labels, tmp_path / "rare", atlas, classes=["8", "27"]))
    assert result.selected == 2 and list(pd.read_csv(result.out / "train.csv")["Id"]) == ["1055_E6_1", "1055_E6_2"]
    assert {r.split("/")[2] for r in atlas.requests} == {"1055"}
    atlas.requests.clear()
    result = download(**settings(labels, tmp_path / "first", atlas, ids=2, classes="0"))
    assert list(pd.read_csv(result.out / "train.csv")["Id"]) == ["10580_1610_C1_1", "10580_1756_B1_1"]
    assert len(atlas.requests) == 8


def start_held_download(atlas, labels, out, *flags) -> subprocess.Popen:
    """``run.py download-hpav18`` in a process of its own, once the server has sent 9 whole files
    and holds the next ones half-sent (the files a killed download was in the middle of).

    The process takes SIGINT as Ctrl-C at a terminal does, whatever this one does with it: a shell
    without job control (a script's ``make test &``) starts its background jobs ignoring SIGINT, their
    children inherit that, and Python then leaves SIGINT ignored, so the download would never see the
    test's Ctrl-C. A signal this process catches is reset to its default in the child (exec's rule),
    and Python turns that default into KeyboardInterrupt."""
    atlas.hold_after = 9
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen([sys.executable, str(REPO / "run.py"), "download-hpav18", str(labels), "--out",
                                 str(out), "--base-url", atlas.base_url, "--connections", "2", *flags],
                                env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, before)
    deadline = time.monotonic() + 60  # reached in 7 s at most beside three CPU-bound processes (40 runs)
    while not ((out / "train").is_dir() and len(final_files(out)) >= 9
               and [f for f in os.listdir(out / "train") if f.endswith(".part")]):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the download did not reach the held files: {proc.communicate()}")
        time.sleep(0.05)
    return proc


def test_a_killed_download_resumes_with_only_the_rest(atlas, tmp_path):
    labels = write_labels(tmp_path)
    out = tmp_path / "hpav18"
    proc = start_held_download(atlas, labels, out, "--size", "40")
    proc.kill()
    proc.communicate(timeout=10)
    before = final_files(out)
    assert len(before) == 9, before
    assert [f for f in os.listdir(out / "train") if f.endswith(".part")]  # half-written files, never renamed
    assert not (out / "train.csv").exists()
    for name in before:  # whatever has its final name is whole
        with Image.open(out / "train" / name) as im:
            im.load()
            assert (im.mode, im.size) == ("L", (40, 40))

    atlas.hold_after = None
    atlas.release.set()
    atlas.requests.clear()
    result = download(**settings(labels, out, atlas, size=40))
    fetched = {p.rsplit("/", 2)[1] + "_" + p.rsplit("/", 1)[1].replace(".jpg", ".png") for p in atlas.requests}
    assert fetched == {f"{i}_{s}.png" for i, _ in ROWS for s in CHANNELS} - before
    assert result.fetched == 24 - 9 and result.complete == 6
    assert not [f for f in os.listdir(out / "train") if f.startswith(".")]
    assert len(read_items(out, FORMATS["hpa2018"], "train")) == 6


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_stops_at_once_and_writes_train_csv_of_the_complete_images(atlas, tmp_path, sig):
    labels = write_labels(tmp_path)
    out = tmp_path / "hpav18"
    proc = start_held_download(atlas, labels, out, "--timeout", "300")
    sent = time.monotonic()
    proc.send_signal(sig)
    # It exits within 0.3 s of the signal, also beside three CPU-bound processes on 2 cores (80 runs,
    # load 3 to 8); 20 s is far from that and still below the 30 s the server holds a file.
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out_text, err = proc.communicate()
        pytest.fail(f"still running 60 s after the signal; its output: {out_text[-600:]!r} {err[-600:]!r}")
    assert proc.returncode == 130 and "interrupted" in err
    assert time.monotonic() - sent < 20  # not the 300 s a held file could take to time out
    complete = [i for i, _ in ROWS if all(f"{i}_{s}.jpg" in final_files(out) for s in CHANNELS)]
    assert len(complete) >= 2 and list(pd.read_csv(out / "train.csv")["Id"]) == complete


def test_a_server_that_trickles_fails_the_try_at_its_deadline(tmp_path):
    atlas = FakeAtlas()
    try:
        slow, paced = atlas.path("10580_1610_C1_1", "red"), atlas.path("10580_1610_C1_2", "blue")
        # slow: 2 bytes every 0.2 s, each within --timeout; sent whole, its 2.5 kB would take 4 minutes.
        # paced: 4 pieces 0.05 s apart at every try, all within the try's first second
        atlas.faults = {slow: [("trickle", 2, 0.2)] * 2,
                        paced: [("trickle", len(atlas.files[paced]) // 4 + 1, 0.05)] * 2}
        labels = write_labels(tmp_path)
        start = time.monotonic()
        result = download(**settings(labels, tmp_path / "hpav18", atlas, retries=1, timeout=1.0))
        seconds = time.monotonic() - start
        # each try of the slow file ends after --timeout 1 s and a few bytes' grace: 2.6 to 4.3 s in all
        # beside three CPU-bound processes on 2 cores (6 runs)
        assert seconds < 20, seconds
        assert atlas.requests.count(slow) == 2
        assert [(t.image_id, t.stain) for t, _ in result.failed] == [("10580_1610_C1_1", "red")]
        assert "slower than 16 kB/s" in result.failed[0][1] and "(2 tries)" in result.failed[0][1]
        failed = pd.read_csv(tmp_path / "hpav18" / "failed.csv")
        assert list(failed["url"]) == [atlas.base_url.rstrip("/") + slow.removeprefix("/images")]
        # a file that comes in pieces, but within the deadline, is kept
        assert (tmp_path / "hpav18" / "train" / "10580_1610_C1_2_blue.jpg").read_bytes() == atlas.files[paced]
        assert result.fetched == 23 and result.complete == 5
    finally:
        atlas.close()


def test_failed_csv_names_the_url_not_a_temporary_file(atlas, tmp_path):
    page = atlas.path("10580_1756_B1_1", "green")
    atlas.faults = {page: ["html"] * 2}  # a proxy's or a maintenance page, with status 200
    labels = write_labels(tmp_path)
    result = download(**settings(labels, tmp_path / "hpav18", atlas, retries=1))
    (task, reason), = result.failed
    url = atlas.base_url.rstrip("/") + page.removeprefix("/images")
    assert task.url == url and "not a readable image" in reason and "(2 tries)" in reason
    failed = pd.read_csv(tmp_path / "hpav18" / "failed.csv")
    assert list(failed["reason"]) == [reason]
    assert ".part" not in reason and str(tmp_path) not in reason and url in reason


def test_the_longest_id_allowed_fits_its_file_names(tmp_path):
    # the limit leaves room for the temporary names: an id of MAX_ID_BYTES downloads on a file system
    # whose names have 255 bytes at most (every common one), and the label check refuses one byte more
    longest = "10580_" + "C" * (MAX_ID_BYTES - len("10580_"))
    rows = [(longest, "0")]
    server = FakeAtlas(rows)
    try:
        labels = write_labels(tmp_path, rows)
        result = download(**settings(labels, tmp_path / "hpav18", server, size=32))
        assert (result.fetched, result.complete, result.failed) == (4, 1, [])
        assert max(len(os.fsencode(n)) for n in final_files(tmp_path / "hpav18")) == MAX_ID_BYTES + len("_yellow.png")
        labels = write_labels(tmp_path, [(longest + "D", "0")])
        with pytest.raises(Exception, match=f"line 2: id .* is {MAX_ID_BYTES + 1} bytes long"):
            download(**settings(labels, tmp_path / "hpav18", server, size=32))
    finally:
        server.close()
