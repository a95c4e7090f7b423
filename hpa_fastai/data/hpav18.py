"""The HPAv18 external data (the 2018 winners' extra images) as data: its label CSV
(``HPAv18RBGY_wodpl.csv``: ``Id,Target``), read and checked row by row; the ids chosen by class;
where the Atlas's image server keeps each stain; and the ``train.csv`` of a folder of its stain
files, the layout ``--extra-data`` reads. Fetching the files is ``tools.hpav18_download``.

For each id the four stain files are ``{base}/{antibody}/{rest}_{stain}.jpg``: id
``10580_1610_C1_1`` is ``10580/1610_C1_1_red.jpg`` and so on, colour JPEGs (see
``images.STAIN_COLOURS``), stored as ``train/{Id}_{stain}.{png|jpg}``.
"""
from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote

import pandas as pd

from ..atomic import write_csv
from ..errors import HPAError
from .layouts import CHANNELS, check_id, iter_csv, parse_labels
from .vocab import vocab_for

TRAIN_CSV = "train.csv"
IMAGE_FOLDER = "train"
# A file name has at most 255 bytes on the common file systems (ext4, XFS, APFS, NTFS); the
# longest name an id gets is a temporary one while its stain is written, ".{Id}_yellow.png.XXXXXXXX.part"
# (tempfile's 8 random characters), so an id may have the rest.
MAX_NAME_BYTES = 255
MAX_ID_BYTES = MAX_NAME_BYTES - len("._yellow.png.XXXXXXXX.part")


def stain_url(base_url: str, image_id: str, stain: str) -> str:
    """The Atlas URL of one stain of an HPAv18 id, as the 2018 download scripts built it."""
    antibody, _, rest = image_id.partition("_")
    return f"{base_url.rstrip('/')}/{quote(antibody)}/{quote(rest)}_{stain}.jpg"


def stain_file(image_id: str, stain: str, fmt: str) -> str:
    """The name of one stain file of an id in the folder's ``train/``."""
    return f"{image_id}_{stain}.{fmt}"


def read_hpav18_labels(path) -> pd.DataFrame:
    """The label CSV's rows (``Id``, ``Target`` with the labels sorted), each checked as it is read;
    a bad row is an HPAError naming the file and line."""
    path = Path(path)
    records = iter_csv(path)
    columns = next(records)
    if not {"Id", "Target"} <= set(columns):
        raise HPAError(f"{path}: expected columns Id,Target (the HPAv18 label CSV), found {','.join(columns)}")
    id_at, target_at = columns.index("Id"), columns.index("Target")
    n_classes = len(vocab_for("hpa2018"))
    rows, seen = [], {}
    for line, fields, problem in records:
        where = f"{path}, line {line}"
        if problem:
            raise HPAError(problem)
        image_id = check_id(fields[id_at], where)
        antibody, _, rest = image_id.partition("_")
        if not antibody or not rest:
            raise HPAError(f"{where}: id {image_id!r} is not an HPAv18 id (like 10580_1610_C1_1: "
                           "the antibody number, an underscore, the image's name)")
        n_bytes = len(os.fsencode(image_id))
        if n_bytes > MAX_ID_BYTES:
            # caught here, not when its file is written: the download would stop at this id on every run
            raise HPAError(f"{where}: id {image_id[:40]!r}... is {n_bytes} bytes long: its stain files would get "
                           f"names longer than the {MAX_NAME_BYTES} bytes a file system allows (an id may have "
                           f"at most {MAX_ID_BYTES})")
        if image_id in seen:
            raise HPAError(f"{where}: duplicated id {image_id!r} (first at line {seen[image_id]})")
        seen[image_id] = line
        labels = parse_labels(fields[target_at], n_classes, where)
        rows.append((image_id, " ".join(map(str, labels))))
    if not rows:
        raise HPAError(f"{path}: no rows")
    return pd.DataFrame(rows, columns=["Id", "Target"])


def select(labels: pd.DataFrame, classes=None, ids: int | None = None) -> pd.DataFrame:
    """The rows carrying at least one of ``classes`` (all rows without), then the first ``ids``."""
    if classes:
        wanted = {str(c) for c in classes}
        labels = labels[[bool(wanted & set(t.split())) for t in labels["Target"]]]
    return labels if ids is None else labels.iloc[:ids]


def class_list(classes) -> list[int] | None:
    """``--classes`` as class ids: a list (from the command line) or one string of ids."""
    if classes is None:
        return None
    tokens = classes.replace(",", " ").split() if isinstance(classes, str) else [str(c) for c in classes]
    return sorted({int(t) for t in tokens})


def write_train_csv(out: Path, fmt: str, labels: pd.DataFrame) -> int:
    """``out/train.csv``: every id of the label CSV whose four stains are in ``out/train`` (from any
    run), as ``--extra-data`` reads it; returns their number."""
    present = set(os.listdir(out / IMAGE_FOLDER))
    complete = [all(stain_file(image_id, stain, fmt) in present for stain in CHANNELS) for image_id in labels["Id"]]
    write_csv(out / TRAIN_CSV, labels[complete])
    return sum(complete)
