"""One image, one answer: the tuned per-class thresholds travel with the model, so every way of
predicting an image gives it the same labels: fastai's ``learn.predict``, ``load_learner`` of the
exported pickle, ``load_predictor`` of the safe export or the pickle, ``run.py predict``, the web
app's answer and the notebook's ``submission``."""
from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
import torch

from hpa_fastai import export_safe, hpa_dls, hpa_learner, load_predictor, submission, tune_thresholds
from hpa_fastai.config import TrainConfig
from hpa_fastai.losses import LOSSES, create_loss, set_thresholds
from hpa_fastai.metrics import decode
from hpa_fastai.serve.app import answer
from hpa_fastai.synth import make_dataset

from .helpers import cli_in_process, read_json, train

pytestmark = pytest.mark.filterwarnings("ignore:load_learner:UserWarning")  # load_learner of our own export


def labels_of(fastai_prediction) -> list[int]:
    """The class ids of ``learn.predict``'s decoded labels (the vocabulary's strings)."""
    return sorted(int(c) for c in fastai_prediction[0])


def csv_labels(path) -> dict[str, list[int]]:
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    return {row["image"]: sorted(int(c) for c in row["labels"].split()) for _, row in table.iterrows()}


def served_labels(pred, image) -> list[int]:
    table = answer(pred, [image]).table
    return sorted(int(c) for c in table.loc[table["predicted"] == "yes", "class"])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("z2g"), "z2g", n_train=64, n_test=12, size=32, seed=3, easy=True)


@pytest.mark.parametrize("name", list(LOSSES))
def test_every_loss_decodes_with_per_class_thresholds_and_pickles_with_them(name):
    loss = create_loss(name)
    set_thresholds(loss, [0.3, 0.9, 0.5])
    probs = torch.tensor([[0.4, 0.95, 0.2], [0.1, 0.6, 0.45], [0.3, 0.2, 0.1]])
    expected = decode(probs.numpy(), [0.3, 0.9, 0.5])  # predict's rule: at or above, else the most probable
    assert loss.decodes(probs).tolist() == expected.tolist()
    assert expected.tolist() == [[True, True, False], [False, True, False], [True, False, False]]
    again = pickle.loads(pickle.dumps(loss))
    assert again.decodes(probs).tolist() == expected.tolist()


def test_every_path_gives_an_image_the_same_labels_after_tune_thresholds(data, tmp_path, capsys):
    from fastai.learner import load_learner

    dls = hpa_dls(data, size=32, bs=8, valid_pct=0.5, seed=0)
    learn = hpa_learner(dls, "cnn", pretrained=False)
    learn.fit_one_cycle(2, 2e-3)
    tune_thresholds(learn)
    learn.export(tmp_path / "export.pkl")
    safe = load_predictor(export_safe(learn, tmp_path / "model"))
    assert not np.allclose(safe.thresholds, 0.5)  # the thresholds were tuned, so they can change labels
    pickled = load_predictor(tmp_path / "export.pkl", trust=True)
    loaded = load_learner(tmp_path / "export.pkl")
    images = sorted((data / "test").glob("*.png"))
    written = submission(safe, data / "test", tmp_path / "notebook.csv")
    code, _, err = cli_in_process(capsys, "predict", "--learner", tmp_path / "model" / "model.json", "--data",
                                  data / "test", "--out", tmp_path / "cli.csv")
    assert code == 0, err
    notebook, cli = csv_labels(tmp_path / "notebook.csv"), csv_labels(tmp_path / "cli.csv")
    assert len(written) == len(images)
    differs_at_half = 0
    for image in images:
        expected = safe.predict(image)["labels"]
        assert labels_of(learn.predict(str(image))) == expected, image.name
        assert labels_of(loaded.predict(str(image))) == expected, image.name
        assert pickled.predict(image)["labels"] == expected, image.name
        assert notebook[image.stem] == expected and cli[image.stem] == expected, image.name
        assert served_labels(safe, image) == expected, image.name
        differs_at_half += safe.predict(image, threshold=0.5)["labels"] != expected
    assert differs_at_half  # at one threshold of 0.5 some image gets other labels: the thresholds mattered


def test_a_run_folder_s_pickle_predicts_with_its_tuned_thresholds(data, tmp_path, capsys):
    from fastai.learner import load_learner

    run = train(TrainConfig(data=str(data), out=str(tmp_path / "runs"), arch="cnn", epochs=2, bs=8, valid_pct=0.5,
                            pretrained=False, lr="2e-3", seed=0))
    thresholds = read_json(run / "model.json")["thresholds"]
    loaded = load_learner(run / "export.pkl")
    assert loaded.loss_func.thresh.tolist() == pytest.approx(thresholds)
    safe = load_predictor(run)
    code, _, err = cli_in_process(capsys, "predict", "--learner", run, "--data", data / "test", "--out",
                                  tmp_path / "cli.csv")
    assert code == 0, err
    cli = csv_labels(tmp_path / "cli.csv")
    for image in sorted((data / "test").glob("*.png")):
        expected = safe.predict(image)["labels"]
        assert labels_of(loaded.predict(str(image))) == expected == cli[image.stem], image.name
        assert served_labels(safe, image) == expected, image.name
