"""Synthetic HPA-like microscopy data in either competition's layout, to try the pipeline without downloads."""
from .dataset import CHANNELS, draw_field, make_dataset
from .labels import LABEL_FREQ, sample_labels
from .patterns import PATTERNS

__all__ = ["CHANNELS", "LABEL_FREQ", "PATTERNS", "draw_field", "make_dataset", "sample_labels"]
