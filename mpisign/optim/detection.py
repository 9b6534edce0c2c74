r"""Spotting adversarial or broken workers from how often they vote against the majority.

The figure is free: ``popcount((worker_bits ^ majority) & ~tie)`` over the packed words each rank
already holds (:func:`mpisign.backends.packing.disagreement`). An honest worker disagrees on a fraction
that falls as training's signal-to-noise ratio grows and is well under 1/2; a blind inverter
disagrees on roughly ``1 - honest``, above 1/2; a random-sign or zero-sending worker somewhere in
between. :class:`DisagreementMonitor` keeps each rank's fraction over a sliding window and warns
(rank 0 only) when a rank's windowed mean ``m_r`` breaks either rule:

.. math::
    \text{absolute:}\quad m_r > \text{threshold}
    \qquad\qquad
    \text{relative } (M \ge 3):\quad m_r - \tilde m >
        \max\big(\text{margin},\ \text{mad\_k} \cdot 1.4826\,
        \operatorname{median}_j |m_j - \tilde m|,\ \text{noise\_k} \cdot \tilde s\big)

with :math:`\tilde m` the median of the M ranks' windowed means and :math:`\tilde s` the median
of the ranks' standard deviations of their per-step fractions over the window: how much one
honest rank's figure jumps from step to step, which a model with few coordinates makes large
(see :func:`crowd_margin`). The relative rule compares a
rank with the crowd it votes among, so it needs no guess of the honest level, which moves with
the model, the batch size and M (see :func:`crowd_margin` for the choice of its numbers).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import deque

import numpy as np

__all__ = ["DisagreementMonitor", "crowd_margin"]

log = logging.getLogger(__name__)

MAD_TO_SD = 1.4826  # 1 / Phi^-1(3/4): MAD * this estimates the standard deviation of a normal
MIN_RANKS_RELATIVE = 3  # a median of 1 or 2 values describes no crowd


def crowd_margin(means: np.ndarray, margin: float, mad_k: float, spread: float = 0.0,
                 noise_k: float = 0.0) -> tuple[float, float]:
    """The relative rule's reference and tolerance: ``(median, max(margin, mad_k * 1.4826 *
    MAD, noise_k * spread))`` of the ranks' windowed means, ``spread`` being the median over
    the ranks of the standard deviation of each one's per-step fractions in the window.

    Why these statistics: the median and the MAD (median absolute deviation) have a breakdown
    point of 1/2, so they describe the honest ranks whenever fewer than half of the ranks
    misbehave, the same alpha < 1/2 under which majority vote converges (Bernstein et al.,
    "signSGD with majority vote is communication efficient and fault tolerant", ICLR 2019). A
    mean and standard deviation would be pulled up by the very ranks being looked for.

    Why two terms: ``1.4826 * MAD`` estimates the standard deviation of normally spread means,
    so ``mad_k`` widens the tolerance when the honest ranks legitimately spread out (non-i.i.d.
    shards, a small model, early training). The ``margin`` floor is there because the MAD of a
    handful of ranks is itself noisy and can be near 0, and because honest ranks differ
    persistently by their data: on digits with M = 7, batch 32 and a 20-step window, honest ranks
    sat up to 0.08 above the median in a clean run. ``mad_k = 2`` sits below the 2.5 to 3 usual
    for MAD outliers (Leys et al., J. Exp. Soc. Psychol. 49, 2013) because the floor already
    guards against a small MAD, and because K adversaries pull the median toward them and inflate
    the MAD, so a large ``mad_k`` hides the ranks it should find. Replayed on six such runs
    (clean; invert K = 1; random and zero rule K = 1, 2), the defaults flagged no honest rank
    in any window, the inverter and one K = 2 zero-rule sender in every window and the other in
    89% of them (mad_k = 2.5: 62%; margin alone: 100%).

    Why the third term: the fraction of a few coordinates is noisy. With 30 coordinates of pure
    noise, 4 honest ranks and momentum 0.9, one rank's per-step figure has a standard deviation
    of 0.06 and its 20-step mean ranged from 0.04 to 0.24 around a median of about 0.12: the
    first two terms flagged honest ranks 5 times in 5,000 steps (#31 saw 7). ``noise_k`` times
    the ranks' median step-to-step spread scales the tolerance with that noise, measured, not
    guessed from the model's size; on a real model the spread is small and the term is below
    ``margin`` (benchmarks/monitor_calibration.py measures both, README "Detecting bad ranks").
    """
    median = float(np.median(means))
    mad = float(np.median(np.abs(means - median)))
    return median, max(margin, mad_k * MAD_TO_SD * mad, noise_k * spread)


class DisagreementMonitor:
    """Per-rank disagreement with the majority over the last ``window`` steps.

    A rank is flagged while its windowed mean breaks the absolute rule, the relative rule or
    both (module docstring); a warning names the rule and its numbers when a rank enters the
    flagged set. Both rules are on by default: every rank the absolute rule alone flagged is
    still flagged, and the relative rule adds ranks that stand out from the crowd without passing
    1/2 (inverters while honest disagreement is high, zero-rule senders, random-sign ranks while
    the honest ones still agree strongly). It is one-sided: a rank that agrees with the majority
    more than the others do harms no vote.

    Under a quorum, a rank the vote did not count has no figure (NaN) for that step; the steps
    that counted fewer than 3 ranks are left out, and the rest levelled by each step's median
    (:func:`_levelled`), since a rank's figure grows with the number of voters.

    With fewer than 3 ranks the relative rule is skipped (a median of two means sits halfway
    between them, so neither can stand out from a crowd) and only the absolute rule applies.
    Like majority vote itself, the relative rule assumes fewer than half the ranks misbehave.

    Limits, measured on digits (M = 7, 100 steps): random-sign ranks, and zero-rule senders at
    K = 1, sit about 0.37 against 0.31 for honest ranks, inside the spread of the honest ranks
    themselves once training has started, so they are flagged in the first few dozen steps only
    (27-48% of the windows); scaling ranks send honest signs and cannot be seen.

    Args:
        threshold: absolute rule: flag a rank whose windowed mean exceeds this fraction.
        window: number of steps averaged.
        margin: relative rule: the smallest excess over the median of all ranks' windowed means
            that flags a rank, a fraction in (0, 1); ``None`` turns the rule off (the absolute
            rule alone, as before the relative rule existed).
        mad_k: relative rule: the excess must also exceed ``mad_k`` robust standard deviations
            (``1.4826 * MAD``) of the ranks' means; 0 leaves the ``margin`` floor alone.
        noise_k: relative rule: the excess must also exceed ``noise_k`` times the ranks'
            median standard deviation of their per-step fractions over the window; 0 turns
            this term off.
    """

    def __init__(self, threshold: float = 0.5, window: int = 20, *,
                 margin: float | None = 0.1, mad_k: float = 2.0, noise_k: float = 3.0):
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold!r}")
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an int >= 1, got {window!r}")
        if margin is not None and not (_is_real(margin) and 0.0 < margin < 1.0):
            raise ValueError(f"margin must be a fraction in (0, 1), or None to turn the relative "
                             f"rule off, got {margin!r}")
        if not (_is_real(mad_k) and math.isfinite(mad_k) and mad_k >= 0):
            raise ValueError(f"mad_k must be a finite number >= 0 (robust standard deviations; "
                             f"0 keeps only the margin floor), got {mad_k!r}")
        if not (_is_real(noise_k) and math.isfinite(noise_k) and noise_k >= 0):
            raise ValueError(f"noise_k must be a finite number >= 0 (step-to-step standard "
                             f"deviations; 0 turns the term off), got {noise_k!r}")
        # What users tune.
        self.threshold = threshold
        self.window = window
        self.margin = margin
        self.mad_k = float(mad_k)
        self.noise_k = float(noise_k)
        # Internal: the last ``window`` steps' per-rank fractions.
        self.history: deque = deque(maxlen=window)
        # Statistics, as of the last full window.
        self.flagged: set[int] = set()  # ranks currently breaking a rule
        self.rules: dict[int, tuple[str, ...]] = {}  # flagged rank -> "absolute" / "relative"
        self.median: float | None = None  # the relative rule's reference (None: rule not applied)
        self.margin_used: float | None = None  # its tolerance (see crowd_margin)

    def record(self, fractions, step: int, verbose: bool = True) -> list[int]:
        """Add one step's per-rank fractions; return the ranks that break a rule (after a full
        window). Logs a warning when a rank enters the flagged set, if ``verbose``."""
        self.history.append(np.asarray(fractions, dtype=np.float64))
        if len(self.history) < self.window:
            return []
        means, spread = _levelled(self._informative())
        judged = np.isfinite(means)   # a rank with no figure in the window is not judged
        # Step 1: the absolute rule.
        rules = {int(r): ["absolute"]
                 for r in np.flatnonzero(judged & (np.nan_to_num(means) > self.threshold))}
        # Step 2: the relative rule, when there is a crowd to compare with.
        self.median = self.margin_used = None
        if self.margin is not None and judged.sum() >= MIN_RANKS_RELATIVE:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)   # a rank with one figure
                stds = np.nanstd(spread[:, judged], axis=0)
            self.median, self.margin_used = crowd_margin(means[judged], self.margin, self.mad_k,
                                                         float(np.median(stds)), self.noise_k)
            for r in np.flatnonzero(judged & (np.nan_to_num(means) - self.median
                                              > self.margin_used)):
                rules.setdefault(int(r), []).append("relative")
        # Step 3: warn about the ranks that were not flagged at the last step.
        self.rules = {r: tuple(rules[r]) for r in sorted(rules)}
        for r in sorted(set(rules) - self.flagged):
            if verbose:
                log.warning("rank %d voted against the majority on %.1f%% of coordinates over the "
                            "last %d steps at step %d (%s): adversarial or broken?",
                            r, 100 * means[r], self.window, step,
                            self._explain(means[r], rules[r]))
        self.flagged = set(rules)
        return sorted(rules)

    def forget(self) -> None:
        """Start afresh: the ranks were renumbered (an elastic optimizer lost some), so the
        window's figures no longer belong to the ranks they name."""
        self.history.clear()
        self.flagged, self.rules = set(), {}
        self.median = self.margin_used = None

    def means(self) -> np.ndarray:
        """Each rank's mean disagreement over the window so far, as the rules judge it: over
        the steps it has a figure of (NaN: a quorum's vote did not count it), levelled for the
        number of ranks each counted (:func:`_levelled`); NaN if it has none. With every
        rank counted at every step, the plain mean."""
        if not self.history:
            return np.zeros(0)
        return _levelled(self._informative())[0]

    def _informative(self) -> np.ndarray:
        """The window's figures, less the steps where a quorum counted fewer than
        ``min(3, M)`` ranks: two voters never disagree (their ties are left out), so such a
        step says nothing about anyone, and averaging its zeros in would dilute the figures
        of the steps that do."""
        figures = np.stack(self.history)
        counted = np.isfinite(figures).sum(axis=1)
        return figures[counted >= min(MIN_RANKS_RELATIVE, figures.shape[1])]

    def _explain(self, mean: float, rules: list[str]) -> str:
        why = []
        if "absolute" in rules:
            why.append(f"absolute rule: mean {mean:.3f} > threshold {self.threshold:.3f}")
        if "relative" in rules:
            why.append(f"relative rule: mean {mean:.3f} - median {self.median:.3f} = "
                       f"{mean - self.median:.3f} > margin {self.margin_used:.3f}")
        return "; ".join(why)


def _levelled(figures: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r"""Each rank's mean figure over the steps (rows) it has one of, levelled for who voted,
    and the per-step figures whose spread the relative rule's noise term measures.

    .. math:: \bar m_r = \operatorname{mean}_{t:\,d_{rt}\ \text{finite}}
              (d_{rt} - L_t) + \operatorname{mean}_t L_t,
              \qquad L_t = \operatorname{median}_j d_{jt}

    Why: under a quorum the number of ranks a vote counts varies from step to step, and a
    rank's disagreement with the majority grows with that number (one voter among three pulls
    the majority its way less than one among two, which never disagree). A slow rank counted
    only at the steps where every rank was on time would stand above the others by that alone:
    after an elastic shrink to 3 ranks with a quorum of 2 the slow one sat at 12.5% against a
    median of 0.5%, and was named. Its figure is compared with the crowd's level ``L_t`` of the
    steps it has one of; the median keeps that level honest while fewer than half misbehave.
    The spread is then that of ``d_rt - L_t``: the level's own jumps with the count are not an
    honest rank's noise. With every rank counted at every step both are the plain figures,
    exactly."""
    if figures.shape[0] == 0:
        return np.full(figures.shape[1], np.nan), figures
    if np.isfinite(figures).all():
        return figures.mean(axis=0), figures
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # a rank with no figure: NaN
        level = np.nanmedian(figures, axis=1)
        deviations = figures - level[:, None]
        return np.nanmean(deviations, axis=0) + level.mean(), deviations


def _is_real(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)
