"""The competitions' data layouts: detect a folder's format, read and validate its label CSV.

Each image is an *item key*: the path of an RGB file (Zero-to-GANs), or a path template
with a ``{channel}`` field for one grayscale file per stain (HPA 2018, HPAv18).
"""
from __future__ import annotations

import contextlib
import csv
import itertools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import HPAError
from .vocab import vocab_for

logger = logging.getLogger(__name__)

CHANNELS = ("red", "green", "blue", "yellow")
CHANNEL_SETS = {"rgb": ("red", "green", "blue"), "rgby": CHANNELS}
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


@dataclass(frozen=True)
class Format:
    name: str
    id_col: str
    label_col: str
    submission_csv: str
    submission_label_col: str
    channel_files: bool  # four grayscale files per image rather than one RGB file

    @property
    def default_channels(self) -> str:
        return "rgby" if self.channel_files else "rgb"


FORMATS = {
    "z2g": Format("z2g", "Image", "Label", "submission.csv", "Label", channel_files=False),
    "hpa2018": Format("hpa2018", "Id", "Target", "sample_submission.csv", "Predicted", channel_files=True),
}


# A label CSV's fields are an id (a file name, at most 255 bytes) and a few class ids: a longer
# field is a damaged file, and reading it whole would only cost memory.
MAX_FIELD = 128 * 1024  # as Python sets it by default, but not left to whatever another library set


@contextlib.contextmanager
def _field_limit(limit: int):
    """csv's field size limit is global to the process: set ours while reading, then put it back."""
    previous = csv.field_size_limit(limit)
    try:
        yield
    finally:
        csv.field_size_limit(previous)


def _unique(header: list[str]) -> list[str]:
    """Column names as pandas makes them: a repeated name gets a .1, .2 suffix."""
    columns = []
    for name in header:
        unique, n = name, 0
        while unique in columns:
            n += 1
            unique = f"{name}.{n}"
        columns.append(unique)
    return columns


def iter_csv(path):
    """Stream a CSV as strings, tolerating a BOM, CRLF line ends, quoting, padding spaces and blank lines.

    Yields the column names first (repeated names get a .1, .2 suffix as pandas gives them), then
    ``(line, fields, problem)`` for each record, read only as the caller asks for it: ``fields`` has
    one string per column, ``problem`` is None or a message naming the file and line (more fields
    than the header, a field longer than ``MAX_FIELD``) for a record that ``--skip-bad`` may drop.
    Python's csv module rather than pandas: pandas silently makes the first column the index when
    the first data row has one field too many, its row numbers skip blank lines, and it reads the
    whole file before the first row can be checked.
    """
    path = Path(path)
    if not path.is_file():
        raise HPAError(f"{path}: file not found")
    with _field_limit(MAX_FIELD), open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, skipinitialspace=True)
        try:
            header = next(reader, None)
        except csv.Error as e:
            raise HPAError(f"{path}: not a readable CSV ({str(e).splitlines()[0]})") from None
        except UnicodeDecodeError as e:
            raise HPAError(f"{path}: not a readable CSV ({e})") from None
        if not header or not any(h.strip() for h in header):
            raise HPAError(f"{path}: the file is empty")
        header = [h.strip() for h in header]
        yield _unique(header)
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:  # the reader goes on with the next line
                reason = str(e).splitlines()[0]
                if "field larger than field limit" in reason:
                    reason = f"a field longer than {MAX_FIELD} characters"
                problem = f"{path}, line {reader.line_num}: not a readable CSV row ({reason})"
                yield reader.line_num, [""] * len(header), problem
                continue
            except UnicodeDecodeError as e:  # the decoder cannot resynchronise: nothing after this is readable
                raise HPAError(f"{path}: not a readable CSV after line {reader.line_num} ({e})") from None
            if not row:  # blank line
                continue
            row = [v.strip() for v in row]
            while len(row) > len(header) and not row[-1]:  # trailing commas
                row.pop()
            problem = None
            if len(row) > len(header):
                problem = (f"{path}, line {reader.line_num}: {len(row)} fields, but the header has "
                           f"{len(header)} ({','.join(header)})")
            yield reader.line_num, (row + [""] * len(header))[:len(header)], problem


def read_csv(path) -> pd.DataFrame:
    """A whole (small) CSV as strings, read by ``iter_csv``.

    ``df.attrs["lines"]`` holds each row's line number in the file, for error messages, and
    ``df.attrs["row_errors"]`` a message per row position that ``iter_csv`` found a problem with.
    """
    records = iter_csv(path)
    columns = next(records)
    rows, lines, row_errors = [], [], {}
    for line, fields, problem in records:
        if problem:
            row_errors[len(rows)] = problem
        rows.append(fields)
        lines.append(line)
    df = pd.DataFrame(rows, columns=columns, dtype=str)
    df.attrs["lines"] = lines
    df.attrs["row_errors"] = row_errors
    return df


def read_header(path) -> list[str]:
    """The column names of a CSV, reading nothing after its header."""
    records = iter_csv(path)
    try:
        return next(records)
    finally:
        records.close()


def detect_format(data_dir) -> Format:
    """The format of a competition folder, from its train.csv header."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise HPAError(f"{data_dir}: data folder not found")
    csv_path = data_dir / "train.csv"
    if not csv_path.is_file():
        raise HPAError(f"{csv_path}: file not found (a data folder needs train.csv and train/)")
    cols = set(read_header(csv_path))
    for fmt in FORMATS.values():
        if {fmt.id_col, fmt.label_col} <= cols:
            return fmt
    raise HPAError(f"{csv_path}: expected columns Image,Label (Zero-to-GANs) or Id,Target "
                   f"(HPA 2018), found {','.join(sorted(cols)) or 'none'}")


def check_id(image_id: str, where: str) -> str:
    """Refuse ids that are empty or could name a file outside the data folder."""
    if not image_id:
        raise HPAError(f"{where}: empty image id")
    if "/" in image_id or "\\" in image_id or image_id in (".", "..") or ".." in image_id \
            or ":" in image_id or "{" in image_id or not image_id.isprintable():
        # control characters (NUL, newlines) would also split the one-line error messages
        raise HPAError(f"{where}: image id {image_id!r} is not a plain file name")
    return image_id


def parse_labels(text: str, n_classes: int, where: str) -> list[int]:
    if not text:
        raise HPAError(f"{where}: no label")
    labels = []
    for tok in text.split():
        try:
            if not (tok.isascii() and tok.lstrip("-").isdigit()):  # int() also takes "1_0", "+3", "٣"
                raise ValueError(tok)
            lab = int(tok)
        except ValueError:
            raise HPAError(f"{where}: label {tok!r} is not an integer class id") from None
        if not 0 <= lab < n_classes:
            raise HPAError(f"{where}: label {lab} is outside the vocabulary 0..{n_classes - 1}")
        labels.append(lab)
    return sorted(set(labels))


def item_key(folder: Path, image_id: str, fmt: Format, is_file=os.path.isfile) -> str:
    """The key of image ``image_id`` in ``folder``; ``is_file(path)`` says whether a file exists."""
    prefix = os.path.join(str(folder), image_id)
    if fmt.channel_files:
        png = f"{prefix}_{{channel}}.png"
        if not is_file(f"{prefix}_green.png"):
            # the Kaggle set is PNG, the HPAv18 external images are usually JPEG
            for ext in IMAGE_EXTS[1:]:
                if is_file(f"{prefix}_green{ext}"):
                    return f"{prefix}_{{channel}}{ext}"
        return png
    return f"{prefix}.png"


def _file_lookup(folder: Path):
    """``is_file(path)`` for paths in ``folder``, from one listing of it (a folder of the full HPA
    2018 set holds 124,288 files: one call of ``stat`` each took seconds of every start-up); falls
    back to ``os.path.isfile`` where the folder cannot be listed."""
    try:
        with os.scandir(folder) as entries:
            names = {entry.name for entry in entries if entry.is_file()}  # follows links, as isfile does
    except OSError:
        return os.path.isfile
    prefix = os.path.join(str(folder), "")

    def is_file(path: str) -> bool:
        return path.startswith(prefix) and path[len(prefix):] in names

    return is_file


def key_files(key: str, channels=CHANNELS) -> list[str]:
    """The files an item key stands for."""
    # replace, not str.format: a folder or file name may contain other braces
    return [key.replace("{channel}", c) for c in channels] if "{channel}" in key else [key]


def key_for_path(path, channels: str) -> str:
    """The item key of an image named by a path: an RGB file, a cached ``.npy`` or a key as it is;
    for RGBY, any one stain file of an image (``{id}_green.png``) or the common ``{id}`` prefix of
    its four files (what ``learn.predict`` and ``run.py explain`` accept)."""
    path = str(path)
    if channels != "rgby" or "{channel}" in path or path.endswith(".npy"):
        return path
    p = Path(path)
    stem, _, stain = p.stem.rpartition("_")
    if stem and stain in CHANNELS and p.suffix:
        return str(p.parent / f"{stem}_{{channel}}{p.suffix}")
    matches = sorted(p.parent.glob(f"{glob_escape(p.name)}_green.*"))
    return str(p.parent / f"{p.name}_{{channel}}{matches[0].suffix}") if matches else path


def glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def read_items(data_dir, fmt: Format | None = None, split: str = "train", labelled: bool = True,
               skip_bad: bool = False, channels: str | None = None) -> pd.DataFrame:
    """Validated items of a competition folder: columns ``id``, ``key`` and (if labelled) ``labels``.

    ``split='train'`` reads train.csv; ``split='test'`` reads the submission CSV's ids. Every
    problem names the file and line; with ``skip_bad`` bad rows are dropped and reported to ``log``.
    """
    data_dir = Path(data_dir)
    fmt = fmt or detect_format(data_dir)
    csv_path = data_dir / ("train.csv" if split == "train" else fmt.submission_csv)
    folder = data_dir / split
    if split == "test" and not csv_path.is_file() and not fmt.channel_files and folder.is_dir():
        # Zero-to-GANs test folders are usable without the submission CSV.
        ids = sorted(p.stem for p in folder.glob("*.png"))
        records = iter([[fmt.id_col]] + [(line, [image_id], None) for line, image_id in enumerate(ids, 2)])
    else:
        records = iter_csv(csv_path)
    try:
        return _checked_items(records, csv_path, folder, fmt, labelled, skip_bad, channels)
    finally:
        getattr(records, "close", lambda: None)()  # the CSV file, when a bad row stopped the reading


def _checked_items(records, csv_path: Path, folder: Path, fmt: Format, labelled: bool, skip_bad: bool,
                   channels: str | None) -> pd.DataFrame:
    # Rows are checked as they are read, so a bad row near the top of a huge file is reported at
    # once, and the file is parsed once.
    columns = next(records)
    needed = [fmt.id_col] + ([fmt.label_col] if labelled else [])
    missing = [c for c in needed if c not in columns]
    if missing:
        raise HPAError(f"{csv_path}: missing column(s) {','.join(missing)}; expected "
                       f"{','.join(needed)}, found {','.join(columns)}")
    first = next(records, None)
    if first is None:
        raise HPAError(f"{csv_path}: no rows")
    if not folder.is_dir():
        raise HPAError(f"{folder}: image folder not found")
    id_at = columns.index(fmt.id_col)
    label_at = columns.index(fmt.label_col) if labelled else None
    n_classes = len(vocab_for(fmt.name))
    channel_names = CHANNEL_SETS[channels or fmt.default_channels]
    rows, bad, seen = [], [], {}
    is_file = _file_lookup(folder)
    for line, fields, problem in itertools.chain([first], records):
        where = f"{csv_path}, line {line}"
        try:
            if problem:
                raise HPAError(problem)
            image_id = check_id(fields[id_at], where)
            if image_id in seen:
                raise HPAError(f"{where}: duplicated id {image_id!r} (first at line {seen[image_id]})")
            seen[image_id] = line
            row = {"id": image_id, "key": item_key(folder, image_id, fmt, is_file)}
            if labelled:
                row["labels"] = " ".join(map(str, parse_labels(fields[label_at], n_classes, where)))
            for f in key_files(row["key"], channel_names):
                if not is_file(f):
                    raise HPAError(f"{where}: image file {f} not found")
            rows.append(row)
        except HPAError as e:
            if not skip_bad:
                raise
            bad.append(str(e))
    out = pd.DataFrame(rows, columns=["id", "key"] + (["labels"] if labelled else []))
    if skip_bad and bad:
        logger.info(f"skipped {len(bad)} bad row(s) of {csv_path}:")
        for msg in bad:
            logger.info(f"  {msg}")
    if out.empty:
        raise HPAError(f"{csv_path}: no usable rows")
    out.attrs["bad_rows"] = bad
    return out


def with_extra_items(items: pd.DataFrame, extra_data, fmt: Format, channels: str,
                     skip_bad: bool = False) -> pd.DataFrame:
    """``items`` followed by the labelled images of external folders (``--extra-data``), such as
    the HPAv18 images: each folder is laid out like the competition's, ``train.csv`` (Id,Target,
    the HPA 2018 classes) and ``train/{Id}_{stain}.jpg`` or ``.png`` at any resolution (training
    resizes every image to ``--size``)."""
    folders = [extra_data] if isinstance(extra_data, (str, os.PathLike)) else list(extra_data or [])
    if folders and not fmt.channel_files:
        raise HPAError(f"--extra-data takes HPA 2018-style data (one file per stain, 28 classes); "
                       f"--data is in the {fmt.name} layout")
    merged = [items]
    source = dict.fromkeys(items["id"], "--data")
    for folder in map(Path, folders):
        if not (folder / "train.csv").is_file():
            raise HPAError(f"--extra-data {folder}: no train.csv (an external folder needs train.csv "
                           "with Id,Target and the images in train/)")
        extra = read_items(folder, FORMATS["hpa2018"], "train", skip_bad=skip_bad, channels=channels)
        clash = [image_id for image_id in extra["id"] if image_id in source]
        if clash and not skip_bad:
            raise HPAError(f"{folder / 'train.csv'}: id {clash[0]!r} is also in {source[clash[0]]} "
                           f"({len(clash)} shared id(s); --skip-bad keeps the first)")
        if clash:
            logger.info(f"skipped {len(clash)} id(s) of {folder / 'train.csv'} already read from {source[clash[0]]}")
            extra = extra[~extra["id"].isin(clash)]
        source.update(dict.fromkeys(extra["id"], f"--extra-data {folder}"))
        merged.append(extra)
    if len(merged) == 1:
        return items
    out = pd.concat(merged, ignore_index=True)
    out.attrs["bad_rows"] = [msg for part in merged for msg in part.attrs.get("bad_rows", [])]
    return out


def scan_images(path, channels: str) -> pd.DataFrame:
    """Items for prediction from a single image file or a folder of images (no CSV needed): one per
    image file, or for ``rgby`` one per ``{id}_{red,green,blue,yellow}`` group of files. An image's id
    is its file's stem; where two images share a stem (``a.png`` and ``a.jpg``) their file names
    (see ``distinct_ids``)."""
    path = Path(path)
    if not path.exists():
        raise HPAError(f"{path}: no such file or folder")
    files = [path] if path.is_file() else sorted(
        p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if not files:
        raise HPAError(f"{path}: no images (.png, .jpg, .tif) found")
    found = {}  # item key -> stem, in the order of the files
    names = CHANNEL_SETS[channels]
    for f in files:
        stem, _, ch = f.stem.rpartition("_")
        template = str(f.parent / f"{stem}_{{channel}}{f.suffix}")
        # an RGB model reads stain files too, but an RGB picture may just be named like one
        stain_file = stem and ch in CHANNELS and (
            channels == "rgby" or all(os.path.isfile(p) for p in key_files(template, names)))
        if stain_file:
            found.setdefault(template, stem)
        elif channels == "rgby":
            raise HPAError(f"{f}: a 4-channel (RGBY) model needs one file per stain named "
                           f"{{id}}_red/_green/_blue/_yellow{f.suffix}")
        else:
            found[str(f)] = f.stem
    keys = list(found)
    ids = distinct_ids(list(found.values()), keys, channels)
    for image_id, key in zip(ids, keys):
        if "{channel}" in key:
            for f in key_files(key, names):
                if not os.path.isfile(f):
                    raise HPAError(f"{f}: channel file missing for image {image_id!r}")
    first = {}
    for image_id, key in zip(ids, keys):  # only a file literally named like a group's id gets here
        if first.setdefault(image_id, key) != key:
            raise HPAError(f"{path}: {image_name(first[image_id], channels)} and {image_name(key, channels)} both "
                           f"are image {image_id!r}; rename one")
    return pd.DataFrame({"id": ids, "key": keys})


def image_name(key: str, channels: str) -> str:
    """The file name of the image an item key stands for: ``a.png``, or for a group of stain files
    ``a_{red,green,blue,yellow}.png``."""
    name = Path(key).name
    return name.replace("{channel}", "{" + ",".join(CHANNEL_SETS[channels]) + "}") if "{channel}" in key else name


def distinct_ids(ids: list[str], keys: list[str], channels: str) -> list[str]:
    """``ids`` with each that different images share (``a`` for ``a.png`` and ``a.jpg``) replaced by
    those images' file names (``image_name``), so no image of a folder is dropped or mistaken for
    another; the same image named twice keeps its id."""
    ids = list(ids)
    while True:  # a file name may in turn clash with another image's stem ("a.png" of "a.png.tif")
        owners: dict[str, set] = {}
        for image_id, key in zip(ids, keys):
            owners.setdefault(image_id, set()).add(key)
        renamed = [image_name(key, channels) if len(owners[image_id]) > 1 else image_id
                   for image_id, key in zip(ids, keys)]
        if renamed == ids:
            return ids
        ids = renamed


def labels_matrix(labels: pd.Series, n_classes: int) -> np.ndarray:
    y = np.zeros((len(labels), n_classes), np.uint8)
    for i, text in enumerate(labels):
        y[i, [int(t) for t in text.split()]] = 1
    return y
