"""Where the project's own files are: the bundled sample data set."""
from __future__ import annotations

from pathlib import Path

from .errors import HPAError

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "data" / "sample"


def resolve_data_dir(data) -> Path:
    """``--data`` as a Path; without it, the bundled sample."""
    if data is None:
        if not (SAMPLE_DIR / "train.csv").is_file():
            raise HPAError(f"no --data given and the bundled sample {SAMPLE_DIR} is missing; "
                           "make one with: python run.py synth --out data/sample")
        return SAMPLE_DIR
    return Path(data)
