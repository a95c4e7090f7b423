"""``python -m hpa_fastai [COMMAND] [FLAGS]``: the ``hpa-fastai`` command line."""
import sys

from .cli import entry

if __name__ == "__main__":
    sys.exit(entry())
