"""The command line: ``python run.py [COMMAND] [FLAGS]`` (``hpa-fastai`` once installed)."""
from .main import main

__all__ = ["main"]
