#!/usr/bin/env python
"""Entry point: python run.py [COMMAND] [FLAGS]; training is the default command."""
import sys

from hpa_fastai.cli import entry

if __name__ == "__main__":
    sys.exit(entry())
