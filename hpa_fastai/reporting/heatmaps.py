"""Heatmaps beside the report's worst mistakes: for each image of the grid, the Grad-CAM map of the
class it got most wrong, from the run's safe export (never its pickle). A run folder without that
export (a run that has not finished, or whose model was removed) gets a note instead."""
from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image

from .. import plots
from ..errors import HPAError
from ..runs.folder import MODEL_JSON, SAFE_EXPORT
from .samples import THUMBNAIL


def most_wrong_class(true, predicted, probs) -> tuple[int, str]:
    """The class an image got most wrong and how: a missed class with the lowest probability or a
    wrong one with the highest, whichever is further off; without a mistake, the most probable
    predicted class ("correct"), or the most probable class."""
    true, predicted = set(true), set(predicted)
    off = [(1 - probs[c], c, "missed") for c in true - predicted] + [(probs[c], c, "wrong") for c in predicted - true]
    if off:
        _, c, how = max(off)
        return int(c), how
    if predicted:
        return int(max(predicted, key=lambda c: probs[c])), "correct"
    return int(np.argmax(probs)), "most probable"


def mistake_heatmaps(run_dir, samples: list[dict], size: int = THUMBNAIL) -> tuple[list[dict | None], str | None]:
    """One heatmap thumbnail per sample of ``valid_samples`` (each with its class, how it was wrong,
    and its probability), or Nones and a note saying why there are none."""
    if not samples:
        return [], None
    missing = [f for f in SAFE_EXPORT if not (run_dir / f).is_file()]
    if missing:
        return [None] * len(samples), (f"no {' or '.join(missing)} in the run folder (the run has not finished, or "
                                       "the model was removed), so no heatmaps")
    from ..inference.cam import heatmaps
    from ..inference.loading import load_predictor

    picks = [most_wrong_class(s["true"], s["predicted"], s["probs"]) for s in samples]
    items = pd.DataFrame({"id": [s["id"] for s in samples], "key": [s["key"] for s in samples]})
    try:
        pred = load_predictor(run_dir / MODEL_JSON, cpu=True)
        if len(pred.names) != len(samples[0]["probs"]):
            raise HPAError(f"{run_dir / MODEL_JSON} has {len(pred.names)} classes, the validation predictions "
                           f"{len(samples[0]['probs'])}")
        images, maps = heatmaps(pred, items, [[c] for c, _ in picks])
    except HPAError as e:
        return [None] * len(samples), f"no heatmaps: {e}"
    out = []
    for s, (c, how), image, m in zip(samples, picks, images, maps):
        overlay = Image.fromarray(plots.heatmap_overlay(image, m[0])).resize((size, size), Image.BILINEAR)
        out.append({"image": np.asarray(overlay), "class": c, "how": how, "prob": float(s["probs"][c])})
    return out, None
