"""What the training command line shares with the loop and with ``mpisign.diagnostics``:
argparse types, the defaults the run fills in, and the usage error.

Plain Python, no torch and no MPI: ``mpisign.diagnostics`` takes its argparse types from here
without loading the training loop.
"""

from __future__ import annotations

import argparse

__all__ = ["Config", "UsageError", "positive_int", "nonnegative_int", "VOTING", "ALLREDUCE",
           "OPTIMIZERS", "DEFAULT_LR", "DEFAULT_LR_BY_MODEL", "DEFAULT_WEIGHT_DECAY",
           "DEFAULT_BETAS", "GPT_SIZE", "default_lr", "in_words", "DEFAULT_EPOCHS",
           "DEFAULT_EXAMPLES"]

#: The optimizers whose ranks combine the signs they send by majority vote (mpisign's).
VOTING = ("signum", "signsgd", "lion")
#: The full-precision baselines: the fp32 allreduce mean of the gradients, then a plain
#: optimizer on it (``lion-allreduce`` is "global Lion", what Distributed Lion is judged against).
ALLREDUCE = ("sgd", "adamw", "lion-allreduce")
OPTIMIZERS = VOTING + ALLREDUCE

#: Learning rate when --lr is not given, for the image models. Sign descent (signum, signsgd,
#: lion) moves every coordinate by lr. Lion's and AdamW's: the best of 1e-4..1e-2 on digits
#: (the small CNN, 3 ranks x 32, 84 steps, seed 0: see README, "A transformer").
DEFAULT_LR = {"signum": 1e-3, "signsgd": 1e-3, "sgd": 0.05, "lion": 1e-3,
              "lion-allreduce": 1e-3, "adamw": 3e-3}
#: ... and for --model gpt: the best of a grid in steps of about 3x on the 4-rank benchmark
#: (benchmarks/bench_lm.py: 400 steps, seed 0; see README, "A transformer"). Lion's lr comes
#: out 3-10x below AdamW's, as its authors advise (Chen et al. 2023); the vote's (lion) above
#: global Lion's, as a vote of 4 ranks moves no coordinate where they tie.
DEFAULT_LR_BY_MODEL = {"gpt": {"signum": 1e-3, "signsgd": 1e-3, "sgd": 0.1, "lion": 1e-3,
                               "lion-allreduce": 3e-4, "adamw": 3e-3}}
#: --weight-decay when not given (decoupled for adamw and Lion: p <- p (1 - lr wd)). Lion's is
#: 3x AdamW's, where the same lr x wd decays as fast as AdamW's at 3x its lr. On the gpt
#: benchmark Lion did better with 0.3 than with 0 or 1.0; AdamW's made no difference.
DEFAULT_WEIGHT_DECAY = {"signum": 0.0, "signsgd": 0.0, "sgd": 0.0, "lion": 0.3,
                        "lion-allreduce": 0.3, "adamw": 0.1}
#: --betas when not given: Lion's (b1 interpolates the sent sign, b2 is the momentum's decay)
#: and AdamW's.
DEFAULT_BETAS = {"lion": (0.9, 0.99), "lion-allreduce": (0.9, 0.99), "adamw": (0.9, 0.999)}
#: --model gpt's size when --layers, --width, --heads, --context are not given: 0.84M
#: parameters, windows of 128 bytes.
GPT_SIZE = {"layers": 4, "width": 128, "heads": 4, "context": 128}
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



def default_lr(optimizer: str, model: str) -> float:
    """--lr when not given, for ``optimizer`` on ``model``."""
    return DEFAULT_LR_BY_MODEL.get(model, DEFAULT_LR)[optimizer]


def in_words(defaults: dict) -> str:
    """A default that depends on the optimizer, for --help: ``{"signum": 1e-3, "sgd": 0.05}``
    as "0.001 for signum; 0.05 for sgd" (optimizers of one value together, in order)."""
    by_value: dict = {}
    for optimizer, value in defaults.items():
        shown = " ".join(map(str, value)) if isinstance(value, (tuple, list)) else f"{value:g}"
        by_value.setdefault(shown, []).append(optimizer)
    return "; ".join(f"{value} for {', '.join(names)}" for value, names in by_value.items())
