"""``python -m mpisign.train``: see :mod:`mpisign.train`."""

import sys

from .cli import run

sys.exit(run())
