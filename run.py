#!/usr/bin/env python
"""Entry point: python run.py [COMMAND] [FLAGS]; training is the default command."""
import sys

from hpa_fastai.cli import main

if __name__ == "__main__":
    sys.exit(main())
