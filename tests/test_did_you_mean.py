"""Help for typos: a mistyped command, flag or architecture gets the closest one named ("did you
mean"), an unknown command is refused even with --help, a bare timm model name is taken as timm's,
and ``--help`` leads with the commands."""
from __future__ import annotations

import pytest

from hpa_fastai.config import TrainConfig
from hpa_fastai.errors import HPAError
from hpa_fastai.training.run import validate

from .helpers import cli_in_process


def test_a_mistyped_command_is_refused_with_the_closest_one(capsys):
    code, out, err = cli_in_process(capsys, "prdict", "--data", "x")
    assert code == 2 and out == ""
    assert err.startswith("error: unknown command 'prdict'; did you mean predict?")
    assert "unrecognized arguments" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("word", ["tuen", "prdict"])
def test_an_unknown_command_with_help_is_refused_not_answered_with_training_s_help(word, capsys):
    code, out, err = cli_in_process(capsys, word, "--help")
    assert code == 2
    assert out == "" and "unknown command" in err


def test_help_leads_with_the_commands(capsys):
    code, out, _ = cli_in_process(capsys, "--help")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "usage: hpa-fastai [COMMAND] [FLAGS]"  # the installed command's name in-process
    commands = next(i for i, line in enumerate(lines) if line.startswith("commands"))
    assert commands < 3
    assert [line.split()[0] for line in lines[commands + 1:commands + 4]] == ["train", "lr-find", "predict"]
    assert out.index("download-hpav18") < out.index("--data")  # every command before the first flag


def test_a_mistyped_flag_names_the_closest_flag(capsys):
    code, _, err = cli_in_process(capsys, "--ephocs", "3")
    assert code == 2 and "did you mean --epochs?" in err


@pytest.mark.parametrize("arch, suggestion", [
    ("resnt34", "did you mean resnet34"),
    ("convnext_tny", "did you mean timm:convnext_tiny"),
    ("timm:convnext_tny", "did you mean timm:convnext_tiny"),
])
def test_an_unknown_architecture_names_the_closest_one(arch, suggestion, capsys):
    code, _, err = cli_in_process(capsys, "--arch", arch, "--epochs", "1")
    assert code == 2
    assert f"--arch: unknown architecture '{arch}'" in err and suggestion in err


@pytest.mark.parametrize("arch, registered", [
    ("convnext_tiny", "timm:convnext_tiny"),
    ("efficientnet_b0", "timm:efficientnet_b0"),  # not in the registry: timm's
    ("resnet34", "resnet34"),  # the registry's own name wins over timm's model of the same name
    ("timm:resnet34", "timm:resnet34"),
])
def test_a_bare_timm_name_is_timm_s_model(arch, registered):
    assert validate(TrainConfig(arch=arch)).arch == registered


def test_a_model_json_must_name_the_architecture_as_the_registry_does(tmp_path):
    from hpa_fastai.modelfile import check_meta

    meta = {"arch": "convnext_tiny", "format": "z2g", "channels": "rgb", "size": 32, "mean": [0.5] * 3,
            "std": [0.2] * 3, "vocab": [str(c) for c in range(10)], "names": ["x"] * 10, "thresholds": [0.5] * 10}
    with pytest.raises(HPAError, match="'arch' must be a known architecture"):
        check_meta(meta, tmp_path / "model.json")
    check_meta({**meta, "arch": "timm:convnext_tiny"}, tmp_path / "model.json")
