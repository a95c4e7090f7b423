"""Near-duplicate images: a perceptual hash of each image's green (protein) stain, the pairs within a
Hamming distance, and the groups they form.

``dedup`` writes ``duplicates.csv`` (columns ``id``, ``group``, ``distance``: one row per image that
has a near-duplicate, ``distance`` in bits to the group's first image in train.csv order) into the
data folder, or, where that is read-only or ``--cache`` / ``$HPA_FASTAI_CACHE`` is given, into the
data set's folder there (``paths.derived_dir``, as the preprocessed cache). Training reads
``--duplicates FILE``, or else the file where ``dedup`` writes it, or else the data folder's own,
gives every item its group, and the random split and the stratified folds keep each group on one
side: otherwise validation rewards recognising a picture seen in training. The file written by
``synth`` for planted duplicates (``Id,duplicate_of``) is read the same way.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from ..atomic import write_csv
from ..config import HASH_BITS
from ..errors import HPAError
from ..outputs import check_output
from ..paths import derived_dir, resolve_data_dir
from .images import read_stain
from .layouts import key_files, read_csv, read_items

logger = logging.getLogger(__name__)

DUPLICATES_CSV = "duplicates.csv"
HASH_SIDE = 32  # the stain is reduced to 32 x 32 before the DCT, as in Zauner's pHash
HASH_FREQS = 8  # the 8 x 8 lowest frequencies give the 64 bits
assert HASH_BITS == HASH_FREQS * HASH_FREQS  # the config's bound on --max-distance


def green_stain(key: str) -> Image.Image:
    """The green stain of an item as a float image: the ``green`` file of a per-stain item (read as
    training reads it: a colour HPAv18 file gives its G band, after the check that it is a green
    stain), the G band of an RGB file."""
    if "{channel}" in key:  # replace, not str.format: paths may hold braces
        return read_stain(key.replace("{channel}", "green"), "green").convert("F")
    try:
        im = Image.open(key)
        im.load()
    except FileNotFoundError:
        raise HPAError(f"{key}: image file not found") from None
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise HPAError(f"{key}: not a readable image ({e})") from None
    band = im.getchannel("G") if "G" in im.getbands() else im
    return band.convert("F")


def phash(stain: Image.Image) -> int:
    """64-bit DCT perceptual hash: which of the lowest 8 x 8 frequencies of the 32 x 32 reduced image
    lie above their median. Box reduction averages every pixel, so resizing and JPEG re-encoding
    move the hash by a few bits; so does a shift of 1-3 pixels (on real 512 px fields at most 8
    bits, while distinct fields differ in 16 or more; shifts beyond ~2% of the side move it further)."""
    from scipy.fft import dctn

    small = np.asarray(stain.resize((HASH_SIDE, HASH_SIDE), Image.Resampling.BOX), np.float64)
    freqs = dctn(small, type=2, norm="ortho")[:HASH_FREQS, :HASH_FREQS].ravel()
    return int.from_bytes(np.packbits(freqs > np.median(freqs)).tobytes(), "big")


def hash_images(keys, workers: int | None = None) -> np.ndarray:
    """The pHash of each item's green stain, as uint64; decoding runs in threads (PIL releases the GIL)."""
    with ThreadPoolExecutor(workers or min(16, os.cpu_count() or 1)) as pool:
        return np.array(list(pool.map(lambda key: phash(green_stain(key)), keys)), dtype=np.uint64)


def near_pairs(hashes: np.ndarray, max_distance: int,
               block: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair i < j with at most ``max_distance`` differing bits: (i, j, distance).

    Plain all-pairs comparison, vectorised in row blocks: O(N^2 / 2) XOR-and-popcounts and
    O(N) memory per block row, so 30,000 images (450 million pairs) take seconds. A bucketed
    multi-index would only pay off far beyond the size of the HPA data sets.
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    n = len(hashes)
    block = block or max(1, (1 << 23) // max(n, 1))  # about 64 MiB of XORs at a time
    found_i, found_j, found_d = [], [], []
    for start in range(0, n, block):
        rows = hashes[start:start + block]
        dist = np.bitwise_count(rows[:, None] ^ hashes[None, start:])
        i, j = np.nonzero(dist <= max_distance)
        upper = j > i  # the block's columns start at its first row: j > i is the upper triangle
        found_i.append(i[upper] + start)
        found_j.append(j[upper] + start)
        found_d.append(dist[i[upper], j[upper]])
    cat = lambda parts, dtype: np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)  # noqa: E731
    return cat(found_i, np.int64), cat(found_j, np.int64), cat(found_d, np.int64)


def group_pairs(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Connected components of the pair graph (a near-duplicate of a near-duplicate is in the same
    group), numbered by their first member; -1 for an image without near-duplicates."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(i), np.int8), (i, j)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    sizes = np.bincount(component, minlength=n)
    groups = np.full(n, -1, np.int64)
    numbers: dict[int, int] = {}
    for row, comp in enumerate(component):
        if sizes[comp] > 1:
            groups[row] = numbers.setdefault(int(comp), len(numbers))
    return groups


def find_duplicates(ids, hashes: np.ndarray, max_distance: int) -> pd.DataFrame:
    """duplicates.csv's rows: ``id``, ``group``, ``distance`` (bits from the group's first image)."""
    ids = np.asarray(ids, dtype=object)
    hashes = np.asarray(hashes, dtype=np.uint64)
    i, j, _ = near_pairs(hashes, max_distance)
    groups = group_pairs(len(ids), i, j)
    rows = np.flatnonzero(groups >= 0)
    rows = rows[np.argsort(groups[rows], kind="stable")]  # group by group, each in train.csv order
    firsts = {}
    for row in rows:
        firsts.setdefault(groups[row], row)
    first_hash = hashes[[firsts[g] for g in groups[rows]]]
    return pd.DataFrame({"id": ids[rows], "group": groups[rows],
                         "distance": np.bitwise_count(hashes[rows] ^ first_hash).astype(np.int64)})


def duplicates_file(data_dir, cache=None) -> Path:
    """Where ``dedup`` writes the duplicates list of ``data_dir`` by default (see ``paths.derived_dir``)."""
    return derived_dir(data_dir, cache)[0] / DUPLICATES_CSV


def dedup(data=None, max_distance: int = 8, out=None, cache=None) -> tuple[Path, pd.DataFrame, int]:
    """Hash every training image of ``data``, write the near-duplicate groups to ``out`` (default:
    ``duplicates_file``: the data folder's duplicates.csv when it is writable); returns (csv path,
    its rows, number of images hashed)."""
    data_dir = resolve_data_dir(data)
    items = read_items(data_dir, split="train", labelled=False)
    if out is None:
        out = duplicates_file(data_dir, cache)
        logger.info(f"duplicates list {out} ({derived_dir(data_dir, cache)[1]})")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise HPAError(f"{data_dir}: cannot create {out.parent} for the duplicates list ({e.strerror or e}); "
                           "pass --out FILE, or --cache DIR, in a folder that is writable") from None
    out = check_output(out, "--out", [data_dir / "train.csv", *(f for key in items["key"] for f in key_files(key))])
    logger.info(f"hashing the green stain of {len(items)} images in {data_dir}")
    hashes = hash_images(items["key"])
    dups = find_duplicates(items["id"], hashes, max_distance)
    write_csv(out, dups)
    return out, dups, len(items)


def duplicates_to_read(data_dir, duplicates=None, cache=None) -> Path | None:
    """The duplicates list training reads: ``--duplicates FILE``; else the file where ``dedup``
    writes it by default; else the data folder's own (one shipped with a read-only data set)."""
    if duplicates is not None:
        return Path(duplicates)
    candidates = dict.fromkeys([duplicates_file(data_dir, cache), Path(data_dir) / DUPLICATES_CSV])
    return next((path for path in candidates if path.is_file()), None)


def duplicate_groups(data_dir, ids, duplicates=None, cache=None) -> np.ndarray | None:
    """Each item's duplicate group from the duplicates list (``duplicates_to_read``: an image without
    duplicates is a group of its own, named by its id; a group is named by its first image), or
    None without the file or any group among ``ids``.

    Accepts ``dedup``'s ``id,group`` and ``synth``'s ``Id,duplicate_of``; ids the file names but
    the items lack (rows dropped by --skip-bad) are ignored.
    """
    path = duplicates_to_read(data_dir, duplicates, cache)
    if path is None:
        return None
    if not path.is_file():  # --duplicates names something that is not a file
        raise HPAError(f"--duplicates {path}: not a file (give the CSV that dedup wrote)")
    df = read_csv(path)
    if {"id", "group"} <= set(df.columns):
        pairs = zip(df["id"], df.groupby("group", sort=False)["id"].transform("first"))
    elif {"Id", "duplicate_of"} <= set(df.columns):
        pairs = zip(df["Id"], df["duplicate_of"])
    else:
        raise HPAError(f"{path}: expected columns id,group (hpa-fastai dedup) or Id,duplicate_of, "
                       f"found {','.join(df.columns) or 'none'}")
    ids = list(ids)
    row_of = {image_id: row for row, image_id in enumerate(ids)}
    linked = [(row_of[a], row_of[b]) for a, b in pairs if a in row_of and b in row_of and a != b]
    if not linked:
        return None
    i, j = map(np.asarray, zip(*linked))
    groups = group_pairs(len(ids), i, j)
    first_id: dict[int, str] = {}
    for row in np.flatnonzero(groups >= 0):
        first_id.setdefault(int(groups[row]), ids[row])
    logger.info(f"{path}: {int((groups >= 0).sum())} images in {len(first_id)} near-duplicate groups; "
                "the split keeps each group on one side")
    return np.array([first_id[g] if g >= 0 else image_id for g, image_id in zip(groups.tolist(), ids)], dtype=object)
