"""Spotting adversarial or broken workers from how often they vote against the majority.

The figure is free: ``popcount((worker_bits ^ majority) & ~tie)`` over the packed words each rank
already holds (:func:`mpisign.packing.disagreement`). An honest worker disagrees on a fraction
that falls as training's signal-to-noise ratio grows and is well under 1/2; a blind inverter
disagrees on roughly ``1 - honest``, above 1/2; a random-sign worker near 1/2.
:class:`DisagreementMonitor` keeps each rank's fraction over a sliding window and warns (rank 0
only) when a rank's mean passes ``threshold``.
"""

from __future__ import annotations

import logging
from collections import deque

import numpy as np

__all__ = ["DisagreementMonitor"]

log = logging.getLogger(__name__)


class DisagreementMonitor:
    """Per-rank disagreement with the majority over the last ``window`` steps.

    Args:
        threshold: warn when a rank's windowed mean disagreement exceeds this fraction.
        window: number of steps averaged.
    """

    def __init__(self, threshold: float = 0.5, window: int = 20):
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold!r}")
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an int >= 1, got {window!r}")
        self.threshold = threshold
        self.window = window
        self.history: deque = deque(maxlen=window)
        self.flagged: set[int] = set()  # ranks currently over the threshold

    def record(self, fractions, step: int, verbose: bool = True) -> list[int]:
        """Add one step's per-rank fractions; return the ranks whose windowed mean is over the
        threshold (after a full window). Logs a warning when a rank crosses it, if ``verbose``."""
        self.history.append(np.asarray(fractions, dtype=np.float64))
        if len(self.history) < self.window:
            return []
        means = self.means()
        over = {int(r) for r in np.flatnonzero(means > self.threshold)}
        for r in sorted(over - self.flagged):
            if verbose:
                log.warning("rank %d voted against the majority on %.1f%% of coordinates over the "
                            "last %d steps (threshold %.0f%%) at step %d: adversarial or broken?",
                            r, 100 * means[r], self.window, 100 * self.threshold, step)
        self.flagged = over
        return sorted(over)

    def means(self) -> np.ndarray:
        """Each rank's mean disagreement over the window so far."""
        return np.mean(np.stack(self.history), axis=0) if self.history else np.zeros(0)
