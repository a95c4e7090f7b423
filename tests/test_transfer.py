"""--weights: ImageNet files as torchvision and timm publish them, earlier runs with another vocabulary or
other stains, this model's own state dict; and the one line each refused form gets.

The ImageNet files are made here by torchvision and timm themselves (``resnet18(weights=None)``'s state
dict saved under torchvision's file name, timm's as ``model.safetensors``): their names and shapes are
those of the published files, whose numbers these tests do not need."""
from __future__ import annotations

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from hpa_fastai import models, transfer
from hpa_fastai.config import TrainConfig
from hpa_fastai.data.vocab import class_names, vocab_for
from hpa_fastai.errors import HPAError
from hpa_fastai.modelfile import save

from .helpers import cli_in_process, read_json, train

HPA, Z2G = class_names("hpa2018"), class_names("z2g")


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    torch.manual_seed(1)
    state = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path_factory.mktemp("hub") / "resnet18-f37072fd.pth"
    torch.save(state, path)
    return path, state


def timm_file(folder, name: str):
    import timm

    torch.manual_seed(2)
    state = timm.create_model(name).state_dict()
    path = folder / "model.safetensors"  # the name timm's files have on the Hugging Face hub
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path, state


def fake_run(folder, arch: str, fmt: str, channels: str, seed: int = 3):
    """A run folder's safe export of a randomly initialised ``arch``: what --weights reads of a run."""
    n_in = len(channels)
    torch.manual_seed(seed)
    model, _ = models.create_model(arch, n_in, len(vocab_for(fmt)), pretrained=False)
    meta = {"arch": arch, "format": fmt, "channels": channels, "n_in": n_in, "size": 32, "mean": [0.2] * n_in,
            "std": [0.2] * n_in, "vocab": vocab_for(fmt), "names": class_names(fmt),
            "thresholds": [0.5] * len(vocab_for(fmt)), "loss": "bce", "focal_gamma": 2.0}
    folder.mkdir(parents=True, exist_ok=True)
    save(model.state_dict(), meta, folder)
    return folder, model.state_dict()


def test_a_torchvision_imagenet_file_as_downloaded_loads_its_body_and_leaves_out_its_classifier(resnet18_file, caplog):
    path, state = resnet18_file
    model, start = transfer.start_model("resnet18", 4, HPA, weights=path)
    assert start.kind == "imagenet" and start.pretrained
    w = model[0][0].weight
    assert w.shape == (64, 4, 7, 7)
    torch.testing.assert_close(w[:, :3], state["conv1.weight"])  # the file's RGB filters
    torch.testing.assert_close(w[:, 3], (state["conv1.weight"][:, 0] + state["conv1.weight"][:, 2]) / 2)
    torch.testing.assert_close(model[0][7][1].conv2.weight, state["layer4.1.conv2.weight"])
    torch.testing.assert_close(model[0][1].running_var, state["bn1.running_var"])
    assert model[1][-1].weight.shape == (28, 512)  # a new head for 28 classes; the file's 1000-class fc left out
    assert "the classifier (2 tensors) left out" in caplog.text


def test_rgb_imagenet_file_keeps_every_first_conv_filter(resnet18_file):
    path, state = resnet18_file
    model, _ = transfer.start_model("resnet18", 3, Z2G, weights=path)
    torch.testing.assert_close(model[0][0].weight, state["conv1.weight"])


def test_older_torchvision_files_without_batch_counts_load(resnet18_file, tmp_path):
    path, state = resnet18_file
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, tmp_path / "old.pth")
    model, _ = transfer.start_model("resnet18", 3, Z2G, weights=tmp_path / "old.pth")
    torch.testing.assert_close(model[0][0].weight, state["conv1.weight"])


def test_a_timm_safetensors_file_loads_into_the_timm_body(tmp_path):
    path, state = timm_file(tmp_path, "resnet10t")
    model, start = transfer.start_model("timm:resnet10t", 4, HPA, weights=path)
    assert start.kind == "imagenet"
    first = model.state_dict()[models.first_conv_name(model)]
    torch.testing.assert_close(first[:, :3], state["conv1.0.weight"])
    torch.testing.assert_close(model[0].model.layer4[0].conv2.weight, state["layer4.0.conv2.weight"])


@pytest.mark.slow
def test_densenet_files_with_torchvisions_old_layer_names_load(tmp_path):
    # torchvision's published densenet121-a639ec97.pth names "norm1" as "norm.1" and has no batch counts;
    # torchvision renames on loading
    torch.manual_seed(4)
    state = torchvision.models.densenet121(weights=None).state_dict()
    old = {k.replace("norm1.", "norm.1.").replace("conv2.", "conv.2."): v for k, v in state.items()
           if not k.endswith("num_batches_tracked")}
    assert old.keys() != state.keys()
    torch.save(old, tmp_path / "densenet121-a639ec97.pth")
    model, _ = transfer.start_model("densenet121", 4, HPA, weights=tmp_path / "densenet121-a639ec97.pth")
    torch.testing.assert_close(model[0][0].denseblock1.denselayer1.norm1.weight,
                               state["features.denseblock1.denselayer1.norm1.weight"])
    torch.testing.assert_close(model[0][0].conv0.weight[:, :3], state["features.conv0.weight"])


@pytest.mark.parametrize("arch", sorted(a for a in models.ARCHS if a != "cnn") + ["timm:resnet10t"])
def test_every_imagenet_layout_lands_every_body_tensor_in_the_model(arch):
    layout = models.imagenet_layout(arch)
    import warnings

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = models.builder(arch)(3, 10, pretrained=False)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    body = {k for k in shapes if k.startswith("0.")}
    assert set(layout.to_model.values()) == body
    assert all(shapes[layout.to_model[k]] == layout.shapes[k] for k in layout.to_model)
    assert layout.classifier and layout.classifier.isdisjoint(layout.to_model)


def test_an_imagenet_file_of_another_architecture_is_refused_naming_the_tensor_and_shapes(resnet18_file):
    path, _ = resnet18_file
    with pytest.raises(HPAError) as e:
        transfer.start_model("resnet50", 4, HPA, weights=path)
    assert str(e.value) == (f"--weights {path}: not resnet50's ImageNet weights ('layer1.0.conv1.weight' is "
                            "(64, 64, 3, 3) in the file, (64, 64, 1, 1) in resnet50)")
    with pytest.raises(HPAError, match=r"'layer1.2.conv1.weight' \(64, 64, 3, 3\) is missing from the file"):
        transfer.start_model("resnet34", 4, HPA, weights=path)


def test_a_file_with_nothing_in_common_is_refused(tmp_path):
    torch.save({"encoder.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    with pytest.raises(HPAError, match="no parameters in common with resnet18"):
        transfer.start_model("resnet18", 4, HPA, weights=tmp_path / "other.pth")


@pytest.mark.parametrize("form", ["folder", "model.json", "model.safetensors"])
def test_an_rgby_hpa2018_run_starts_an_rgb_zero_to_gans_model(tmp_path, form, caplog):
    run, source = fake_run(tmp_path / "hpa-run", "resnet18", "hpa2018", "rgby")
    given = run if form == "folder" else run / form
    model, start = transfer.start_model("resnet18", 3, Z2G, weights=given)
    assert start.kind == "run" and start.pretrained
    torch.testing.assert_close(model[0][0].weight, source["0.0.weight"][:, :3])  # yellow filters dropped
    torch.testing.assert_close(model[0][6][1].conv1.weight, source["0.6.1.conv1.weight"])
    out, src_out = model[1][-1].weight, source["1.8.weight"]
    for i, name in enumerate(Z2G):  # every Zero-to-GANs class is one of HPA 2018's, by name
        torch.testing.assert_close(out[i], src_out[HPA.index(name)])
    torch.testing.assert_close(model[1][4].weight, source["1.4.weight"])  # the head's layers before the classes kept
    assert "10 of the 10 classes share a name with the run's 28: their output rows copied, 0 start fresh" in caplog.text


def test_an_rgb_zero_to_gans_run_starts_an_rgby_hpa2018_model(tmp_path, caplog):
    run, source = fake_run(tmp_path / "z2g-run", "resnet18", "z2g", "rgb")
    torch.manual_seed(0)
    fresh, _ = models.create_model("resnet18", 4, 28, pretrained=False)
    torch.manual_seed(0)
    model, _ = transfer.start_model("resnet18", 4, HPA, weights=run)
    w = model[0][0].weight
    torch.testing.assert_close(w[:, :3], source["0.0.weight"])
    torch.testing.assert_close(w[:, 3], (source["0.0.weight"][:, 0] + source["0.0.weight"][:, 2]) / 2)
    out = model[1][-1].weight
    for i, name in enumerate(HPA):
        expected = source["1.8.weight"][Z2G.index(name)] if name in Z2G else fresh[1][-1].weight[i]
        torch.testing.assert_close(out[i], expected)  # shared rows copied; the others as a new model starts them
    assert "10 of the 28 classes share a name with the run's 10: their output rows copied, 18 start fresh" in caplog.text


def test_a_run_with_the_same_vocabulary_keeps_its_whole_head(tmp_path):
    run, source = fake_run(tmp_path / "run", "cnn", "z2g", "rgb")
    model, _ = transfer.start_model("cnn", 3, Z2G, weights=run)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, source[name])


def test_a_run_of_another_architecture_is_refused_not_half_loaded(tmp_path):
    run, _ = fake_run(tmp_path / "run", "resnet18", "z2g", "rgb")
    with pytest.raises(HPAError, match=r"a run of resnet18, and this run's --arch is resnet34: pass --arch resnet18"):
        transfer.start_model("resnet34", 3, Z2G, weights=run)


def test_this_models_own_state_dict_loads_and_a_misfit_names_the_tensor(tmp_path):
    source, _ = models.create_model("cnn", 4, 10, pretrained=False)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    loaded, start = transfer.start_model("cnn", 4, Z2G, weights=tmp_path / "w.pth")
    assert start.kind == "state dict"
    for a, b in zip(source.state_dict().values(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b)
    with pytest.raises(HPAError, match=r"'0.0.weight' is \(32, 4, 3, 3\) in the file, \(32, 3, 3, 3\) in the model"):
        transfer.start_model("cnn", 3, Z2G, weights=tmp_path / "w.pth")


def _file(name: str, content=b""):
    def make(folder):
        path = folder / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            torch.save(content, path)
        return path
    return make


def _folder(folder):
    (folder / "empty").mkdir()
    return folder / "empty"


@pytest.mark.parametrize("make, message", [
    (_file("none.pth", None), "file not found"),
    (_folder, "a folder without model.json (not a finished run)"),
    (_file("export.pkl", b"\x80\x04N."), "a pickle is never loaded"),
    (_file("x.pth"), "cannot read weights"),
    (_file("x.safetensors", (8).to_bytes(8, "little") + b"not json"), "cannot read weights"),
    (_file("list.pth", [torch.zeros(1)]), "not a state dict"),
    (_file("nan.pth", {"conv1.weight": torch.full((64, 3, 7, 7), float("nan"))}), "not finite"),
])
def test_each_refused_form_is_one_line_naming_the_flag(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(HPAError) as e:
        transfer.start_model("resnet18", 4, HPA, weights=path)
    assert str(e.value).startswith(f"--weights {path}") and message in str(e.value) and "\n" not in str(e.value)


@pytest.fixture(scope="module")
def tiny_sets(tmp_path_factory):
    from hpa_fastai.synth import make_dataset

    root = tmp_path_factory.mktemp("sets")
    return (make_dataset(root / "hpa", "hpa2018", n_train=32, n_test=0, size=32, seed=5, easy=True),
            make_dataset(root / "z2g", "z2g", n_train=32, n_test=0, size=32, seed=6, easy=True))


@pytest.mark.slow
def test_a_run_started_from_an_earlier_run_records_it_and_fine_tunes(tiny_sets, tmp_path, capsys):
    hpa, z2g = tiny_sets
    base = dict(arch="cnn", epochs=2, bs=8, lr="2e-3", seed=0, size=32, out=str(tmp_path))
    first = train(TrainConfig(data=str(hpa), pretrained=False, **base))
    second = train(TrainConfig(data=str(z2g), weights=str(first), **base))
    config = read_json(second / "config.json")
    assert config["pretrained_used"] is True and config["start_weights"].startswith(f"the run {first}: rgby, 28")
    history = read_json(second / "metrics.json")
    assert history["epochs_run"] == 3  # one frozen epoch, then --epochs 2 unfrozen
    import pandas as pd

    assert list(pd.read_csv(second / "history.csv")["phase"]) == ["frozen", "unfrozen", "unfrozen"]
    assert f"from the run {first}" in (second / "report.html").read_text()
    assert "10 of the 10 classes share a name" in capsys.readouterr().out


def test_the_cli_refuses_a_bad_weights_file_with_one_line(resnet18_file, tiny_sets, tmp_path, capsys):
    path, _ = resnet18_file
    _, z2g = tiny_sets
    code, _, err = cli_in_process(capsys, "--data", z2g, "--arch", "resnet50", "--weights", path, "--epochs", "1", "--bs", "8",
                                  "--out", tmp_path)
    assert code == 2
    assert err.strip() == (f"error: --weights {path}: not resnet50's ImageNet weights ('layer1.0.conv1.weight' is "
                           "(64, 64, 3, 3) in the file, (64, 64, 1, 1) in resnet50)")


def test_the_notebook_api_takes_an_imagenet_file_and_starts_frozen(resnet18_file, tiny_sets):
    from hpa_fastai import hpa_dls, hpa_learner

    path, state = resnet18_file
    hpa, _ = tiny_sets
    dls = hpa_dls(hpa, size=32, bs=8)
    learn = hpa_learner(dls, "resnet18", weights=path)
    torch.testing.assert_close(learn.model[0][0].weight[:, :3], state["conv1.weight"])
    assert not learn.model[0][0].weight.requires_grad and learn.model[1][-1].weight.requires_grad  # frozen body
    assert learn.model[1][-1].weight.shape[0] == 28


@pytest.mark.slow
def test_inception_v3_takes_torchvisions_file_with_its_auxiliary_classifier(tmp_path):
    # timm's inception_v3.tv_in1k is torchvision's file, auxiliary classifier included
    torch.manual_seed(5)
    state = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict()
    torch.save(state, tmp_path / "inception_v3_google-1a9a5a14.pth")
    model, start = transfer.start_model("inception_v3", 4, HPA, weights=tmp_path / "inception_v3_google-1a9a5a14.pth")
    assert start.kind == "imagenet"
    torch.testing.assert_close(model[0].model.Conv2d_1a_3x3.conv.weight[:, :3], state["Conv2d_1a_3x3.conv.weight"])
    torch.testing.assert_close(model[0].model.Mixed_7c.branch_pool.conv.weight, state["Mixed_7c.branch_pool.conv.weight"])


@pytest.mark.slow
def test_a_run_from_an_imagenet_file_records_it_and_starts_frozen(resnet18_file, tiny_sets, tmp_path):
    path, state = resnet18_file
    hpa, _ = tiny_sets
    run_dir = train(TrainConfig(data=str(hpa), arch="resnet18", weights=str(path), epochs=1, bs=8, lr="1e-3", seed=0,
                                size=32, out=str(tmp_path)))
    config = read_json(run_dir / "config.json")
    assert config["pretrained_used"] is True and config["start_weights"] == f"ImageNet weights, {path}"
    import pandas as pd

    assert list(pd.read_csv(run_dir / "history.csv")["phase"]) == ["frozen", "unfrozen"]
    assert f"from ImageNet weights, {path}" in (run_dir / "report.html").read_text()


def test_a_pretrained_start_follows_fastais_fine_tune():
    import inspect

    from fastai.learner import Learner

    from hpa_fastai.training import schedule as S

    defaults = inspect.signature(Learner.fine_tune).parameters
    assert (S.LR_MULT, S.UNFROZEN_PCT_START, S.UNFROZEN_DIV) == tuple(
        defaults[k].default for k in ("lr_mult", "pct_start", "div"))
    source = inspect.getsource(Learner.fine_tune)
    assert f"pct_start={S.FROZEN_PCT_START}" in source and "base_lr /= 2" in source and S.UNFROZEN_LR_FACTOR == 0.5
    frozen, unfrozen = S.phases(TrainConfig(epochs=5, freeze_epochs=2), 1e-3, pretrained=True)
    assert (frozen.name, frozen.epochs, frozen.lr, frozen.pct_start) == ("frozen", 2, slice(None, 1e-3), 0.99)
    assert (unfrozen.name, unfrozen.epochs, unfrozen.pct_start, unfrozen.div) == ("unfrozen", 5, 0.3, 5.0)
    assert (unfrozen.lr.start, unfrozen.lr.stop) == (pytest.approx(5e-6), pytest.approx(5e-4))
    assert [p.name for p in S.phases(TrainConfig(freeze_epochs=0), 1e-3, pretrained=True)] == ["unfrozen"]
    (scratch,) = S.phases(TrainConfig(epochs=5), 1e-3, pretrained=False)
    assert (scratch.name, scratch.lr, scratch.pct_start, scratch.div) == ("train", 1e-3, 0.25, 25.0)
