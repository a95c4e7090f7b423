"""The model registry: every architecture for 3 and 4 stains, RGBY init, offline fallback (--weights: test_transfer)."""
from __future__ import annotations

import logging
import urllib.error

import pytest
import torch
from torch import nn

from hpa_fastai import models
from hpa_fastai.errors import HPAError

# the 2018 winners' deepest backbones take several seconds each to build on a CPU
HEAVY = {"resnet101", "resnet152", "inception_v3", "seresnext50"}
ARCHS = [pytest.param(a, marks=pytest.mark.slow) if a in HEAVY else a for a in sorted(models.ARCHS)] + ["timm:resnet10t"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("n_in", [3, 4])
def test_every_architecture_builds_for_3_and_4_stains(arch, n_in):
    model, used = models.create_model(arch, n_in, 28, pretrained=False)
    assert not used
    model.eval()
    side = max(64, models.min_size(arch))  # Inception-v3 takes 75 px and more
    with torch.no_grad():
        out = model(torch.rand(2, n_in, side, side))
    assert out.shape == (2, 28)
    groups = models.splitter(model)
    assert len(groups) == 2 and all(len(g) for g in groups)  # body and head for discriminative rates
    assert models.first_conv_name(model) in model.state_dict()


def test_the_2018_winners_backbones_are_registered_by_short_name():
    for arch, library, source in [("densenet121", "torchvision", "densenet121"), ("resnet101", "torchvision", "resnet101"),
                                  ("resnet152", "torchvision", "resnet152"), ("seresnext50", "timm", "seresnext50_32x4d"),
                                  ("inception_v3", "timm", "inception_v3")]:
        assert models.check_arch(arch) == arch and models.has_pretrained(arch)
        kind, fn = models.builder(arch).imagenet
        assert kind == library and (fn if isinstance(fn, str) else fn.__name__) == source


@pytest.mark.parametrize("arch", ["densenet121", pytest.param("seresnext50", marks=pytest.mark.slow),
                                  pytest.param("inception_v3", marks=pytest.mark.slow), "timm:resnet10t"])
def test_cached_imagenet_weights_of_the_new_backbones_get_the_rgby_first_conv(arch, monkeypatch):
    build = models.builder(arch)
    torch.manual_seed(0)
    cached = build(3, 28, pretrained=False)  # stands in for the weights torch hub or timm would load
    rgb = cached.state_dict()[models.first_conv_name(cached)].clone()
    monkeypatch.setattr(models, "builder", lambda a: lambda n_in, n_out, pretrained=False:
                        cached if pretrained else build(n_in, n_out))
    model, used = models.create_model(arch, 4, 28, pretrained=True)
    w = model.state_dict()[models.first_conv_name(model)]
    assert used and w.shape[1] == 4
    torch.testing.assert_close(w[:, :3], rgb)
    torch.testing.assert_close(w[:, 3], (rgb[:, 0] + rgb[:, 2]) / 2)


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

def test_a_timm_model_without_a_reachable_hub_asks_only_the_local_cache(monkeypatch, caplog):
    """Offline, huggingface_hub would retry every request for about a minute before it looks in its
    cache: with the Hub unreachable the build goes to the cache at once, and the mode is restored."""
    from huggingface_hub import constants

    def unreachable(*args, **kwargs):
        raise OSError("no route to host")

    import timm  # noqa: F401  (its package first: timm.models imports from it)
    from timm.models import _hub as hub

    seen, real_download = [], hub.hf_hub_download

    def download(*args, **kwargs):
        seen.append(constants.HF_HUB_OFFLINE)
        return real_download(*args, **kwargs)

    monkeypatch.setattr(models.socket, "create_connection", unreachable)
    monkeypatch.setattr(hub, "hf_hub_download", download)
    monkeypatch.setattr(models, "_warned", set())
    model, used = models.create_model("timm:resnet10t", 4, 10, pretrained=True)
    assert not used and seen and all(seen)  # every request in offline mode
    assert not constants.HF_HUB_OFFLINE  # restored for the rest of the process
    assert any("random initialisation" in r.getMessage() for r in caplog.records)



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


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_bce_gives_fastais_values_and_gradients_on_fastai_or_plain_tensors(reduction):
    from fastai.losses import BCEWithLogitsLossFlat
    from fastai.torch_core import TensorBase, TensorMultiCategory

    from hpa_fastai.losses import BCEWithLogits

    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(5, 4, generator=g), (torch.rand(5, 4, generator=g) > 0.5).long()
    want_in = TensorBase(logits.clone()).requires_grad_()
    want = BCEWithLogitsLossFlat(reduction=reduction)(want_in, TensorMultiCategory(targets))
    want.sum().backward()
    plain = torch.Tensor.as_subclass
    for inp, targ in ((TensorBase(logits.clone()), TensorMultiCategory(targets)), (logits.clone(), targets.float())):
        inp.requires_grad_()
        got = BCEWithLogits(reduction=reduction)(inp, targ)
        assert got.shape == want.shape
        torch.testing.assert_close(plain(got.detach(), torch.Tensor), plain(want.detach(), torch.Tensor))
        got.sum().backward()
        torch.testing.assert_close(plain(inp.grad, torch.Tensor), plain(want_in.grad, torch.Tensor))


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
