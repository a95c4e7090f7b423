"""The fastai-native API: ``hpa_dls`` and ``hpa_learner`` give DataLoaders and a Learner on which
fastai's own tools work (show_batch in false colour for RGBY, lr_find, fit_one_cycle, show_results,
predict on a path, export and load_learner, Interpretation), plus thresholds, the safe export and
heatmaps; ``import hpa_fastai`` stays light."""
from __future__ import annotations

import subprocess
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from hpa_fastai import export_safe, hpa_dls, hpa_learner, load_predictor, show_heatmaps, tune_thresholds  # noqa: E402
from hpa_fastai.data.pipeline import false_colour_tensor  # noqa: E402
from hpa_fastai.errors import HPAError  # noqa: E402
from hpa_fastai.synth import make_dataset  # noqa: E402

from .helpers import REPO  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:load_learner:UserWarning")  # load_learner of our own export


@pytest.fixture(scope="module")
def hpa(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("hpa"), "hpa2018", n_train=24, n_test=3, size=32, seed=7, easy=True)


@pytest.fixture(scope="module")
def learn(hpa):
    """A Learner on RGBY data, fitted for one short cycle."""
    dls = hpa_dls(hpa, size=16, bs=8, seed=0)
    learn = hpa_learner(dls, "cnn", pretrained=False)
    learn.fit_one_cycle(1, 1e-3)
    return learn


def shown_images() -> list[np.ndarray]:
    return [im.get_array() for ax in plt.gcf().axes for im in ax.get_images()]


def test_show_batch_draws_rgby_in_false_colour(hpa):
    dls = hpa_dls(hpa, size=16, bs=4, seed=0)
    assert len(dls.vocab) == 28 and dls.names[0] == "Nucleoplasm"
    xb, yb = dls.valid.one_batch()
    assert xb.shape[1] == 4 and yb.shape[1] == 28
    dls.valid.show_batch(max_n=2)
    images = shown_images()
    plt.close("all")
    assert len(images) == 2 and all(im.shape == (16, 16, 3) for im in images)  # no 4th channel read as alpha
    decoded = dls.valid.decode_batch((xb, yb), max_n=2)
    expected = false_colour_tensor(decoded[0][0]).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(np.asarray(images[0]), expected)


def test_rgb_data_keeps_fastai_s_own_image_display(tmp_path):
    z2g = make_dataset(tmp_path / "z2g", "z2g", n_train=12, n_test=0, size=16, seed=0, easy=True)
    dls = hpa_dls(z2g, bs=4, seed=0)
    assert dls.one_batch()[0].shape[1] == 3 and len(dls.vocab) == 10
    dls.show_batch(max_n=2)
    assert all(im.shape == (16, 16, 3) for im in shown_images())
    plt.close("all")


def test_lr_find_fit_show_results_and_interpretation_work_as_in_fastai(learn):
    from fastai.interpret import Interpretation

    suggestion = learn.lr_find(num_it=6, show_plot=False)
    assert suggestion.valley > 0
    learn.show_results(max_n=2)
    assert all(im.shape[-1] == 3 for im in shown_images())
    plt.close("all")
    interp = Interpretation.from_learner(learn)
    losses, idx = interp.top_losses(2)
    assert len(idx) == 2 and losses[0] >= losses[1]
    interp.plot_top_losses(2)
    assert all(im.shape[-1] == 3 for im in shown_images())
    plt.close("all")
    assert {"f1_macro", "f1_samples"} <= set(learn.recorder.metric_names)


def test_predict_takes_a_stain_file_or_the_id_prefix_and_survives_export(learn, hpa, tmp_path):
    from fastai.learner import load_learner

    green = sorted((hpa / "test").glob("*_green.png"))[0]
    labels, decoded, probs = learn.predict(str(green))
    assert probs.shape == (28,) and list(labels) == [learn.dls.vocab[i] for i in np.flatnonzero(decoded)]
    torch.testing.assert_close(learn.predict(str(green).replace("_green.png", ""))[2], probs)
    learn.export(tmp_path / "export.pkl")
    reloaded = load_learner(tmp_path / "export.pkl")
    torch.testing.assert_close(reloaded.predict(str(green))[2], probs)
    # the pickle carries the model description, so the project's own loader reads it too
    pred = load_predictor(tmp_path / "export.pkl", trust=True)
    np.testing.assert_allclose(pred.predict(green)["all_probabilities"], probs.numpy(), atol=1e-5)


def test_tuned_thresholds_reach_the_safe_export_and_heatmaps(learn, hpa, tmp_path):
    table = tune_thresholds(learn)
    assert list(table.columns[:3]) == ["class", "name", "threshold"] and len(table) == 28
    model_json = export_safe(learn, tmp_path / "model")
    pred = load_predictor(model_json)
    assert list(pred.thresholds) == pytest.approx(list(table["threshold"]))
    valid = learn.dls.valid.items
    probs = learn.get_preds(dl=learn.dls.valid)[0].numpy()
    np.testing.assert_allclose(pred.probabilities(pd.DataFrame({"key": valid["key"]})), probs, atol=1e-5)
    green = sorted((hpa / "test").glob("*_green.png"))[0]
    explanations = show_heatmaps(pred, green, classes=[0, 7], out=tmp_path / "cams")
    plt.close("all")
    assert explanations[0].heatmaps.shape == (2, 16, 16)
    assert len(list((tmp_path / "cams").glob("*_cam*.png"))) == 2


def test_hpa_learner_refuses_plain_dataloaders_and_bad_flags(hpa):
    from fastai.data.core import DataLoaders

    with pytest.raises(TypeError, match="hpa_dls"):
        hpa_learner(DataLoaders(), "cnn")
    with pytest.raises(HPAError, match="--arch"):
        hpa_learner(hpa_dls(hpa, size=16, bs=4), "no-such-net")
    with pytest.raises(HPAError, match="--valid-pct"):
        hpa_dls(hpa, valid_pct=1.5)


def test_importing_the_package_loads_no_fastai():
    code = "import sys, hpa_fastai; print('fastai' in sys.modules, 'torch' in sys.modules, 'hpa_dls' in dir(hpa_fastai))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={"PYTHONPATH": str(REPO), "PATH": ""}, timeout=300)
    assert out.stdout.split() == ["False", "False", "True"], out.stderr


def test_hpa_learner_takes_the_model_loss_and_device_options_of_run_py(hpa):
    from hpa_fastai.losses import AsymmetricLoss

    dls = hpa_dls(hpa, size=16, bs=8, seed=0)
    learn = hpa_learner(dls, "cnn", pretrained=False, loss="asl", asl_gamma_neg=2.5, asl_gamma_pos=0.5,
                        asl_clip=0.1, threshold=0.3)
    assert isinstance(learn.loss_func, AsymmetricLoss)
    assert (learn.loss_func.gamma_neg, learn.loss_func.gamma_pos, learn.loss_func.clip) == (2.5, 0.5, 0.1)
    assert learn.loss_func.thresh == 0.3 and all(m.thresh == 0.3 for m in learn.metrics)
    meta = learn.model_description.meta  # what export_safe writes into model.json
    assert (meta["loss"], meta["asl_gamma_neg"], meta["asl_clip"]) == ("asl", 2.5, 0.1)
    with pytest.raises(HPAError, match="--asl-clip"):
        hpa_learner(dls, "cnn", pretrained=False, loss="asl", asl_clip=0.9)
    with pytest.raises(HPAError, match="--loss"):
        hpa_learner(dls, "cnn", pretrained=False, loss="hinge")
