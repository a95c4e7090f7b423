"""Run reports: a self-contained report.html per run (checked statically and in headless Chromium),
the comparison page, the report command's errors, and the TensorBoard logs."""
from __future__ import annotations

import base64
import importlib.util
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from hpa_fastai.config import TrainConfig
from hpa_fastai.errors import HPAError
from hpa_fastai.reporting import write_comparison, write_report
from hpa_fastai.synth import make_dataset
from .helpers import train

from .helpers import cli_in_process, read_json

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
SECTIONS = ["config", "lr-find", "curves", "per-class", "samples"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny runs: Zero-to-GANs RGB with lr_find (and TensorBoard when installed), HPA 2018 RGBY."""
    out = tmp_path_factory.mktemp("runs")
    z2g = make_dataset(tmp_path_factory.mktemp("z2g"), "z2g", n_train=40, n_test=0, size=32, seed=0, easy=True)
    hpa = make_dataset(tmp_path_factory.mktemp("hpa"), "hpa2018", n_train=40, n_test=0, size=32, seed=1, easy=True)
    base = dict(out=str(out), arch="cnn", epochs=2, size=16, bs=8, pretrained=False, seed=0)  # 16 px: fast on CPU
    rgb = train(TrainConfig(data=str(z2g), lr="auto", lr_find_iters=20,
                            log="tensorboard" if HAS_TENSORBOARD else "none", **base))
    rgby = train(TrainConfig(data=str(hpa), lr="1e-3", **base))
    return {"rgb": rgb, "rgby": rgby}


class Page(HTMLParser):
    """What a browser would fetch from a page: every src and href, plus section ids and images."""

    def __init__(self, text: str):
        super().__init__()
        self.links, self.ids, self.images = [], [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for name in ("src", "href", "srcset", "poster", "data"):
            if name in attrs:
                self.links.append((tag, name, attrs[name]))
        if "id" in attrs:
            self.ids.append(attrs["id"])
        if tag == "img":
            self.images.append(attrs)


def decode_png(uri: str) -> Image.Image:
    assert uri.startswith("data:image/png;base64,"), uri[:60]
    im = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1], validate=True)))
    im.load()
    return im


def assert_self_contained(text: str) -> Page:
    page = Page(text)
    for tag, attr, value in page.links:
        if attr == "href":
            assert value.startswith("#"), (tag, value)  # in-page anchors only
        else:
            assert value.startswith("data:"), (tag, value[:80])
    lowered = text.lower()
    for needle in ("http://", "https://", "url(", "@import", "<script", "<link", "<iframe", "src=\"//", "href=\"//"):
        assert needle not in lowered, needle
    for img in page.images:
        decode_png(img["src"])
    return page


def test_report_has_every_section_with_inline_images(runs):
    run_dir = runs["rgb"]
    report = run_dir / "report.html"
    assert report.is_file()  # written by training
    text = report.read_text()
    page = assert_self_contained(text)
    assert [s for s in SECTIONS if s in page.ids] == SECTIONS
    alts = [img["alt"] for img in page.images]
    assert {"lr_find plot", "loss and F1 per epoch", "per-class F1 bars"} <= set(alts)
    metrics = read_json(run_dir / "metrics.json")
    summary = re.search(r'<p class="summary">(.*?)</p>', text, re.S).group(1)
    assert f"{metrics['f1_macro']:.4f}" in summary and f"{metrics['f1_macro_tuned']:.4f}" in summary
    assert "finished" in summary and f"<b>{metrics['best_epoch']}</b> of {metrics['epochs_run']}" in summary
    for row in metrics["per_class"]:
        assert f"<td>{row['name']}</td>" in text and f"{row['threshold']:.3f}" in text
    config = read_json(run_dir / "config.json")
    assert f"<td>{config['data']}</td>" in text and "lr_used" in text


def test_image_grid_shows_validation_images_worst_first_with_names(runs):
    run_dir = runs["rgby"]
    valid = pd.read_csv(run_dir / "valid_predictions.csv", dtype=str, keep_default_na=False)
    meta = read_json(run_dir / "model.json")
    assert list(valid.columns) == ["id", "key", "labels", "predicted", "probs"]
    assert all(len(p.split()) == len(meta["names"]) for p in valid["probs"])
    text = (run_dir / "report.html").read_text()
    thumbs = [img for img in Page(text).images if img.get("class") == "thumb"]
    assert len(thumbs) == min(16, len(valid))
    assert {img["alt"] for img in thumbs} == set(valid["id"])
    first = decode_png(thumbs[0]["src"])
    assert first.mode == "RGB" and first.size == (128, 128)  # RGBY shown in false colour
    mistakes = [int(n) for n in re.findall(r"· (\d+) label\(s\) wrong", text)]
    assert mistakes == sorted(mistakes, reverse=True)
    first_true = valid.set_index("id").loc[thumbs[0]["alt"], "labels"].split()
    caption = text.split(thumbs[0]["alt"] + "</span>", 1)[1].split("</figcaption>")[0]
    assert all(meta["names"][int(c)] in caption for c in first_true)


def test_report_rebuilds_and_still_works_without_the_images(runs, tmp_path, capsys):
    run_dir = shutil.copytree(runs["rgb"], tmp_path / "run", ignore=shutil.ignore_patterns("*.pth", "*.pkl",
                                                                                          "*.safetensors"))
    (run_dir / "report.html").unlink()
    code, out, err = cli_in_process(capsys, "report", run_dir)
    assert code == 0, err
    assert (run_dir / "report.html").is_file() and "report.html" in out
    valid = pd.read_csv(run_dir / "valid_predictions.csv")
    valid["key"] = str(tmp_path / "gone" / "x.png")
    valid.to_csv(run_dir / "valid_predictions.csv", index=False)
    text = write_report(run_dir, tmp_path / "elsewhere.html").read_text()
    assert "x.png" in text and "image file not found" in text and 'id="per-class"' in text


def test_comparison_page_puts_runs_side_by_side(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli_in_process(capsys, "report", runs["rgb"], runs["rgby"])
    assert code == 0, err
    text = (tmp_path / "comparison.html").read_text()
    page = assert_self_contained(text)
    assert {"summary", "config", "curves", "per-class"} <= set(page.ids)
    names = [runs["rgb"].name, runs["rgby"].name]
    assert all(text.count(n) >= 3 for n in names)
    rows = re.findall(r"<tr( class=\"differs\")?><td>([^<]*)</td>", text.split('id="config"')[1].split("<h2")[0])
    differs = {name for cls, name in rows if cls}
    assert {"data", "channels", "lr"} <= differs and "arch" not in differs and "epochs" not in differs
    overlay = decode_png(page.images[0]["src"])
    assert overlay.size[0] > 400
    assert "Nucleoplasm" in text and "Mitochondria" in text  # both vocabularies' classes
    out = write_comparison([runs["rgb"], runs["rgb"]], tmp_path / "same.html").read_text()
    assert 'class="differs"' not in out


@pytest.mark.parametrize("make_bad", ["missing", "file", "not a run", "bad json"])
def test_bad_run_folder_is_a_clear_error(make_bad, tmp_path, capsys):
    bad = tmp_path / "bad"
    if make_bad == "file":
        bad.write_text("")
    elif make_bad == "not a run":
        bad.mkdir()
    elif make_bad == "bad json":
        bad.mkdir()
        (bad / "config.json").write_text("{not json")
    code, _, err = cli_in_process(capsys, "report", bad)
    assert code == 2 and str(bad) in err and "Traceback" not in err
    with pytest.raises(HPAError, match="bad"):
        write_report(bad)


def test_one_bad_folder_among_several_names_it(runs, tmp_path, capsys):
    code, _, err = cli_in_process(capsys, "report", runs["rgb"], tmp_path / "nope", "--out", tmp_path / "c.html")
    assert code == 2 and "nope" in err and not (tmp_path / "c.html").exists()


def test_tensorboard_logs_scalars_per_class_f1_and_images(runs):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir = runs["rgb"] / "tensorboard"
    assert list(log_dir.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train_loss", "valid_loss", "f1_macro", "final/f1_macro_tuned"} <= scalars
    metrics = read_json(runs["rgb"] / "metrics.json")
    per_class = sorted(t for t in scalars if t.startswith("per_class_f1/"))
    assert len(per_class) == len(metrics["per_class"])
    assert events.Scalars(per_class[0])[-1].value == pytest.approx(metrics["per_class"][0]["f1"])
    assert "valid/worst_mistakes" in events.Tags()["images"]


# --- in a real browser -------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--hide-scrollbars"]

# Added to a copy of the page (the report itself has no script): after load, record which images
# decoded and every resource the page requested; data: URIs are not network resources.
PROBE = """<script>
window.addEventListener("load", () => {
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify({
    images: [...document.images].map(i => i.complete && i.naturalWidth > 0),
    requests: performance.getEntriesByType("resource").map(e => e.name)});
  document.body.appendChild(out);
});
</script>"""


def chromium(tmp_path, *args) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile{len(list(tmp_path.glob('profile*')))}"
    return subprocess.run([CHROMIUM, *CHROME_FLAGS, f"--user-data-dir={profile}", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium); "
                                             "the static checks above still run")
@pytest.mark.parametrize("which", ["report", "comparison"])
def test_page_renders_in_headless_chromium(which, runs, tmp_path):
    if which == "report":
        page = runs["rgby"] / "report.html"
    else:
        page = write_comparison([runs["rgb"], runs["rgby"]], tmp_path / "comparison.html")
    shot = tmp_path / "shot.png"
    res = chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,2000", page.resolve().as_uri())
    assert shot.is_file(), res.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.min() < pixels.max()
    assert (pixels < 250).mean() > 0.02  # text, tables and plots, not an empty white page

    probed = tmp_path / "probed.html"
    probed.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    res = chromium(tmp_path, "--enable-logging=stderr", "--v=0", "--dump-dom", probed.as_uri())
    found = re.search(r'<pre id="probe">(.*?)</pre>', res.stdout, re.S)
    assert found, (res.stdout[-1000:], res.stderr[-2000:])
    probe = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert probe["images"] and all(probe["images"]), probe["images"]
    assert probe["requests"] == []
    console = [ln for ln in res.stderr.splitlines() if ":CONSOLE" in ln]
    assert console == []
