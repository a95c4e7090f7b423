"""``run.py serve``: what the page answers for an upload (labels, probabilities, thresholds, heatmaps;
a clear message for bad input), checked in Python; what the server keeps on disk (uploads gone once
answered, a cap on what piles up, nothing left after it stops), checked over HTTP on 127.0.0.1; then
the real page in headless Chromium driven by Selenium: upload the four stain files of a sample
image, read the labels from the page, upload a bad file, and see the server go on serving. The
browser test skips where Chromium, chromedriver, Gradio or Selenium is missing; set
HPA_SCREENSHOTS=DIR to keep its screenshot (docs/serve.png is one)."""
from __future__ import annotations

import contextlib
import hashlib
import html
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
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
from hpa_fastai.serve.tempfolder import PREFIX, TempFolder
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


def test_an_all_zero_heatmap_says_no_region_speaks_for_the_class(run, monkeypatch):
    from hpa_fastai.inference import cam

    run_dir, data = run
    real = cam.explain

    def nothing_speaks(*args, **kwargs):
        explanations = real(*args, **kwargs)
        for e in explanations:
            e.heatmaps = [np.zeros_like(h) for h in e.heatmaps]
        return explanations

    monkeypatch.setattr(cam, "explain", nothing_speaks)
    shown = answer(load_predictor(run_dir), stain_files(data))
    captions = [caption for _, caption in shown.heatmaps]
    assert captions and all(c.endswith(": no region speaks for it") for c in captions), captions


def test_the_preview_shows_an_upload_once_it_is_one_image_and_examples_are_the_folder_s_images(run):
    from hpa_fastai.serve.app import PREVIEW_SIDE, example_images, preview

    run_dir, data = run
    pred = load_predictor(run_dir)
    files = stain_files(data)
    image = preview(pred, files)
    assert image.ndim == 3 and image.shape[2] == 3 and max(image.shape[:2]) >= PREVIEW_SIDE
    assert preview(pred, files[:3]) is None  # three stains of four: no image yet
    examples = example_images(data / "test", "rgby")
    ids = list(pd.read_csv(data / "sample_submission.csv")["Id"])
    assert sorted(name for name, _ in examples) == sorted(ids)
    assert all(sorted(f.name for f in found) == sorted(f"{name}_{s}.png" for s in STAINS) for name, found in examples)


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


NO_GRADIO = pytest.mark.skipif(importlib.util.find_spec("gradio") is None, reason="gradio not installed")


@NO_GRADIO
def test_a_port_in_use_is_one_error_line_and_leaves_no_temporary_folder(run, capsys, tmp_path, monkeypatch):
    from .helpers import cli_in_process

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the app makes its folder
    gradio_temp_dir = os.environ.get("GRADIO_TEMP_DIR")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = cli_in_process(capsys, "serve", "--learner", run[0], "--port", port)
    assert code == 2 and err.startswith(f"error: --host 127.0.0.1 --port {port}: cannot listen") and "\n" not in err.strip()
    assert not list(tmp_path.glob(f"{PREFIX}*")) and os.environ.get("GRADIO_TEMP_DIR") == gradio_temp_dir


def test_serve_binds_to_this_machine_only_by_default():
    from hpa_fastai.config import ServeConfig

    assert ServeConfig().host == "127.0.0.1"


# --- what the server keeps on disk ---------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_process(run_dir, cwd: Path, temp: Path, *flags):
    """``run.py serve`` in a subprocess on a free port of 127.0.0.1, with ``temp`` as its system
    temp folder; (process, url, log), stopped (SIGTERM) at the end if still running."""
    port = free_port()
    log_path = cwd / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(REPO / "run.py"), "serve", "--learner", str(run_dir),
                                 "--port", str(port), *map(str, flags)], cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(REPO), "GRADIO_ANALYTICS_ENABLED": "False",
                                     "TMPDIR": str(temp)})
        try:
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
                    pytest.fail(f"the server did not start: {log_path.read_text()[-3000:]}")
                time.sleep(0.5)
            yield proc, url, log_path
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@pytest.fixture
def live_app(run, tmp_path, request):
    """The page served in this process on a free port of 127.0.0.1, its folder capped at 1 MiB and
    40 files (28 heatmaps fit); (url, folder). Parametrized indirectly: {"keep_seconds": S}."""
    from hpa_fastai.serve.app import KEEP_SECONDS, build_app, gradio_temp_dir, launch

    pred = load_predictor(run[0])
    with TempFolder(2**20, 40, parent=tmp_path) as folder, gradio_temp_dir(folder.path):
        app = build_app(pred, folder, getattr(request, "param", {}).get("keep_seconds", KEEP_SECONDS))
        port = free_port()
        launch(app, folder, "127.0.0.1", port, block=False)
        try:
            yield f"http://127.0.0.1:{port}/", folder
        finally:
            app.close(verbose=False)


def post_upload(url: str, files: dict[str, bytes]):
    import httpx

    return httpx.post(f"{url}gradio_api/upload", files=[("files", (name, data)) for name, data in files.items()],
                      timeout=60)


def digests(folder: TempFolder) -> set[str]:
    return {hashlib.sha256(path.read_bytes()).hexdigest() for path, _ in folder.files()}


@NO_GRADIO
def test_many_uploads_stay_within_the_cap_the_oldest_going_first(live_app):
    url, folder = live_app
    rng = np.random.default_rng(0)
    uploads = [rng.bytes(200_000) for _ in range(20)]  # 20 x 200 kB through a 1 MiB cap
    for i, data in enumerate(uploads):
        response = post_upload(url, {f"u{i}.png": data})
        assert response.status_code == 200, response.text
        used, count = folder.usage()
        assert used <= 2**20 and count <= 40, (i, used, count)
    held = digests(folder)
    assert hashlib.sha256(uploads[-1]).hexdigest() in held and hashlib.sha256(uploads[0]).hexdigest() not in held
    many = post_upload(url, {f"small{i}.png": bytes([i]) * 100 for i in range(60)})  # one request, 60 files
    assert many.status_code == 200 and folder.usage()[1] <= 40
    too_big = post_upload(url, {"big.png": rng.bytes(2**20 + 1)})
    assert too_big.status_code == 413 and "more than the server holds at once (1 MiB" in too_big.text
    assert folder.usage()[0] <= 2**20


@NO_GRADIO
def test_an_upload_that_states_no_size_is_refused(live_app):
    import httpx

    url, folder = live_app
    body = iter([b"--x\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.png\"\r\n\r\n",
                 b"0" * 1000, b"\r\n--x--\r\n"])  # an iterator: httpx sends it chunked, with no Content-Length
    response = httpx.post(f"{url}gradio_api/upload", content=body,
                          headers={"content-type": "multipart/form-data; boundary=x"}, timeout=60)
    assert response.status_code == 411 and "must state its size" in response.text
    assert folder.usage() == (0, 0)


@NO_GRADIO
def test_an_answered_upload_leaves_no_bytes_on_disk_and_the_page_keeps_only_its_latest_heatmaps(run, live_app):
    from gradio_client import Client, handle_file

    url, folder = live_app
    files = stain_files(run[1])
    uploaded = {hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
    client = Client(url, verbose=False, download_files=False)
    verdict, error, _, _, gallery, upload_list, image = client.predict([handle_file(str(f)) for f in files], False,
                                                                       api_name="/predict")
    assert error == ""
    assert "Predicted for" in verdict or "No class reaches" in verdict
    assert upload_list is None  # the page's upload list is cleared: the files are gone
    assert not uploaded & digests(folder)
    shown = [Path(item["image"]["path"]) for item in gallery] + [Path(image["path"])]  # heatmaps, the image as seen
    assert shown and all(path.is_file() for path in shown)
    assert sorted(path for path, _ in folder.files()) == sorted(shown)  # nothing but what the page shows
    client.predict([handle_file(str(f)) for f in files], True, api_name="/predict")  # the page moves on
    assert not any(path.exists() for path in shown) and not uploaded & digests(folder)


@NO_GRADIO
@pytest.mark.parametrize("live_app", [{"keep_seconds": 2}], indirect=True)
def test_an_upload_no_page_asks_about_is_deleted_when_it_is_old(live_app):
    url, folder = live_app
    post_upload(url, {"forgotten.png": b"x" * 1000}).raise_for_status()
    assert folder.usage()[1] == 1
    deadline = time.time() + 60  # Gradio looks every 2 s here; a busy machine may run it late
    while folder.usage()[1] and time.time() < deadline:
        time.sleep(0.5)
    assert folder.usage() == (0, 0)


@NO_GRADIO
@pytest.mark.parametrize("case,message", [("a text file", "not a readable image (PNG, JPEG or TIFF)"),
                                          ("a 16-bit image", "image mode is I;16")])  # read from the scratch copy
def test_a_bad_upload_is_named_by_its_own_name_only(run, live_app, tmp_path, case, message):
    from gradio_client import Client, handle_file

    url, folder = live_app
    files = [Path(shutil.copy(f, tmp_path / f.name)) for f in stain_files(run[1])]
    if case == "a text file":
        files[1].write_text("not an image")
    else:
        write_16bit(files[1])
    verdict, error = Client(url, verbose=False, download_files=False).predict(
        [handle_file(str(f)) for f in files], False, api_name="/predict")[:2]
    assert verdict == ""  # an error is shown as an error, not as an answer
    shown = html.unescape(error)
    assert f"<b>Cannot read this input.</b> {files[1].name}: {message}" in shown and 'class="input-error"' in error
    assert str(folder.path) not in shown and str(tmp_path) not in shown
    assert folder.usage() == (0, 0)


@NO_GRADIO
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["Ctrl-C", "SIGTERM"])
def test_stopping_the_server_removes_its_temporary_folder(run, tmp_path, stop):
    temp = tmp_path / "tmp"
    temp.mkdir()
    with serve_process(run[0], tmp_path, temp) as (proc, url, log):
        post_upload(url, {"held.png": b"x" * 1000}).raise_for_status()
        (folder,) = temp.glob(f"{PREFIX}*")
        assert any(path.read_bytes() == b"x" * 1000 for path in folder.rglob("held.png"))
        proc.send_signal(stop)
        proc.wait(timeout=120)  # a busy machine: stopping takes well under a second alone
    assert not folder.exists(), log.read_text()[-2000:]
    assert not list(temp.iterdir()), sorted(temp.iterdir())  # nothing else in the temp folder (no tmp/gradio)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["serve.log", "tmp"]  # nor in the current folder


def test_heatmaps_the_folder_has_no_room_for_are_left_out(tmp_path):
    from hpa_fastai.serve.app import heatmap_files

    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)  # about 12 kB as PNG
    with TempFolder(100_000, 10, parent=tmp_path) as folder:
        (path, caption), = heatmap_files(folder, [(noise, "Nucleoli")])
        assert Path(path).is_file() and Path(path).parent.parent == folder.path / "heatmaps" and caption == "Nucleoli"
        assert heatmap_files(folder, [(noise, "a")] * 20) is None and Path(path).exists()  # 240 kB: never fits


def test_a_folder_left_by_a_killed_server_is_removed_by_the_next(tmp_path):
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    stale, live = tmp_path / f"{PREFIX}{ended.pid}-abc", tmp_path / f"{PREFIX}{os.getpid()}-def"
    for folder in (stale, live):
        (folder / "sub").mkdir(parents=True)
        (folder / "sub" / "upload.png").write_bytes(b"x")
    with TempFolder(2**20, 10, parent=tmp_path) as folder:
        assert folder.path.is_dir() and folder.path.name.startswith(f"{PREFIX}{os.getpid()}-")
        assert not stale.exists() and live.exists()  # a running server's folder is its own
    assert not folder.path.exists()


# --- the page in a real browser ----------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")
MISSING = [name for name, ok in [("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER),
                                 ("gradio", importlib.util.find_spec("gradio")),
                                 ("selenium", importlib.util.find_spec("selenium"))] if not ok]


@pytest.fixture
def server(run, tmp_path):
    """``run.py serve`` on a free port of 127.0.0.1, with the data's test images as examples, until the
    test ends; (url, log, temp folder)."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    with serve_process(run[0], tmp_path, temp, "--examples", run[1] / "test") as (_, url, log):
        yield url, log, temp


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


ANSWERED = ("Predicted for", "No class reaches")


def shown_text(driver, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id).text


def names_cut_short(driver) -> list[str]:
    """The file names of the upload list that the page shows cut (wider than their box)."""
    return driver.execute_script(
        "return [...document.querySelectorAll('#upload .filename .stem')]"
        ".filter(e => e.scrollWidth > e.clientWidth + 1).map(e => e.textContent)")


def preview_source(driver) -> str | None:
    from selenium.webdriver.common.by import By

    images = driver.find_elements(By.CSS_SELECTOR, "#preview img")
    return images[0].get_attribute("src") if images else None


def give_files(driver, files):
    """Give the files to the page's upload input and wait until the list shows them."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, 120)
    upload = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#upload input[type=file]")))
    upload.send_keys("\n".join(str(f) for f in files))
    wait.until(lambda d: all(Path(f).stem in shown_text(d, "upload") for f in files))  # every whole name


def press_predict(driver) -> tuple[str, str]:
    """Press Predict and wait for the answer or the error; (verdict, error) as the page shows them."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.find_element(By.CSS_SELECTOR, "#predict").click()
    # answered: the upload list is cleared (the files are gone), and the answer or the error is shown
    WebDriverWait(driver, 120).until(lambda d: not d.find_elements(By.CSS_SELECTOR, "#upload .file-preview")
                                     and "processing" not in shown_text(d, "verdict") and (
        any(t in shown_text(d, "verdict") for t in ANSWERED) or "Cannot read this input" in shown_text(d, "error")))
    return shown_text(driver, "verdict"), shown_text(driver, "error")


@pytest.mark.slow
@pytest.mark.skipif(bool(MISSING), reason=f"{', '.join(MISSING)} not installed (apt-get install chromium "
                                          "chromium-driver; pip install -e '.[test,serve]')")
def test_the_page_labels_an_upload_shows_heatmaps_and_survives_a_bad_file(run, server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, log, temp = server
    text = log.read_text()
    assert f"at {url.rstrip('/')}" in text  # the default: this machine only
    assert "share=True" not in text  # Gradio's advice for a public link, which this app does not offer
    run_dir, data = run
    pred = load_predictor(run_dir)
    browser.get(url)
    wait = WebDriverWait(browser, 120)
    # before any answer the table shows its own columns, not placeholders
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#table th"))
    headers = [h.text.strip() for h in browser.find_elements(By.CSS_SELECTOR, "#table th") if h.text.strip()]
    assert headers[:5] == ["class", "name", "probability", "threshold", "predicted"], headers

    # an example to click: its four stain files fill the upload list, whole names shown, and the image appears
    example_ids = list(pd.read_csv(data / "sample_submission.csv")["Id"])
    examples = browser.find_element(By.ID, "examples")
    assert all(image_id in examples.text for image_id in example_ids)
    examples.find_elements(By.CSS_SELECTOR, "button, tr, td, .gallery-item")[0].click()
    first = [data / "test" / f"{example_ids[0]}_{stain}.png" for stain in STAINS]
    wait.until(lambda d: all(f.stem in shown_text(d, "upload") for f in first))
    wait.until(lambda d: preview_source(d))
    assert not names_cut_short(browser)
    verdict, error = press_predict(browser)
    expected = pred.predict(first[1])
    assert error == "" and all(name in verdict for name in expected["names"]), verdict

    # the four stain files dropped by hand
    files = stain_files(data, 1)
    give_files(browser, files)
    assert not names_cut_short(browser), names_cut_short(browser)  # "..._red", "..._green": every name whole
    wait.until(lambda d: preview_source(d))
    expected = pred.predict(files[1])
    verdict, error = press_predict(browser)
    assert error == "" and all(name in verdict for name in expected["names"]), verdict
    heatmaps = browser.find_elements(By.CSS_SELECTOR, "#heatmaps img")
    assert len(heatmaps) >= 1
    table = shown_text(browser, "table")
    assert all(name in table for name in expected["names"])
    assert preview_source(browser)  # the image stays beside its answer
    shot = tmp_path / "serve.png"
    browser.save_screenshot(str(shot))
    assert Image.open(shot).size[0] >= 1000
    if os.environ.get("HPA_SCREENSHOTS"):
        shutil.copy(shot, Path(os.environ["HPA_SCREENSHOTS"]) / "serve.png")

    # a bad file: an error, styled as one, and no answer
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image")
    give_files(browser, [text_file])
    verdict, error = press_predict(browser)
    assert verdict.strip() == "" and "Cannot read this input" in error and "notes.txt" in error, (verdict, error)
    box = browser.find_element(By.CSS_SELECTOR, "#error .input-error")
    assert box.value_of_css_property("background-color") in ("rgba(255, 235, 233, 1)", "rgb(255, 235, 233)")
    give_files(browser, files)
    verdict, error = press_predict(browser)  # the server goes on serving
    assert error == "" and all(name in verdict for name in expected["names"]), verdict
    assert not browser.find_elements(By.CSS_SELECTOR, "#upload .file-preview")  # the answered files are gone
    (folder,) = temp.glob(f"{PREFIX}*")
    held = [path for path in folder.rglob("*") if path.is_file()]
    uploaded = {f.read_bytes() for f in files + first}
    assert held and all(path.suffix == ".png" and path.read_bytes() not in uploaded for path in held)  # heatmaps only
    assert all(f.is_file() for f in first)  # the example's own files stay where they are
    browser.get("about:blank")  # the page closes: its heatmaps go (Gradio notices within a second or two)
    deadline = time.time() + 60
    while any(path.is_file() for path in folder.rglob("*")) and time.time() < deadline:
        time.sleep(0.5)
    assert not [path for path in folder.rglob("*") if path.is_file()]
