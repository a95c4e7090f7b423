"""``run.py serve``: what the page answers for an upload (labels, probabilities, thresholds, heatmaps;
a clear message for bad input), checked in Python, then the real page in headless Chromium driven by
Selenium: upload the four stain files of a sample image, read the labels from the page, upload a bad
file, and see the server go on serving. The browser test skips where Chromium, chromedriver, Gradio
or Selenium is missing; set HPA_SCREENSHOTS=DIR to keep its screenshot (docs/serve.png is one)."""
from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from hpa_fastai import load_predictor
from hpa_fastai.config import TrainConfig
from hpa_fastai.serve.app import MAX_SIDE, answer, md_escape
from hpa_fastai.synth import make_dataset
from .helpers import train

from .helpers import REPO

STAINS = ("red", "green", "blue", "yellow")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny trained HPA 2018 (RGBY) run and its data folder."""
    data = make_dataset(tmp_path_factory.mktemp("hpa"), "hpa2018", n_train=24, n_test=3, size=32, seed=8, easy=True)
    run = train(TrainConfig(data=str(data), out=str(tmp_path_factory.mktemp("runs")), arch="cnn", epochs=1, size=32,
                            bs=8, pretrained=False, lr="1e-3", seed=0))
    return run, data


def stain_files(data: Path, n: int = 0) -> list[Path]:
    image_id = pd.read_csv(data / "sample_submission.csv")["Id"][n]
    return [data / "test" / f"{image_id}_{stain}.png" for stain in STAINS]


def test_answer_shows_the_predicted_labels_probabilities_thresholds_and_heatmaps(run):
    run_dir, data = run
    pred = load_predictor(run_dir)
    files = stain_files(data)
    expected = pred.predict(files[1])
    shown = answer(pred, files)
    assert set(shown.table.columns) == {"class", "name", "probability", "threshold", "predicted"}
    assert len(shown.table) == 28 and shown.table["probability"].is_monotonic_decreasing
    assert sorted(shown.table.loc[shown.table["predicted"] == "yes", "class"]) == expected["labels"]
    thresholds = dict(zip(shown.table["class"], shown.table["threshold"]))
    assert all(thresholds[c] == pytest.approx(pred.thresholds[c], abs=1e-3) for c in range(28))
    for name in expected["names"]:
        assert md_escape(name) in shown.verdict
    assert len(shown.heatmaps) == max(1, len(expected["labels"]))
    panel, caption = shown.heatmaps[0]
    assert panel.ndim == 3 and panel.shape[1] >= 2 * 256 and "where the model saw it" in caption
    assert len(shown.top) == 5
    with_tta = answer(pred, files, tta=True)
    averaged = pred.predict(files[1], tta="mean")["all_probabilities"]
    assert "(TTA)" in with_tta.verdict
    np.testing.assert_allclose(with_tta.table.sort_values("class")["probability"], averaged, atol=1e-4)


def write_16bit(path: Path) -> Path:
    Image.fromarray(np.full((16, 16), 40000, np.uint16)).save(path)
    return path


@pytest.mark.parametrize("case,message", [
    ("three stain files", "four stain files of one HPA image"),
    ("a text file", "not a readable image"),
    ("a 16-bit image", "image mode is I;16"),
    ("a huge image", f"up to {MAX_SIDE} pixels a side"),
    ("stains of two images", "not the four stains of one image"),
    ("nothing", "no image"),
])
def test_bad_uploads_get_one_clear_message(run, tmp_path, case, message):
    run_dir, data = run
    pred = load_predictor(run_dir)
    files = [shutil.copy(f, tmp_path / f.name) for f in stain_files(data)]
    if case == "three stain files":
        files = files[:3]
    elif case == "a text file":
        (tmp_path / files[0].name).write_text("not an image")
    elif case == "a 16-bit image":
        write_16bit(Path(files[2]))
    elif case == "a huge image":
        Image.new("L", (MAX_SIDE + 1, 8)).save(files[0])
    elif case == "stains of two images":
        files[3] = shutil.copy(stain_files(data, 1)[3], tmp_path)
    elif case == "nothing":
        files = []
    shown = answer(pred, files)
    assert shown.verdict.startswith("**Cannot read this input.**") and message in shown.verdict.replace("\\", "")
    assert str(tmp_path) not in shown.verdict and "hpa-serve-" not in shown.verdict  # names, not scratch paths
    assert shown.heatmaps == [] and shown.table.empty


def test_an_rgb_model_reads_one_image(tmp_path):
    from .test_cam import safe_export

    pred = load_predictor(safe_export(tmp_path / "model", "cnn", "rgb"))
    data = make_dataset(tmp_path / "z2g", "z2g", n_train=2, n_test=0, size=32, seed=0, easy=True)
    images = sorted((data / "train").glob("*.png"))
    assert "Predicted" in answer(pred, images[:1]).verdict or "No class reaches" in answer(pred, images[:1]).verdict
    assert "one RGB image at a time; got 2 files" in answer(pred, images[:2]).verdict


def test_names_from_a_model_file_cannot_inject_markdown():
    assert md_escape("[x](http://a) <b>*y*</b>") == r"\[x\]\(http://a\) &lt;b&gt;\*y\*&lt;/b&gt;"


@pytest.mark.skipif(importlib.util.find_spec("gradio") is None, reason="gradio not installed")
def test_a_port_in_use_is_one_error_line(run, capsys):
    from .helpers import cli_in_process

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = cli_in_process(capsys, "serve", "--learner", run[0], "--port", port)
    assert code == 2 and err.startswith(f"error: --host 127.0.0.1 --port {port}: cannot listen") and "\n" not in err.strip()


def test_serve_binds_to_this_machine_only_by_default():
    from hpa_fastai.config import ServeConfig

    assert ServeConfig().host == "127.0.0.1"


# --- the page in a real browser ----------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")
MISSING = [name for name, ok in [("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER),
                                 ("gradio", importlib.util.find_spec("gradio")),
                                 ("selenium", importlib.util.find_spec("selenium"))] if not ok]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(run, tmp_path):
    """``run.py serve`` on a free port of 127.0.0.1, until the test ends."""
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, str(REPO / "run.py"), "serve", "--learner", str(run[0]),
                             "--port", str(port)], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(REPO), "GRADIO_ANALYTICS_ENABLED": "False"})
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the server did not start: {(tmp_path / 'serve.log').read_text()[-3000:]}")
        time.sleep(0.5)
    yield url, tmp_path / "serve.log"
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--window-size=1280,1500",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(120)
    yield driver
    driver.quit()


def upload_and_predict(driver, url: str, files) -> str:
    """Open the page, give the files to its upload input, press Predict; the verdict's text."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    wait = WebDriverWait(driver, 120)
    upload = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#upload input[type=file]")))
    upload.send_keys("\n".join(str(f) for f in files))
    stems = [Path(f).stem[-12:] for f in files]  # the list shows a long name cut, its suffix apart
    wait.until(lambda d: all(s in d.find_element(By.ID, "upload").text for s in stems))  # uploaded
    driver.find_element(By.CSS_SELECTOR, "#predict").click()
    done = ("Predicted for", "No class reaches", "Cannot read this input")
    wait.until(lambda d: any(t in d.find_element(By.ID, "verdict").text for t in done))
    return driver.find_element(By.ID, "verdict").text


@pytest.mark.slow
@pytest.mark.skipif(bool(MISSING), reason=f"{', '.join(MISSING)} not installed (apt-get install chromium "
                                          "chromium-driver; pip install -e '.[test,serve]')")
def test_the_page_labels_an_upload_shows_heatmaps_and_survives_a_bad_file(run, server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    url, log = server
    assert f"at {url.rstrip('/')}" in log.read_text()  # the default: this machine only
    run_dir, data = run
    files = stain_files(data)
    expected = load_predictor(run_dir).predict(files[1])
    verdict = upload_and_predict(browser, url, files)
    shown = expected["names"] or [n for n in load_predictor(run_dir).names if n in verdict][:1]
    assert shown and all(name in verdict for name in shown), verdict
    heatmaps = browser.find_elements(By.CSS_SELECTOR, "#heatmaps img")
    assert len(heatmaps) >= 1
    table = browser.find_element(By.ID, "table").text
    assert all(name in table for name in expected["names"])
    shot = tmp_path / "serve.png"
    browser.save_screenshot(str(shot))
    assert Image.open(shot).size[0] >= 1000
    if os.environ.get("HPA_SCREENSHOTS"):
        shutil.copy(shot, Path(os.environ["HPA_SCREENSHOTS"]) / "serve.png")

    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image")
    verdict = upload_and_predict(browser, url, [text_file])
    assert "Cannot read this input" in verdict and "notes.txt" in verdict, verdict
    verdict = upload_and_predict(browser, url, files)  # the server goes on serving
    assert all(name in verdict for name in shown), verdict
