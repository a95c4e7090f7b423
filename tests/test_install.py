"""Installed as a user installs it, outside this checkout: the wheel carries the bundled sample and
the ``hpa-fastai`` command, runs its default job from a fresh venv, and ``make wheels`` gives a
folder that installs with ``pip install --no-index`` (a Kaggle notebook without internet).

The fresh venvs reuse the packages of the environment running the tests, as a notebook image
reuses its preinstalled torch: a folder of links to them is put on the venv's path with a ``.pth``
file. That folder never holds this project, so what the venv imports as ``hpa_fastai`` is what was
installed into it (each test checks where it came from).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from importlib import metadata
from pathlib import Path

import pandas as pd
import pytest
from packaging.requirements import Requirement

from .helpers import REPO

SITE = Path(sysconfig.get_paths()["purelib"])
TINY = ["--arch", "cnn", "--no-pretrained", "--epochs", "1", "--size", "32", "--bs", "16", "--lr", "1e-3"]


def build_wheel(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(REPO)], check=True, capture_output=True, text=True, timeout=300)
    return next(out.glob("hpa_fastai-*.whl"))


def linked_site(folder: Path, names=None) -> Path:
    """A folder of links to this environment's installed packages: those of the distributions
    ``names`` (with everything they require), or every one but this project."""
    folder.mkdir(parents=True)
    if names is None:
        entries = {p.name for p in SITE.iterdir() if not p.name.lower().startswith(("hpa_fastai", "__editable__"))
                   and not p.name.endswith(".pth")}
    else:
        entries, todo, seen = set(), [(name, ()) for name in names], set()
        while todo:
            name, extras = todo.pop()
            try:
                dist = metadata.distribution(name)
            except metadata.PackageNotFoundError:
                continue
            key = (dist.metadata["Name"].lower().replace("_", "-"), tuple(sorted(extras)))
            if key in seen:
                continue
            seen.add(key)
            entries |= {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
            for text in dist.requires or []:
                req = Requirement(text)  # torch asks for cuda-toolkit[cublas,...]: the extras' requirements too
                if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ("", *extras)):
                    todo.append((req.name, tuple(req.extras)))
    for name in entries:
        if (SITE / name).exists():
            (folder / name).symlink_to(SITE / name)
    return folder


def fresh_venv(folder: Path, site: Path) -> Path:
    """A new venv whose own site-packages comes first, then the linked packages; returns its bin folder."""
    venv.create(folder, with_pip=True, symlinks=True)
    purelib = Path(subprocess.run([str(folder / "bin" / "python"), "-c",
                                   "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  check=True, capture_output=True, text=True).stdout.strip())
    (purelib / "reused-packages.pth").write_text(f"{site}\n")
    # the setuptools a venv of Python 3.11 starts with is older than torch asks for, and would come first
    subprocess.run([str(folder / "bin" / "python"), "-m", "pip", "uninstall", "-q", "-y", "setuptools"],
                   check=True, capture_output=True)
    return folder / "bin"


def clean_env(tmp_path: Path) -> dict:
    """The environment of a user's shell: no PYTHONPATH into this checkout, caches in the test's folder."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HPA_FASTAI_CACHE")}
    env["XDG_CACHE_HOME"] = str(tmp_path / "user-cache")
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def run(args, cwd, env, timeout=600) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (f"{args[:3]} exited {result.returncode}:\n{result.stdout[-3000:]}\n"
                                    f"{result.stderr[-3000:]}")
    return result


def trains_and_predicts(bin_dir: Path, work: Path, env: dict) -> None:
    """The default job of an installed copy: train on the bundled sample, then predict its test images."""
    venv_root = bin_dir.parent.resolve()
    where = run([bin_dir / "python", "-c", "import hpa_fastai, fastai; print(hpa_fastai.__file__)"], work, env)
    assert Path(where.stdout.strip()).resolve().is_relative_to(venv_root), where.stdout  # not this checkout
    usage = run([bin_dir / "hpa-fastai", "--help"], work, env).stdout
    assert usage.startswith("usage: hpa-fastai ") and "hpa-fastai COMMAND --help" in usage
    assert run([bin_dir / "python", "-m", "hpa_fastai", "predict", "--help"], work, env).stdout.startswith(
        "usage: python -m hpa_fastai predict ")
    trained = run([bin_dir / "hpa-fastai", *TINY, "--out", "runs"], work, env)
    assert "artifacts in" in trained.stdout, trained.stdout[-2000:]
    run([bin_dir / "hpa-fastai", "predict", "--learner", "runs/latest", "--out", "submission.csv"], work, env)
    submission = pd.read_csv(work / "submission.csv")
    assert list(submission.columns) == ["Image", "Label"] and len(submission) == 24  # the sample's test images
    sample = Path(where.stdout.strip()).parent / "sample"
    assert sorted(p.name for p in sample.iterdir()) == ["submission.csv", "test", "train", "train.csv"]  # untouched


def test_the_wheel_carries_the_sample_the_templates_and_the_command(tmp_path):
    wheel = build_wheel(tmp_path / "dist")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = next(zf.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
        requires = [line for n in names if n.endswith(".dist-info/METADATA")
                    for line in zf.read(n).decode().splitlines() if line.startswith("Requires-Dist: torch")]
    sample = REPO / "hpa_fastai" / "sample"
    for path in sample.rglob("*"):
        if path.is_file():
            assert f"hpa_fastai/sample/{path.relative_to(sample).as_posix()}" in names, path
    assert "hpa_fastai/__main__.py" in names and "hpa_fastai/reporting/templates/run.html" in names
    assert re.search(r"^hpa-fastai = hpa_fastai\.cli:entry$", entry_points, re.M)
    # ranges, not pins: a notebook's preinstalled torch is kept when it is in range
    assert requires and all(">=" in line and "==" not in line for line in requires), requires


@pytest.mark.slow
def test_a_wheel_installed_outside_the_checkout_trains_and_predicts(tmp_path):
    wheel = build_wheel(tmp_path / "dist")
    bin_dir = fresh_venv(tmp_path / "venv", linked_site(tmp_path / "reused"))
    env = clean_env(tmp_path)
    # --no-index: every dependency must already be there, in the range the wheel declares
    run([bin_dir / "python", "-m", "pip", "install", "-q", "--no-index", wheel], tmp_path, env)
    work = tmp_path / "work"
    work.mkdir()
    trains_and_predicts(bin_dir, work, env)


@pytest.mark.slow
def test_make_wheels_gives_a_folder_that_installs_with_no_index(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    wheels = tmp_path / "wheels"
    # TORCH=0: the folder for an image that has torch (as Kaggle's has); the whole set adds torch,
    # torchvision and the CUDA libraries (4 GB), which the fresh venv reuses from this environment
    run(["make", "-s", "-C", REPO, "wheels", f"WHEELS={wheels}", "TORCH=0", "SETUP=",
         f"BIN={Path(sys.executable).parent}"], REPO, {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    found = {p.name.split("-")[0].lower() for p in wheels.glob("*.whl")}
    assert {"hpa_fastai", "fastai", "timm", "pandas", "scikit_learn", "pillow"} <= found
    assert not found & {"torch", "torchvision", "triton"}
    bin_dir = fresh_venv(tmp_path / "venv", linked_site(tmp_path / "torch-only", ["torch", "torchvision"]))
    env = clean_env(tmp_path)
    run([bin_dir / "python", "-m", "pip", "install", "-q", "--no-index", "--find-links", wheels, "hpa_fastai"],
        tmp_path, env)
    fastai_file = run([bin_dir / "python", "-c", "import fastai; print(fastai.__file__)"], tmp_path, env).stdout
    assert Path(fastai_file.strip()).resolve().is_relative_to((tmp_path / "venv").resolve())  # from the folder
    work = tmp_path / "work"
    work.mkdir()
    trains_and_predicts(bin_dir, work, env)


@pytest.mark.slow
def test_newest_smoke_trains_and_predicts_on_the_sample(tmp_path):
    """What ``make newest`` runs in a venv of the newest releases the ranges allow: the default job,
    through the command line of the checkout."""
    env = {**clean_env(tmp_path), "PYTHONPATH": str(REPO)}
    run([sys.executable, REPO / "run.py", *TINY, "--out", tmp_path / "runs"], tmp_path, env)
    run([sys.executable, REPO / "run.py", "predict", "--learner", tmp_path / "runs" / "latest", "--out",
         tmp_path / "submission.csv"], tmp_path, env)
    assert len(pd.read_csv(tmp_path / "submission.csv")) == 24
