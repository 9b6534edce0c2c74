"""``python -m mpisign.diagnostics``: see :mod:`mpisign.diagnostics`."""

import sys

from .cli import main

sys.exit(main())
