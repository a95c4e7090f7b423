"""The validation images a run got most wrong, read for the report's image grid and TensorBoard.

The images are the training images named in the run's ``valid_predictions.csv``. A run folder can
come from someone else, so only regular files inside the data folders that the run's config.json
records are read: no FIFO, device or private image elsewhere on the machine.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np

from .. import plots
from ..errors import HPAError
from ..runs.files import read_json, read_valid_predictions
from ..runs.folder import CONFIG, VALID_PREDICTIONS

N_SAMPLES = 16
THUMBNAIL = 128


def valid_samples(run_dir, n: int = N_SAMPLES, size: int = THUMBNAIL) -> list[dict]:
    """The ``n`` validation images the model got most wrong, worst first: each a dict with id, item
    key (its files checked as ``check_image_files`` does), an RGB thumbnail (false colour for RGBY), the true and predicted class indices and the probabilities.

    "Most wrong" counts the labels the prediction gets wrong (missed or extra), then, among equal
    counts, how far the probabilities are from the truth; with fewer mistakes than ``n`` the grid
    fills up with the least certain correct ones."""
    from ..data.images import read_image
    from ..data.layouts import CHANNEL_SETS, labels_matrix
    from ..metrics import worst_first

    run_dir = Path(run_dir)
    preds_df = read_valid_predictions(run_dir)
    if preds_df.empty:
        return []
    config = read_json(run_dir / CONFIG)
    channels = config.get("channels", "rgb")
    channels = CHANNEL_SETS.get(channels) if isinstance(channels, str) else None
    if channels is None:
        raise HPAError(f"{run_dir / CONFIG}: 'channels' is not rgb or rgby, so no image is read")
    roots = image_folders(run_dir, config)
    try:
        probs = np.array([[float(p) for p in row.split()] for row in preds_df["probs"]], dtype=float)
        n_classes = probs.shape[1]
        targets = labels_matrix(preds_df["labels"], n_classes).astype(bool)
        preds = labels_matrix(preds_df["predicted"], n_classes).astype(bool)
        keys, ids = preds_df["key"], preds_df["id"]
    except (KeyError, ValueError, IndexError, AttributeError) as e:
        raise HPAError(f"{run_dir / VALID_PREDICTIONS}: not the validation predictions of a run "
                       f"({type(e).__name__}: {str(e)[:100]})") from None
    order = worst_first(probs, preds, targets)[:n]
    for i in order:  # every file checked before any is read
        check_image_files(keys.iloc[i], channels, roots)
    samples = []
    for i in order:
        rgb = plots.false_colour(read_image(keys.iloc[i], channels, size=size))
        samples.append({"id": ids.iloc[i], "key": keys.iloc[i], "image": rgb, "true": np.flatnonzero(targets[i]).tolist(),
                        "predicted": np.flatnonzero(preds[i]).tolist(), "probs": probs[i],
                        "mistakes": int((preds[i] != targets[i]).sum())})
    return samples


def image_folders(run_dir: Path, config: dict) -> list[Path]:
    """The folders the run read its images from, as its config.json records them: --data and any
    --extra-data. The image grid reads nothing outside them."""
    data, extra = config.get("data"), config.get("extra_data") or []
    folders = [data] + ([extra] if isinstance(extra, str) else extra if isinstance(extra, list) else [])
    if not isinstance(data, str) or not data:
        raise HPAError(f"{run_dir / CONFIG}: records no data folder, so no image is read")
    return [Path(f).resolve() for f in folders if isinstance(f, str) and f]


def check_image_files(key, channels, roots: list[Path]) -> None:
    """Refuse an item key of valid_predictions.csv unless each of its files is a regular file inside
    one of ``roots``. The checks stat the files and never open them: opening a FIFO would block
    forever, and a key may name any readable file (a private image, a device)."""
    from ..data.layouts import key_files

    for f in key_files(str(key), channels):
        real = Path(f).resolve()  # links followed: a link inside the data folder may point out of it
        try:
            mode = os.stat(real).st_mode
        except FileNotFoundError:
            raise HPAError(f"{f}: image file not found") from None
        except OSError as e:
            raise HPAError(f"{f}: cannot read ({e.strerror or e})") from None
        if not any(real == root or root in real.parents for root in roots):
            raise HPAError(f"{f}: outside the data folder {roots[0]} that config.json records; not shown")
        if not stat.S_ISREG(mode):
            raise HPAError(f"{f}: not a regular file; not shown")
