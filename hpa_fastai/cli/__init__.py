"""The command line: ``python run.py [COMMAND] [FLAGS]`` (``hpa-fastai`` once installed)."""
from .flags import entry, main

__all__ = ["entry", "main"]
