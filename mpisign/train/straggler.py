"""Ranks made slow on purpose (``--straggle``), so that what a quorum vote does for stragglers can
be shown, not only argued.

    --straggle 3:x2          rank 3's compute takes twice as long, every step
    --straggle 3:0.5@0.1     rank 3 stalls 0.5 s on a random 10% of its steps

A delay is a sleep after the backward pass, counted in the step's compute time: what a
throttled GPU (``xF``: F times the compute) or a stalling data loader or noisy neighbour (a fixed
delay on a fraction of the steps) does to a rank. The random steps come from a generator seeded
by ``--seed`` and the rank, so a run can be repeated.
"""

from __future__ import annotations

import argparse
import random
import re
import time
from dataclasses import dataclass

__all__ = ["Straggle", "parse_straggle", "Straggler"]


@dataclass(frozen=True)
class Straggle:
    """One rank's slowness: ``factor`` times its compute, or ``delay`` seconds, on ``fraction``
    of its steps."""

    rank: int
    delay: float = 0.0
    factor: float = 1.0
    fraction: float = 1.0

    def __str__(self) -> str:
        what = f"x{self.factor:g}" if self.factor != 1.0 else f"{self.delay:g}"
        return f"{self.rank}:{what}" + (f"@{self.fraction:g}" if self.fraction != 1.0 else "")


def parse_straggle(text: str) -> Straggle:
    """argparse type: ``RANK:DELAY[@FRACTION]``, DELAY in seconds or ``xF`` (F >= 1 times the
    rank's compute), FRACTION of the steps in (0, 1]."""
    m = re.fullmatch(r"(\d+):(x?)([0-9.]+(?:e-?\d+)?)(?:@([0-9.]+))?", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(
            f"expected RANK:SECONDS[@FRACTION] or RANK:xFACTOR[@FRACTION], got {text!r}")
    rank, times, value, fraction = int(m[1]), m[2] == "x", float(m[3]), float(m[4] or 1.0)
    if not 0 < fraction <= 1:
        raise argparse.ArgumentTypeError(f"the fraction of steps must be in (0, 1], got {fraction}")
    if times and value < 1:
        raise argparse.ArgumentTypeError(f"a compute factor must be >= 1, got x{value:g}")
    return Straggle(rank, factor=value, fraction=fraction) if times else \
        Straggle(rank, delay=value, fraction=fraction)


class Straggler:
    """This rank's slowness from ``--straggle`` (none if no entry names it); ``specs`` as
    :func:`parse_straggle` reads them, or as its text."""

    def __init__(self, specs, rank: int, seed: int):
        specs = [parse_straggle(s) if isinstance(s, str) else s for s in specs or ()]
        mine = [s for s in specs if s.rank == rank]
        self.spec = mine[-1] if mine else None
        self.rng = random.Random(f"{seed}:{rank}:straggle")
        self.slept = 0.0   # seconds in all

    def __call__(self, compute_s: float) -> float:
        """After a step's compute of ``compute_s`` seconds: sleep as this rank's slowness says,
        and return the seconds slept."""
        spec = self.spec
        if spec is None or self.rng.random() >= spec.fraction:
            return 0.0
        seconds = spec.delay + (spec.factor - 1.0) * compute_s
        time.sleep(seconds)
        self.slept += seconds
        return seconds
