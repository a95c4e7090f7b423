"""A training run's data, checked before any model is built: the resolved config, the items of
``--data`` and ``--extra-data`` (bad rows and unreadable images refused or, with ``--skip-bad``,
dropped), their near-duplicate groups, the image size, the preprocessed cache where one exists,
and the per-channel statistics. What was checked and measured before, of files that have not changed
since, is not checked again (``checked``)."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..config import MIN_SIZE, TrainConfig, validate
from ..errors import HPAError
from ..paths import resolve_data_dir
from .cache import cached_items
from .checked import remembered_stats, verify_remembered
from .dedup import duplicate_groups
from .images import native_size
from .layouts import detect_format, read_items, with_extra_items
from .pipeline import bound_workers, default_workers
from .vocab import class_names, vocab_for

logger = logging.getLogger(__name__)

MAX_AUTO_SIZE = 256


@dataclass
class TrainingSet:
    """What a run trains on: ``cfg`` with every automatic value resolved (data folder, channels,
    size, workers), the items (``id``, ``key``, ``labels``, maybe ``group``), the vocabulary and
    class names, and the normalisation statistics."""
    cfg: TrainConfig
    data_dir: Path
    format: str
    items: pd.DataFrame
    vocab: list
    names: list
    mean: list
    std: list


def load_training_set(cfg: TrainConfig, stats: tuple | None = None, cuda: bool = False) -> TrainingSet:
    """Check the flags and the data; ``stats`` (mean, std) skips measuring the channel statistics;
    ``cuda``: the run trains on a GPU (more DataLoader workers by default)."""
    validate(cfg)
    data_dir = resolve_data_dir(cfg.data)
    fmt = detect_format(data_dir)
    channels = fmt.default_channels if cfg.channels == "auto" else cfg.channels
    if channels == "rgby" and not fmt.channel_files:
        raise HPAError(f"--channels rgby needs one file per stain (HPA 2018 layout); {data_dir} is "
                       "Zero-to-GANs RGB: use --channels rgb")
    items = read_items(data_dir, fmt, "train", skip_bad=cfg.skip_bad, channels=channels)
    items = with_extra_items(items, cfg.extra_data, fmt, channels, skip_bad=cfg.skip_bad)
    bad = verify_remembered(items, channels, deep=cfg.skip_bad)  # only images new or changed since the last run
    if bad:
        if not cfg.skip_bad:
            first = next(iter(bad.values()))
            raise HPAError(first + (f" (and {len(bad) - 1} more; --skip-bad drops them)" if len(bad) > 1 else ""))
        logger.info(f"skipped {len(bad)} unreadable image(s):")
        for msg in bad.values():
            logger.info(f"  {msg}")
        items = items[~items["key"].isin(bad)].reset_index(drop=True)
    if len(items) < 2:
        raise HPAError(f"{data_dir}: at least 2 usable images are needed, found {len(items)}")
    groups = duplicate_groups(data_dir, items["id"], cfg.duplicates, cfg.cache)  # splits keep near-duplicates together
    if groups is not None:
        items = items.assign(group=groups)
    size = cfg.size or min(native_size(items["key"].iloc[0], channels), MAX_AUTO_SIZE)
    if size < MIN_SIZE:  # the automatic size: --size itself was checked by validate()
        raise HPAError(f"{data_dir}: the images are {size}x{size} pixels (image {items['id'].iloc[0]!r}), below the "
                       f"minimum of {MIN_SIZE}; pass --size {MIN_SIZE} or more (as much as --arch takes) to enlarge them")
    if cfg.progressive_size is not None and cfg.progressive_size >= size:  # --size was automatic
        raise HPAError(f"--progressive-size {cfg.progressive_size} must be smaller than the image size {size}; "
                       "lower it or pass a larger --size")
    items = cached_items(items, channels, size, cfg.cache)  # `preprocess` copies, where they exist
    workers = bound_workers(cfg.workers, len(items), default_workers(cuda))
    resolved = dataclasses.replace(cfg, data=str(data_dir), channels=channels, size=size, workers=workers)
    mean, std = stats or remembered_stats(data_dir, items["key"], channels, size, seed=cfg.seed)
    return TrainingSet(resolved, data_dir, fmt.name, items, vocab_for(fmt.name), class_names(fmt.name), mean, std)
