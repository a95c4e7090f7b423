"""Class activation maps: Grad-CAM finds where a class's evidence is (with and without TTA), every
architecture gets heatmaps for RGB and RGBY, ``explain`` and ``predict --cam`` write one overlay per
predicted class and a probability chart, and the safe export and the pickle explain alike."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from hpa_fastai import load_predictor, models, modelfile
from hpa_fastai.config import TrainConfig
from hpa_fastai.data.vocab import class_names, vocab_for
from hpa_fastai.errors import HPAError
from hpa_fastai.inference.cam import explain, grad_cam, grad_cam_tta
from hpa_fastai.inference.predictor import dihedral, inverse_dihedral
from hpa_fastai.synth import make_dataset
from .helpers import train

from .helpers import cli_in_process

pytestmark = pytest.mark.filterwarnings("ignore:load_learner:UserWarning")  # the --trust case unpickles on purpose


def colour_model() -> nn.Sequential:
    """Body + head whose class c is the mean of input channel c: its Grad-CAM for class c is exactly
    where channel c is bright."""
    body = nn.Sequential(nn.Conv2d(3, 3, 1, bias=False), nn.ReLU())
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3, bias=False))
    with torch.no_grad():
        body[0].weight.copy_(torch.eye(3).view(3, 3, 1, 1))
        head[2].weight.copy_(torch.eye(3))
    return nn.Sequential(body, head)


def two_squares() -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """A 32x24 image (not square, so a wrong transpose shows) with a red and a green rectangle."""
    x = torch.zeros(1, 3, 32, 24)
    red, green = np.zeros((32, 24), bool), np.zeros((32, 24), bool)
    red[2:9, 3:12] = True
    green[20:30, 14:22] = True
    x[0, 0][torch.from_numpy(red)] = 1
    x[0, 1][torch.from_numpy(green)] = 1
    return x, red, green


def test_dihedral_is_undone_by_its_inverse():
    x = torch.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    for k in range(8):
        assert torch.equal(inverse_dihedral(dihedral(x, k), k), x), k


@pytest.mark.parametrize("tta", [False, True])
def test_heatmap_of_a_class_lies_where_its_evidence_is(tta):
    model = colour_model()
    x, red, green = two_squares()
    if tta:
        x = x[..., :24, :]  # the 8 orientations of a square image stack; of a 32x24 one they would not
        red, green = red[:24], green[:24]
        cams = grad_cam_tta(model, x, [0, 1, 2])
    else:
        cams, logits = grad_cam(model, x, [0, 1, 2])
        assert logits.shape == (1, 3)
    cams = cams.numpy()[0]
    assert cams.shape == (3, *red.shape) and cams.min() >= 0 and cams.max() <= 1
    # the map is the red (green) channel itself: exactly 1 on its rectangle and 0 elsewhere, in every
    # orientation once turned back (a wrongly inverted one would leave 7/8 and 1/8 in places)
    np.testing.assert_allclose(cams[0], red.astype(float), atol=1e-6)
    np.testing.assert_allclose(cams[1], green.astype(float), atol=1e-6)
    assert cams[2].max() == 0  # nothing blue: no evidence anywhere, an all-zero map rather than noise


def test_a_model_without_a_feature_map_gets_a_clear_error():
    model = nn.Sequential(nn.Sequential(nn.AdaptiveAvgPool2d(1)), nn.Sequential(nn.Flatten(), nn.Linear(3, 2)))
    with pytest.raises(HPAError, match="no feature map larger than 1x1"):
        grad_cam(model, torch.rand(1, 3, 16, 16), [0])


def safe_export(folder, arch: str, channels: str, size: int = 32, fmt: str | None = None):
    fmt = fmt or ("hpa2018" if channels == "rgby" else "z2g")
    n_in, n_out = len(channels), len(vocab_for(fmt))
    torch.manual_seed(0)
    model, _ = models.create_model(arch, n_in, n_out, pretrained=False)
    meta = {"arch": arch, "format": fmt, "channels": channels, "n_in": n_in, "size": size, "mean": [0.3] * n_in,
            "std": [0.2] * n_in, "vocab": vocab_for(fmt), "names": class_names(fmt), "thresholds": [0.5] * n_out}
    folder.mkdir(parents=True)
    modelfile.save(model.state_dict(), meta, folder)
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    return {"rgb": make_dataset(root / "z2g", "z2g", n_train=3, n_test=0, size=32, seed=2, easy=True) / "train",
            "rgby": make_dataset(root / "hpa", "hpa2018", n_train=3, n_test=0, size=32, seed=3, easy=True) / "train"}


CASES = [(arch, "rgby") for arch in sorted(models.ARCHS) + ["timm:resnet10t"]] + [("cnn", "rgb"), ("resnet18", "rgb")]
# the smallest size whose last feature map is larger than 1x1 (32 px for the rest)
CAM_SIZE = {"densenet121": 64, "inception_v3": 128}


@pytest.mark.parametrize("arch,channels", CASES)
def test_explain_draws_one_heatmap_per_predicted_class_for_every_architecture(images, tmp_path, capsys, arch,
                                                                              channels):
    model_dir = safe_export(tmp_path / "model", arch, channels, size=CAM_SIZE.get(arch, 32))
    files = sorted(images[channels].glob("*_green.png" if channels == "rgby" else "*.png"))[:2]
    out = tmp_path / "cam"
    code, stdout, err = cli_in_process(capsys, "explain", *files, "--learner", model_dir, "--out", out)
    assert code == 0, err
    assert "explanations.csv" in stdout
    table = pd.read_csv(out / "explanations.csv", dtype={"image": str})
    predicted = load_predictor(model_dir).predict_batch(files)
    for p in predicted:
        rows = table[table["image"] == p["image"]]
        expected = p["labels"] or [int(np.argmax(p["all_probabilities"]))]  # nothing predicted: the top class
        assert sorted(rows["class"]) == sorted(expected)
        assert list(rows["predicted"]) == [c in p["labels"] for c in rows["class"]]
        np.testing.assert_allclose(rows["probability"], [p["all_probabilities"][c] for c in rows["class"]], atol=1e-4)
        for name in rows["file"]:
            assert Image.open(out / name).size[0] > 300  # stains and heatmap side by side
        assert Image.open(out / f"{p['image']}_probabilities.png").size[1] > 200


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny trained HPA 2018 (RGBY) run with test images: safe export and export.pkl."""
    data = make_dataset(tmp_path_factory.mktemp("hpa"), "hpa2018", n_train=24, n_test=4, size=32, seed=4, easy=True)
    run = train(TrainConfig(data=str(data), out=str(tmp_path_factory.mktemp("runs")), arch="cnn", epochs=1, size=16,
                            bs=8, pretrained=False, lr="1e-3", seed=0))
    return data, run


def test_safe_export_and_pickle_explain_alike_with_and_without_tta(trained):
    data, run = trained
    safe, pickled = load_predictor(run), load_predictor(run / "export.pkl", trust=True)
    items = pd.DataFrame({"id": ["a", "b"], "key": [str(data / "test" / f"{i}_{{channel}}.png") for i in
                                                    pd.read_csv(data / "sample_submission.csv")["Id"][:2]]})
    for tta in (None, "mean"):
        a, b = explain(safe, items, classes=[0, 3], tta=tta), explain(pickled, items, classes=[0, 3], tta=tta)
        for x, y in zip(a, b):
            assert x.classes == y.classes == [0, 3] and x.image.shape == (16, 16, 3)
            np.testing.assert_allclose(x.probs, y.probs, atol=1e-5)
            np.testing.assert_allclose(x.heatmaps, y.heatmaps, atol=1e-4)
    plain, averaged = explain(safe, items, classes=[0]), explain(safe, items, classes=[0], tta="mean")
    assert not np.allclose(plain[0].heatmaps, averaged[0].heatmaps)  # TTA's maps are averaged, not the plain one


def test_predict_cam_explains_each_predicted_image_with_its_labels(trained, tmp_path, capsys):
    data, run = trained
    sub, cams = tmp_path / "sub.csv", tmp_path / "cams"
    code, out, err = cli_in_process(capsys, "predict", "--learner", run, "--data", data, "--out", sub,
                                    "--cam", cams, "--tta")
    assert code == 0, err
    submission = pd.read_csv(sub, dtype=str, keep_default_na=False)
    table = pd.read_csv(cams / "explanations.csv", dtype={"image": str})
    assert set(table["image"]) == set(submission["Id"])
    for image_id, labels in zip(submission["Id"], submission["Predicted"]):
        rows = table[table["image"] == image_id]
        if labels:
            assert sorted(rows["class"]) == sorted(map(int, labels.split())) and rows["predicted"].all()
        else:
            assert len(rows) == 1 and not rows["predicted"].any()
        assert all((cams / f).is_file() for f in rows["file"])
    assert len(list(cams.glob("*_probabilities.png"))) == len(submission)


def test_explain_of_chosen_classes_and_of_an_rgby_id_prefix(trained, tmp_path, capsys):
    data, run = trained
    image_id = pd.read_csv(data / "sample_submission.csv")["Id"][0]
    code, _, err = cli_in_process(capsys, "explain", data / "test" / image_id, "--learner", run, "--out", tmp_path,
                                  "--classes", "7", "0")
    assert code == 0, err
    table = pd.read_csv(tmp_path / "explanations.csv")
    assert list(table["class"]) == [7, 0] and list(table["name"]) == ["Golgi apparatus", "Nucleoplasm"]
    assert (tmp_path / f"{image_id}_cam07_Golgi_apparatus.png").is_file()
    thresholds = json.loads((run / "model.json").read_text())["thresholds"]
    assert list(table["threshold"]) == pytest.approx([thresholds[7], thresholds[0]], abs=1e-4)


def test_report_shows_a_heatmap_beside_each_worst_mistake_and_a_note_without_the_model(trained, tmp_path):
    from hpa_fastai.reporting import write_report

    _, run = trained
    text = (run / "report.html").read_text()
    thumbs = text.count('class="thumb"')
    assert thumbs > 0 and text.count('class="thumb heatmap"') == thumbs
    assert text.count("<br>heatmap: ") == thumbs
    copy = shutil.copytree(run, tmp_path / "run", ignore=shutil.ignore_patterns("*.safetensors", "*.pkl"))
    text = write_report(copy).read_text()
    assert 'class="thumb heatmap"' not in text and text.count('class="thumb"') == thumbs
    assert "model.safetensors in the run folder" in text and "so no heatmaps" in text
