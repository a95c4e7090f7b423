"""The model registry: every architecture for 3 and 4 stains, RGBY init, offline fallback, --weights."""
from __future__ import annotations

import logging
import urllib.error

import pytest
import torch
from torch import nn

from hpa_fastai import models
from hpa_fastai.errors import HPAError

ARCHS = sorted(models.ARCHS) + ["timm:resnet10t"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("n_in", [3, 4])
def test_every_architecture_builds_for_3_and_4_stains(arch, n_in):
    model, used = models.create_model(arch, n_in, 28, pretrained=False)
    assert not used
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(2, n_in, 64, 64))
    assert out.shape == (2, 28)
    groups = models.splitter(model)
    assert len(groups) == 2 and all(len(g) for g in groups)  # body and head for discriminative rates


def test_rgby_first_conv_keeps_rgb_filters_and_starts_yellow_from_red_and_blue():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    rgb = model[0].weight.detach().clone()
    models.expand_first_conv(model, 4)
    w = model[0].weight.detach()
    assert w.shape == (8, 4, 3, 3)
    torch.testing.assert_close(w[:, :3], rgb)
    torch.testing.assert_close(w[:, 3], (rgb[:, 0] + rgb[:, 2]) / 2)


def test_missing_imagenet_weights_fall_back_to_random_init_with_one_warning(monkeypatch, caplog):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no internet")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setattr(models, "_warned", set())
    model, used = models.create_model("resnet18", 4, 10, pretrained=True)
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert not used and len(messages) == 1 and "random initialisation" in messages[0]
    models.create_model("resnet18", 4, 10, pretrained=True)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1  # warned once per architecture
    assert model[0][0].in_channels == 4


def test_local_weights_are_loaded(tmp_path):
    source, _ = models.create_model("cnn", 4, 10, pretrained=False)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    loaded, _ = models.create_model("cnn", 4, 10, pretrained=True, weights=tmp_path / "w.pth")
    for a, b in zip(source.state_dict().values(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b)
    with pytest.raises(HPAError, match="cannot load"):
        models.create_model("cnn", 3, 10, pretrained=False, weights=tmp_path / "w.pth")


@pytest.mark.parametrize("name", ["resnet1000", "timm:not_a_model", "vgg"])
def test_unknown_architectures_are_rejected(name):
    with pytest.raises(ValueError, match="unknown"):
        models.check_arch(name)


def test_the_loss_registry_is_what_the_loss_flag_offers():
    from hpa_fastai import config, losses

    assert tuple(losses.LOSSES) == config.LOSSES
    for name in config.LOSSES:
        loss = losses.create_loss(name)
        assert float(loss(torch.zeros(2, 3), torch.ones(2, 3))) > 0


def test_an_unknown_loss_is_an_error_not_bce():
    from hpa_fastai import losses

    with pytest.raises(HPAError, match="unknown loss"):
        losses.create_loss("hinge")


@pytest.mark.parametrize("arch", ARCHS + ["timm:convnext_atto"])
def test_min_size_is_the_smallest_side_a_real_forward_pass_takes(arch):
    # measured on the meta device; checked here against a real model on the CPU, in training mode as
    # the first batch runs it
    low = models.min_size(arch)
    assert low is not None and low >= 8
    model, _ = models.create_model(arch, 4, 28, pretrained=False)
    model.train()
    with torch.no_grad():
        assert model(torch.rand(2, 4, low, low)).shape == (2, 28)
        if low > 8:  # below the project's own minimum every model is refused anyway
            with pytest.raises(RuntimeError):
                model(torch.rand(2, 4, low - 1, low - 1))
    assert models.size_problem(arch, low) is None
    assert (models.size_problem(arch, low - 1) is not None) == (low > 8)  # below 8 the config refuses every size


def test_the_plain_cnn_takes_16_pixels_and_a_vit_only_its_own_size():
    assert models.min_size("cnn") == 16
    assert models.size_problem("cnn", 15) == "is below the 16 pixels cnn takes"
    assert models.min_size("timm:vit_tiny_patch16_224") is None  # a fixed input size: no range of sides
    assert models.size_problem("timm:vit_tiny_patch16_224", 224) is None
    assert "cannot take" in models.size_problem("timm:vit_tiny_patch16_224", 256)
