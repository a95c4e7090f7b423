"""The command line: ``hpa-fastai [COMMAND] [FLAGS]`` (``python -m hpa_fastai``, or ``python run.py`` in a checkout)."""
from .flags import entry, main

__all__ = ["entry", "main"]
