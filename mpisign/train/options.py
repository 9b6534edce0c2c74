"""What the training command line shares with the loop and with ``mpisign.diagnostics``:
argparse types, the defaults the run fills in, and the usage error.

Plain Python, no torch and no MPI: ``mpisign.diagnostics`` takes its argparse types from here
without loading the training loop.
"""

from __future__ import annotations

import argparse

__all__ = ["Config", "UsageError", "positive_int", "nonnegative_int", "DEFAULT_LR",
           "DEFAULT_EPOCHS", "DEFAULT_EXAMPLES"]

#: Learning rate when --lr is not given. Sign descent moves every coordinate by lr.
DEFAULT_LR = {"signum": 1e-3, "signsgd": 1e-3, "sgd": 0.05}
#: --epochs when not given: 2 epochs of Fashion-MNIST, i.e. 120,000 examples seen. When the
#: default data set falls back to the small digits, the run sees as many examples instead, so
#: that a first run shows learning rather than 10 steps.
DEFAULT_EPOCHS = 2
DEFAULT_EXAMPLES = 120_000


class Config(argparse.Namespace):
    """The run's options once their defaults are filled in, frozen: the run reads them and never
    writes them (a default that depends on the data is filled in by :meth:`replace`, before
    anything is built from it). ``vars(config)`` is what run.json and checkpoints record."""

    def __init__(self, **options):
        for name, value in options.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        raise AttributeError(f"the run's options are frozen: {name} cannot be set to {value!r} "
                             f"(use Config.replace)")

    def replace(self, **changes) -> Config:
        """A copy with ``changes``."""
        unknown = set(changes) - set(vars(self))
        if unknown:
            raise AttributeError(f"no option(s) {sorted(unknown)}")
        return Config(**{**vars(self), **changes})


class UsageError(Exception):
    """A bad option or missing input: every rank exits 2 with the message, no traceback."""


def positive_int(text: str) -> int:
    """argparse type: an int > 0."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    """argparse type: an int >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value

