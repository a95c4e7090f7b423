"""Cross-validation and ensembles: one run per stratified fold, out-of-fold scores and thresholds,
and prediction with the fold models (or any several runs) averaged."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score

from hpa_fastai.atomic import folder_size
from hpa_fastai.config import TrainConfig
from hpa_fastai.training import cross_validate
from hpa_fastai.data.layouts import labels_matrix
from hpa_fastai.data.splits import stratified_valid_idx
from hpa_fastai.errors import HPAError
from hpa_fastai.data.layouts import read_items
from hpa_fastai.metrics import decode, tune_thresholds
from hpa_fastai.inference.loading import load_predictor
from hpa_fastai.inference.predictor import Ensemble, Predictor

from .helpers import cli_in_process, read_json

N_FOLDS, SEED, N_CLASSES = 3, 0, 10


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory):
    from hpa_fastai.synth import make_dataset

    data = make_dataset(tmp_path_factory.mktemp("z2g"), "z2g", n_train=36, n_test=5, size=32, seed=3, easy=True)
    out = tmp_path_factory.mktemp("runs")
    parent = cross_validate(TrainConfig(data=str(data), out=str(out), arch="cnn", epochs=1, bs=8, pretrained=False,
                                        lr="2e-3", seed=SEED, n_folds=N_FOLDS)).cv_dir
    return data, parent


def oof_arrays(parent):
    oof = pd.read_csv(parent / "oof_predictions.csv", dtype={"id": str, "labels": str, "probs": str})
    probs = np.array([[float(p) for p in row.split()] for row in oof["probs"]])
    return oof, probs, labels_matrix(oof["labels"], N_CLASSES).astype(bool)


@pytest.mark.slow
def test_cv_trains_one_run_per_stratified_fold(cv_run):
    data, parent = cv_run
    assert parent.name.endswith("-cv-cnn") and (parent.parent / "latest").resolve() == parent.resolve()
    assert read_json(parent / "config.json")["n_folds"] == N_FOLDS
    assert not (parent / "latest").exists()
    items = read_items(data)
    oof, _, _ = oof_arrays(parent)
    assert sorted(oof["id"]) == sorted(items["id"])  # every image exactly once
    for k in range(N_FOLDS):
        run = parent / f"fold{k}"
        assert (run / "model.json").is_file() and read_json(run / "config.json")["fold"] == k
        valid = stratified_valid_idx(items["labels"], N_CLASSES, N_FOLDS, k, SEED)
        assert set(oof.loc[oof["fold"] == k, "id"]) == set(items["id"].iloc[valid])
    # lean: each fold keeps its exports, not the files only --resume needs
    weights = sum((parent / f"fold{k}" / "model.safetensors").stat().st_size for k in range(N_FOLDS))
    assert not list(parent.rglob("checkpoint.pth")) and not list(parent.rglob("best.pth"))
    assert folder_size(parent) <= 2.1 * weights, (folder_size(parent), weights)


@pytest.mark.slow
def test_cv_json_scores_and_thresholds_are_those_of_the_oof_predictions(cv_run):
    _, parent = cv_run
    cv = read_json(parent / "cv.json")
    oof, probs, targets = oof_arrays(parent)
    thresholds = tune_thresholds(probs, targets, default=0.5)
    np.testing.assert_allclose(cv["thresholds"], thresholds)
    assert cv["runs"] == [f"fold{k}" for k in range(N_FOLDS)]
    f1 = lambda rows, t: f1_score(targets[rows], probs[rows] >= t, average="macro", zero_division=0)  # noqa: E731
    everything = np.ones(len(oof), bool)
    assert cv["oof"]["images"] == len(oof) == 36
    assert cv["oof"]["f1_macro"] == pytest.approx(f1(everything, 0.5))
    assert cv["oof"]["f1_macro_tuned"] == pytest.approx(f1(everything, thresholds))
    assert cv["oof"]["f1_samples_tuned"] == pytest.approx(
        f1_score(targets, probs >= thresholds, average="samples", zero_division=0))
    for k, fold in enumerate(cv["folds"]):
        rows = oof["fold"].to_numpy() == k
        assert fold["images"] == rows.sum()
        assert fold["f1_macro"] == pytest.approx(f1(rows, 0.5))
        assert fold["f1_macro_tuned"] == pytest.approx(f1(rows, thresholds))
    predicted = [" ".join(map(str, np.flatnonzero(r))) for r in decode(probs, thresholds)]
    assert list(oof["predicted"].fillna("")) == predicted


def test_cv_flags_are_checked_before_training(make_z2g, tmp_path, capsys):
    data = make_z2g(n=4)
    code, _, err = cli_in_process(capsys, "cv", "--data", data, "--n-folds", 1, "--out", tmp_path / "runs")
    assert code == 2 and "--n-folds" in err
    # --n-folds 0 (the default) means 5
    code, _, err = cli_in_process(capsys, "cv", "--data", data, "--out", tmp_path / "runs", "--arch", "cnn")
    assert code == 2 and "--n-folds 5 is more than the 4 images" in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def _members(parent):
    return [load_predictor(parent / f"fold{k}") for k in range(N_FOLDS)]


@pytest.mark.slow
def test_predict_with_a_cv_folder_averages_the_folds_with_oof_thresholds(cv_run, tmp_path, capsys):
    data, parent = cv_run
    copy = shutil.copytree(parent, tmp_path / "cv")
    items = read_items(data, split="test", labelled=False)
    ensemble = load_predictor(copy)
    assert isinstance(ensemble, Ensemble) and len(ensemble.members) == N_FOLDS
    probs = ensemble.probabilities(items)
    np.testing.assert_allclose(probs, np.mean([m.probabilities(items) for m in _members(copy)], axis=0), rtol=1e-6)
    # thresholds that decide differently from the members' own, written into cv.json
    thresholds = np.median(probs, axis=0)
    member_mean = np.mean([m.thresholds for m in ensemble.members], axis=0)
    assert (decode(probs, thresholds) != decode(probs, member_mean)).any()
    cv = read_json(copy / "cv.json")
    (copy / "cv.json").write_text(json.dumps({**cv, "thresholds": thresholds.tolist()}))
    out = tmp_path / "sub.csv"
    code, stdout, err = cli_in_process(capsys, "predict", "--learner", copy, "--data", data, "--out", out)
    assert code == 0, err
    assert "ensemble of 3 models" in stdout
    sub = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert list(sub["Image"]) == list(items["id"])
    assert list(sub["Label"]) == [" ".join(map(str, np.flatnonzero(r))) for r in decode(probs, thresholds)]


@pytest.mark.slow
def test_predict_with_several_learners_uses_the_mean_of_their_thresholds(cv_run, tmp_path, capsys):
    data, parent = cv_run
    runs = [shutil.copytree(parent / f"fold{k}", tmp_path / f"run{k}") for k in range(2)]
    items = read_items(data, split="test", labelled=False)
    members = [load_predictor(r) for r in runs]
    probs = np.mean([m.probabilities(items, tta="mean") for m in members], axis=0)
    middle = float(np.median(probs))
    for run, t in zip(runs, (middle - 0.05, middle + 0.05)):
        meta = read_json(run / "model.json")
        (run / "model.json").write_text(json.dumps({**meta, "thresholds": [t] * N_CLASSES}))
    expected = decode(probs, np.full(N_CLASSES, middle))
    assert (expected != decode(probs, np.full(N_CLASSES, middle - 0.05))).any()
    assert (expected != decode(probs, np.full(N_CLASSES, middle + 0.05))).any()
    out = tmp_path / "sub.csv"
    code, _, err = cli_in_process(capsys, "predict", "--learner", *runs, "--data", data, "--out", out, "--tta")
    assert code == 0, err
    sub = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert list(sub["Label"]) == [" ".join(map(str, np.flatnonzero(r))) for r in expected]


@pytest.mark.slow
@pytest.mark.parametrize("field, value", [("format", "hpa2018"), ("channels", "rgby"),
                                          ("vocab", [str(c) for c in reversed(range(N_CLASSES))])])
def test_ensemble_members_must_agree(cv_run, field, value):
    _, parent = cv_run
    first, odd = load_predictor(parent / "fold0"), load_predictor(parent / "fold1")
    Ensemble([first, odd], first.thresholds, parent)  # as trained, they agree
    odd.meta = {**odd.meta, field: value}
    with pytest.raises(HPAError, match="ensemble members must agree"):
        Ensemble([first, odd], first.thresholds, parent)


@pytest.mark.slow
def test_predict_refuses_an_ensemble_of_different_vocabularies(cv_run, tmp_path, capsys):
    data, parent = cv_run
    odd = shutil.copytree(parent / "fold1", tmp_path / "odd")
    meta = read_json(odd / "model.json")
    (odd / "model.json").write_text(json.dumps({**meta, "vocab": meta["vocab"][::-1]}))
    assert isinstance(load_predictor(odd), Predictor)  # alone it still loads
    code, _, err = cli_in_process(capsys, "predict", "--learner", parent / "fold0", odd, "--data", data,
                                  "--out", tmp_path / "sub.csv")
    assert code == 2 and "vocabulary differs" in err and str(odd) in err


@pytest.mark.slow
def test_cv_json_holds_status_split_half_and_per_class(cv_run):
    _, parent = cv_run
    cv = read_json(parent / "cv.json")
    assert cv["status"] == "finished" and cv["seconds"] > 0
    assert 0 <= cv["oof"]["f1_macro_tuned_oos"] <= 1
    assert [row["class"] for row in cv["oof"]["per_class"]] == list(range(N_CLASSES))
    assert cv["oof"]["per_class"][0]["threshold"] == pytest.approx(cv["thresholds"][0])


@pytest.mark.slow
def test_runs_lists_a_cross_validation_as_one_row_and_its_folds_on_request(cv_run, capsys):
    from hpa_fastai.runs.table import collect_runs

    _, parent = cv_run
    cv = read_json(parent / "cv.json")
    table = collect_runs(parent.parent)
    assert list(table["run"]) == [parent.name]
    row = table.iloc[0]
    assert row["folds"] == N_FOLDS and row["status"] == "finished" and row["arch"] == "cnn"
    assert (row["f1"], row["f1_tuned"], row["f1_oos"]) == pytest.approx(
        (cv["oof"]["f1_macro"], cv["oof"]["f1_macro_tuned"], cv["oof"]["f1_macro_tuned_oos"]))
    with_folds = collect_runs(parent.parent, folds=True)
    assert list(with_folds["run"]) == [parent.name] + [f"{parent.name}/fold{k}" for k in range(N_FOLDS)]
    assert list(collect_runs(parent)["run"]) == list(with_folds["run"])  # the cv folder itself: it and its folds
    code, out, err = cli_in_process(capsys, "runs", parent.parent)
    assert code == 0, err
    assert parent.name in out and "fold0" not in out and "--folds lists them" in out
    code, out, err = cli_in_process(capsys, "runs", parent.parent, "--folds")
    assert code == 0 and f"{parent.name}/fold2" in out


@pytest.mark.slow
def test_report_renders_a_cross_validation_page(cv_run, tmp_path, capsys):
    _, parent = cv_run
    copy = shutil.copytree(parent, tmp_path / parent.name)
    cv = read_json(copy / "cv.json")
    code, out, err = cli_in_process(capsys, "report", copy)
    assert code == 0, err
    page = (copy / "report.html").read_text()
    assert f"Cross-validation {copy.name}" in page
    for value in (cv["oof"]["f1_macro"], cv["oof"]["f1_macro_tuned"], cv["oof"]["f1_macro_tuned_oos"]):
        assert f"{value:.4f}" in page
    assert "split-half" in page and "in-sample" in page and "threshold 0.5" in page
    folds = page.split('id="folds"')[1].split("<h2")[0]
    for k, fold in enumerate(cv["folds"]):
        assert f'<a href="fold{k}/report.html">fold{k}</a>' in folds or f"<td>fold{k}</td>" in folds
        assert f"{fold['f1_macro']:.4f}" in folds
    assert "Mitochondria" in page.split('id="per-class"')[1]  # the out-of-fold per-class table
    assert f"python run.py predict --learner {copy}" in page


@pytest.mark.slow
def test_continuing_a_finished_cv_names_folds_as_their_folders_and_flags_do(cv_run, tmp_path, capsys):
    _, parent = cv_run
    copy = shutil.copytree(parent, tmp_path / parent.name)
    code, out, err = cli_in_process(capsys, "cv", "--resume", copy)
    assert code == 0, err
    for k in range(N_FOLDS):
        assert f"fold{k} (--fold {k} of 0..{N_FOLDS - 1}): finished before, kept" in out
    assert " of 3)" not in out  # no 1-based count beside a 0-based name
    assert "tuned, split-half" in out and (copy / "report.html").is_file()


@pytest.mark.slow
def test_a_killed_cross_validation_is_listed_as_interrupted(cv_run, tmp_path):
    from hpa_fastai.reporting import write_report
    from hpa_fastai.runs.table import collect_runs

    _, parent = cv_run
    copy = shutil.copytree(parent, tmp_path / "runs" / parent.name)
    (copy / "cv.json").write_text(json.dumps({"status": "running", "n_folds": N_FOLDS}))
    row = collect_runs(copy.parent).iloc[0]
    assert row["status"] == "interrupted" and row["folds"] == N_FOLDS and pd.isna(row["f1_oos"])
    page = write_report(copy).read_text()
    assert "interrupted" in page and f"python run.py cv --resume {copy}" in page


@pytest.mark.slow
def test_evaluate_with_a_cv_folder_on_its_own_data_warns_that_it_trained_on_every_image(cv_run, tmp_path, capsys):
    data, parent = cv_run
    code, out, err = cli_in_process(capsys, "evaluate", "--learner", parent, "--data", data, "--out", tmp_path / "e")
    assert code == 0, err
    assert f"warning: {data} is training data of {parent}: the model trained on 36 of its 36 images" in out
