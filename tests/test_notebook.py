"""examples/quickstart.ipynb runs top to bottom in a Jupyter kernel (on tiny settings, so that CI
runs it in well under a minute) and leaves what its text promises: plots, a thresholds table, the
exported model, a heatmap and a submission."""
from __future__ import annotations

import ast

import nbformat
import pandas as pd
import pytest

from .helpers import REPO

NOTEBOOK = REPO / "examples" / "quickstart.ipynb"
TINY = {"ARCH": '"cnn"', "PRETRAINED": "False", "SIZE": "32", "BS": "16", "EPOCHS": "1", "LR_FIND_ITERS": "10",
        "TUNE_TRIALS": "2"}


def with_parameters(nb, values: dict):
    """The notebook with the assignments of its "parameters" cell replaced (papermill's convention)."""
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    lines = []
    for line in cell.source.splitlines():
        name = line.split("=")[0].strip()
        lines.append(f"{name} = {values[name]}" if name in values else line)
    cell.source = "\n".join(lines)
    return nb


@pytest.mark.slow
def test_quickstart_notebook_runs_and_writes_its_outputs(tmp_path, monkeypatch):
    pytest.importorskip("ipykernel")
    from nbclient import NotebookClient

    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the kernel imports this checkout, installed or not
    nb = with_parameters(nbformat.read(NOTEBOOK, as_version=4), TINY)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    # the Kaggle and Colab cell ran, and off those platforms installed nothing and moved nothing
    assert any("local - outputs in quickstart_output" in o.get("text", "") for o in outputs)
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "best macro F1" in printed  # the tuning section's study ran its trials
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(figures) >= 5  # show_batch, lr_find, show_results, top losses, heatmap
    out = tmp_path / "quickstart_output"
    assert (out / "export.pkl").is_file() and (out / "model.json").is_file() and (out / "model.safetensors").is_file()
    assert list((out / "heatmaps").glob("*_cam*.png"))
    sub = pd.read_csv(out / "submission.csv")
    assert list(sub.columns) == ["Image", "Label"] and len(sub) == 24  # the bundled sample's test images
    assert not (REPO / "hpa_fastai" / "sample" / "models").exists()  # lr_find wrote nothing into the data folder
    # learn.predict after tune_thresholds gives the labels the safe export's predictor gives
    cell = next(c for c in nb.cells if c.cell_type == "code" and "learn.predict(" in c.source)
    text = next(o for o in cell.outputs if o.output_type == "execute_result")["data"]["text/plain"]
    fastai_labels, predictor_labels = ast.literal_eval(text)
    assert sorted(int(c) for c in fastai_labels) == predictor_labels
