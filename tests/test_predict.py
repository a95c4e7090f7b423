"""Prediction and evaluation: submissions for both competitions, thresholds, TTA, safe export, errors."""
from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import f1_score, precision_recall_fscore_support

from hpa_fastai import load_predictor
from hpa_fastai.config import TrainConfig
from hpa_fastai.data.layouts import labels_matrix
from hpa_fastai.errors import HPAError
from hpa_fastai.data.layouts import read_items
from hpa_fastai.metrics import tune_thresholds
from hpa_fastai.synth import make_dataset
from .helpers import train

from .helpers import cli_in_process, read_json, run_cli


@pytest.fixture(scope="module")
def z2g(tmp_path_factory):
    data = make_dataset(tmp_path_factory.mktemp("z2g"), "z2g", n_train=64, n_test=10, size=32, seed=5, easy=True)
    run = train(TrainConfig(data=str(data), out=str(tmp_path_factory.mktemp("runs")), arch="cnn", epochs=3, bs=8,
                            pretrained=False, lr="2e-3", seed=0))
    return data, run


@pytest.fixture(scope="module")
def hpa(tmp_path_factory):
    data = make_dataset(tmp_path_factory.mktemp("hpa"), "hpa2018", n_train=40, n_test=7, size=32, seed=6, easy=True)
    run = train(TrainConfig(data=str(data), out=str(tmp_path_factory.mktemp("runs")), arch="cnn", epochs=1, bs=8,
                            pretrained=False, lr="1e-3", seed=0))
    return data, run


@pytest.mark.slow
def test_z2g_submission_has_every_test_image_in_order(z2g, tmp_path):
    data, run = z2g
    out = tmp_path / "sub.csv"
    res = run_cli("predict", "--learner", run, "--data", data, "--out", out)
    assert res.returncode == 0, res.stderr
    sub = pd.read_csv(out, dtype=str, keep_default_na=False)
    expected = pd.read_csv(data / "submission.csv", dtype=str)
    assert list(sub.columns) == ["Image", "Label"]
    assert list(sub["Image"]) == list(expected["Image"])
    for label in sub["Label"]:
        assert label and all(0 <= int(t) < 10 for t in label.split())


@pytest.mark.slow
def test_hpa2018_submission_matches_sample_submission(hpa, tmp_path, capsys):
    data, run = hpa
    out = tmp_path / "sub.csv"
    code, _, err = cli_in_process(capsys, "predict", "--learner", run, "--data", data, "--out", out, "--tta")
    assert code == 0, err
    sub = pd.read_csv(out, dtype=str, keep_default_na=False)
    expected = pd.read_csv(data / "sample_submission.csv", dtype=str)
    assert list(sub.columns) == ["Id", "Predicted"]
    assert list(sub["Id"]) == list(expected["Id"])
    assert all(p and all(0 <= int(t) < 28 for t in p.split()) for p in sub["Predicted"])


@pytest.mark.slow
def test_tuned_thresholds_keep_or_improve_validation_f1(z2g):
    _, run = z2g
    metrics = read_json(run / "metrics.json")
    assert metrics["f1_macro_tuned"] >= metrics["f1_macro"]
    assert read_json(run / "model.json")["thresholds"] == [r["threshold"] for r in metrics["per_class"]]


def test_tune_thresholds_maximises_each_class_and_keeps_rare_classes_at_default():
    rng = np.random.default_rng(0)
    targets = rng.random((200, 4)) < 0.3
    targets[:, 3] = False
    targets[0, 3] = True  # one positive only: too few to tune
    probs = np.clip(targets * 0.3 + rng.random((200, 4)) * 0.5, 0, 1)  # positives sit around 0.3..0.8
    thr = tune_thresholds(probs, targets, default=0.5)
    assert thr[3] == 0.5
    for c in range(3):
        tuned = f1_score(targets[:, c], probs[:, c] >= thr[c])
        assert tuned >= f1_score(targets[:, c], probs[:, c] >= 0.5)
        assert tuned >= max(f1_score(targets[:, c], probs[:, c] >= t) for t in np.arange(0.05, 0.95, 0.05)) - 1e-9


@pytest.mark.slow
def test_tta_is_the_mean_of_the_eight_orientations(z2g, tmp_path):
    data, run = z2g
    source = Image.open(next((data / "test").glob("*.png")))
    ops = [None, Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM, Image.Transpose.ROTATE_90,
           Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270, Image.Transpose.TRANSPOSE,
           Image.Transpose.TRANSVERSE]
    paths = []
    for i, op in enumerate(ops):
        paths.append(tmp_path / f"v{i}.png")
        (source if op is None else source.transpose(op)).save(paths[-1])
    p = load_predictor(run)
    plain = np.array([r["all_probabilities"] for r in p.predict_batch(paths)])
    tta = np.array(p.predict(paths[0], tta="mean")["all_probabilities"])
    np.testing.assert_allclose(tta, plain.mean(0), atol=1e-5)
    tta_max = np.array(p.predict(paths[0], tta="max")["all_probabilities"])
    np.testing.assert_allclose(tta_max, plain.max(0), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["z2g", "hpa"])
def test_safe_export_predicts_exactly_like_the_pickled_learner(which, z2g, hpa):
    data, run = {"z2g": z2g, "hpa": hpa}[which]
    items = read_items(data, split="test", labelled=False)
    safe = load_predictor(run)
    pickled = load_predictor(run / "export.pkl", trust=True)
    assert safe.safe and not pickled.safe
    np.testing.assert_allclose(safe.probabilities(items), pickled.probabilities(items), atol=1e-6)


@pytest.mark.slow
def test_evaluate_matches_sklearn_and_writes_report(z2g, tmp_path, capsys):
    data, run = z2g
    out = tmp_path / "eval"
    code, _, err = cli_in_process(capsys, "evaluate", "--learner", run, "--data", data, "--out", out)
    assert code == 0, err
    for name in ("per_class.csv", "summary.json", "per_class_f1.png", "samples.png"):
        assert (out / name).is_file()
    p = load_predictor(run)
    items = read_items(data, split="train")
    probs = p.probabilities(items)
    y = labels_matrix(items["labels"], 10).astype(bool)
    pred = probs >= p.thresholds
    summary = read_json(out / "summary.json")["f1"]
    assert summary["macro"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))
    assert summary["samples"] == pytest.approx(f1_score(y, pred, average="samples", zero_division=0))
    per_class = pd.read_csv(out / "per_class.csv")
    prec, rec, f1, support = precision_recall_fscore_support(y, pred, average=None, zero_division=0)
    np.testing.assert_allclose(per_class["f1"], f1)
    np.testing.assert_array_equal(per_class["support"], support)


@pytest.mark.slow
def test_evaluate_on_the_run_s_own_training_data_warns_once(z2g, tmp_path, capsys):
    data, run = z2g
    valid = len(pd.read_csv(run / "valid_predictions.csv"))
    code, out, err = cli_in_process(capsys, "evaluate", "--learner", run, "--data", data, "--out", tmp_path / "e")
    assert code == 0, err
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {data} is training data of {run}: the model trained on {64 - valid} of its 64 "
                        "images, so these scores are optimistic; evaluate on labelled images it never saw"]
    other = make_dataset(tmp_path / "other", "z2g", n_train=12, n_test=0, size=32, seed=9, easy=True)
    code, out, err = cli_in_process(capsys, "evaluate", "--learner", run, "--data", other, "--out", tmp_path / "o")
    assert code == 0, err
    assert "warning" not in out


@pytest.mark.slow
def test_python_api_predicts_labels_names_and_probabilities(hpa):
    data, run = hpa
    p = load_predictor(run)
    image = next((data / "test").glob("*_green.png"))
    result = p.predict(image)
    assert result["labels"] and len(result["names"]) == len(result["labels"]) == len(result["probabilities"])
    assert result["names"][0] == p.names[result["labels"][0]]
    assert len(result["all_probabilities"]) == 28
    # an image id (the common prefix of the four stain files) works as well
    assert p.predict(str(image).replace("_green.png", ""))["all_probabilities"] == result["all_probabilities"]


@pytest.mark.slow
def test_predict_folder_of_images_writes_one_row_each(z2g, tmp_path, capsys):
    data, run = z2g
    out = tmp_path / "labels.csv"
    code, _, err = cli_in_process(capsys, "predict", "--learner", run, "--data", data / "test", "--out", out,
                                  "--threshold", "0.3")
    assert code == 0, err
    rows = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert list(rows.columns) == ["image", "labels", "names", "probabilities"]
    assert len(rows) == 10
    assert all(len(r.labels.split()) == len(r.probabilities.split()) for r in rows.itertuples())


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing_learner", "garbage_json", "garbage_pkl", "rgby_model_on_rgb",
                                  "corrupt_image", "empty_folder", "untrusted_pickle"])
def test_bad_predict_input_exits_2_and_leaves_no_output(case, z2g, hpa, tmp_path, capsys):
    z2g_data, z2g_run = z2g
    hpa_data, hpa_run = hpa
    learner, data, extra = z2g_run, z2g_data / "test", []
    if case == "missing_learner":
        learner = tmp_path / "nope"
    elif case == "garbage_json":
        learner = tmp_path / "bad"
        learner.mkdir()
        (learner / "model.json").write_text("{not json")
        (learner / "model.safetensors").write_bytes(b"garbage")
    elif case == "garbage_pkl":
        learner = tmp_path / "export.pkl"
        learner.write_bytes(b"not a pickle at all")
        extra = ["--trust"]
    elif case == "rgby_model_on_rgb":
        learner, data = hpa_run, z2g_data / "test"
    elif case == "corrupt_image":
        data = tmp_path / "imgs"
        data.mkdir()
        (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    elif case == "empty_folder":
        data = tmp_path / "empty"
        data.mkdir()
    elif case == "untrusted_pickle":
        copy = tmp_path / "elsewhere"
        shutil.copytree(z2g_run, copy)
        learner = copy / "export.pkl"
    out = tmp_path / "out.csv"
    code, _, err = cli_in_process(capsys, "predict", "--learner", learner, "--data", data, "--out", out, *extra)
    assert code == 2, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".out.csv*"))


def test_load_predictor_refuses_missing_path(tmp_path):
    with pytest.raises(HPAError, match="not found"):
        load_predictor(tmp_path / "missing")
