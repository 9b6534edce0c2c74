r"""The statistics behind the diagnostics, on plain arrays: no model, no torch.

Conventions: ``draws`` is an ``(N, K)`` array, N independent stochastic gradients of K sampled
coordinates at one point; ``mean`` the ``(K,)`` true (large-batch) gradient of those
coordinates. Functions work column by column and return one value per coordinate, NaN where a
coordinate's measure is undefined (a constant column, a zero mean).

Measures, after Bernstein, Zhao, Azizzadenesheli, Anandkumar (ICLR 2019) and Bernstein, Wang,
Azizzadenesheli, Anandkumar (ICML 2018):

* Symmetry: sample skewness :math:`g_1 = m_3 / m_2^{3/2}`.
* Unimodality: Hartigan's dip test (package ``diptest``); without it, the bimodality
  coefficient :math:`BC = (G_1^2 + 1) / (G_2 + 3 (n-1)^2 / ((n-2)(n-3)))` (:math:`G_1, G_2` the
  bias-corrected skewness and excess kurtosis), which exceeds 5/9 (its value for a uniform) for
  bimodal samples. BC is a proxy: very skewed unimodal laws (an exponential sits at 5/9) can
  cross the line too, so read it together with the skewness.
* SNR: :math:`S_i = |g_i| / \sigma_i`; the paper's :math:`H` is the set of coordinates with
  :math:`S_i > 2/\sqrt{3}`, where Lemma 1 (unimodal symmetric noise) bounds the sign error by
  :math:`2 / (9 S_i^2)`, and by :math:`1/2 - S_i / (2\sqrt{3})` below.
* The vote: the majority of M independent workers' signs is wrong with probability
  :math:`\sum_{k > M/2} \binom{M}{k} p^k (1-p)^{M-k}` when each is wrong with probability p.
  As in :mod:`mpisign.optim`, a zero gradient votes at random (a fair coin, wrong half of the
  time) and a tie (even M) leaves the coordinate alone, which counts here as half wrong.
* Density: :math:`\phi(v) = \|v\|_1^2 / (d \|v\|_2^2) \in [1/d, 1]`; for the curvature
  :math:`\|L\|_1 / (d \|L\|_\infty)`.
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np

__all__ = ["HIGH_SNR", "SKEW_SYMMETRIC", "SKEW_LARGE", "UNIMODAL_ALPHA", "BC_BIMODAL",
           "skewness", "excess_kurtosis", "bimodality_coefficient", "dip_test", "unimodality",
           "snr", "high_snr_fraction", "sign_error", "lemma1_bound", "majority_error",
           "binomial_majority_error", "density", "curvature_density", "noise_verdict",
           "have_diptest"]

#: The paper's SNR threshold between its two regimes (Lemma 1).
HIGH_SNR = 2 / math.sqrt(3)
#: |skewness| up to which a coordinate's noise counts as symmetric (the usual rule of thumb);
#: above SKEW_LARGE it is strongly skewed.
SKEW_SYMMETRIC = 0.5
SKEW_LARGE = 1.0
#: Level of the dip test: p below it rejects unimodality.
UNIMODAL_ALPHA = 0.05
#: The bimodality coefficient of a uniform law; larger values suggest two modes.
BC_BIMODAL = 5 / 9


def have_diptest() -> bool:
    """Whether Hartigan's dip test (PyPI package ``diptest``) is installed."""
    return importlib.util.find_spec("diptest") is not None


# -- shape of the noise ----------------------------------------------------------------------------
def _central_moments(x: np.ndarray):
    x = np.asarray(x, dtype=np.float64)
    c = x - x.mean(axis=0)
    m2 = (c ** 2).mean(axis=0)
    m3 = (c ** 3).mean(axis=0)
    m4 = (c ** 4).mean(axis=0)
    # A column whose spread is at rounding level is constant: its shape is undefined.
    scale = np.abs(x).max(axis=0) if len(x) else np.zeros(x.shape[1:])
    flat = m2 <= (1e-12 * scale) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        m2 = np.where(flat, np.nan, m2)
    return len(x), m2, m3, m4


def skewness(x: np.ndarray) -> np.ndarray:
    """Sample skewness :math:`g_1 = m_3 / m_2^{3/2}` of each column (NaN for a constant one)."""
    _, m2, m3, _ = _central_moments(x)
    return m3 / m2 ** 1.5


def excess_kurtosis(x: np.ndarray) -> np.ndarray:
    """Sample excess kurtosis :math:`g_2 = m_4 / m_2^2 - 3` of each column."""
    _, m2, _, m4 = _central_moments(x)
    return m4 / m2 ** 2 - 3


def bimodality_coefficient(x: np.ndarray) -> np.ndarray:
    """Sarle's bimodality coefficient of each column (needs at least 4 rows)."""
    n, m2, m3, m4 = _central_moments(x)
    if n < 4:
        raise ValueError(f"the bimodality coefficient needs at least 4 draws, got {n}")
    g1, g2 = m3 / m2 ** 1.5, m4 / m2 ** 2 - 3
    G1 = g1 * math.sqrt(n * (n - 1)) / (n - 2)
    G2 = ((n + 1) * g2 + 6) * (n - 1) / ((n - 2) * (n - 3))
    return (G1 ** 2 + 1) / (G2 + 3 * (n - 1) ** 2 / ((n - 2) * (n - 3)))


def dip_test(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hartigan's dip statistic and its p-value (tabulated null: the uniform) for each column.

    Raises ImportError when the ``diptest`` package is missing."""
    import diptest

    x = np.asarray(x, dtype=np.float64)
    dip = np.full(x.shape[1], np.nan)
    pval = np.full(x.shape[1], np.nan)
    for k in range(x.shape[1]):
        col = x[:, k]
        if np.ptp(col) > 1e-12 * np.abs(col).max():
            dip[k], pval[k] = diptest.diptest(col)
    return dip, pval


def unimodality(x: np.ndarray, method: str = "auto") -> dict:
    """Test each column for unimodality: ``reject`` is True where a column looks multimodal.

    ``method``: ``"dip"`` (Hartigan's dip test at level :data:`UNIMODAL_ALPHA`), ``"bc"``
    (bimodality coefficient above :data:`BC_BIMODAL`), or ``"auto"``: dip if installed.
    Returns ``method``, ``stat`` (dip or BC), ``pvalue`` (dip only, else None), ``reject``
    (bool, False where undefined) and ``defined`` (bool)."""
    if method == "auto":
        method = "dip" if have_diptest() else "bc"
    if method == "dip":
        stat, pvalue = dip_test(x)
        defined = ~np.isnan(pvalue)
        reject = defined & (np.nan_to_num(pvalue, nan=1.0) < UNIMODAL_ALPHA)
    elif method == "bc":
        stat, pvalue = bimodality_coefficient(x), None
        defined = ~np.isnan(stat)
        reject = defined & (np.nan_to_num(stat, nan=0.0) > BC_BIMODAL)
    else:
        raise ValueError(f"method must be 'auto', 'dip' or 'bc', got {method!r}")
    return dict(method=method, stat=stat, pvalue=pvalue, reject=reject, defined=defined)


def noise_verdict(skew: np.ndarray, reject: np.ndarray, defined: np.ndarray) -> dict:
    """Assumption 4 (unimodal, symmetric noise) over the coordinates where it is defined.

    ``holds``: median |skew| <= SKEW_SYMMETRIC, at most 10% of coordinates beyond SKEW_LARGE and
    at most 10% rejected as multimodal (a dip test at 5% rejects up to 5% of truly unimodal
    coordinates by chance); ``approximately``: median |skew| <= SKEW_LARGE and at most 25% on
    either count; else ``fails``."""
    ok = defined & ~np.isnan(skew)
    n = int(ok.sum())
    if n == 0:
        return dict(verdict="undefined", coordinates=0)
    a = np.abs(skew[ok])
    med, large, rej = float(np.median(a)), float((a > SKEW_LARGE).mean()), float(reject[ok].mean())
    if med <= SKEW_SYMMETRIC and large <= 0.10 and rej <= 0.10:
        verdict = "holds"
    elif med <= SKEW_LARGE and large <= 0.25 and rej <= 0.25:
        verdict = "approximately"
    else:
        verdict = "fails"
    return dict(verdict=verdict, coordinates=n, median_abs_skew=med,
                q90_abs_skew=float(np.quantile(a, 0.9)), frac_abs_skew_gt_large=large,
                frac_multimodal=rej)


# -- signal to noise and the sign ------------------------------------------------------------------
def snr(draws: np.ndarray, mean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(S, sigma)``: :math:`S_i = |g_i| / \\sigma_i` with :math:`\\sigma_i` the standard deviation
    of the draws (ddof=1). A noiseless coordinate has S = inf (NaN if its mean is 0 too)."""
    draws = np.asarray(draws, dtype=np.float64)
    mean = np.asarray(mean, dtype=np.float64)
    sigma = draws.std(axis=0, ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.abs(mean) / sigma
    return s, sigma


def high_snr_fraction(s: np.ndarray, threshold: float = HIGH_SNR) -> float:
    """The fraction of coordinates (where S is defined) with :math:`S_i > 2/\\sqrt{3}`."""
    s = np.asarray(s, dtype=np.float64)
    s = s[~np.isnan(s)]
    return float((s > threshold).mean()) if s.size else float("nan")


def _wrong(signs: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """1 where a sign disagrees with the truth, 1/2 where it is 0 (a coin flip / a tie)."""
    return np.where(signs == 0, 0.5, (signs != truth).astype(np.float64))


def sign_error(draws: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """P(sign of one draw != sign of the mean) per coordinate; NaN where the mean is 0."""
    truth = np.sign(mean)
    p = _wrong(np.sign(draws), truth).mean(axis=0)
    return np.where(truth == 0, np.nan, p)


def lemma1_bound(s: np.ndarray) -> np.ndarray:
    """The paper's Lemma 1 bound on the sign error under unimodal symmetric noise."""
    s = np.asarray(s, dtype=np.float64)
    with np.errstate(divide="ignore"):
        high = 2 / (9 * s ** 2)
    return np.where(s > HIGH_SNR, high, 0.5 - s / (2 * math.sqrt(3)))


def majority_error(draws: np.ndarray, mean: np.ndarray, workers: int, trials: int,
                   rng: np.random.Generator, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Measured P(majority of ``workers`` signs is wrong) and P(sign of their mean is wrong).

    Each trial picks ``workers`` distinct rows of ``draws`` (independent draws), so each trial
    is an honest sample of M independent workers; trials overlap, which costs precision, not
    bias. The mean of M draws of batch B is a draw of batch M*B: the second array is what an
    fp32 allreduce of the same M workers would give. Both per coordinate (NaN where mean is 0).
    """
    draws = np.asarray(draws, dtype=np.float64)
    n, k = draws.shape
    if not 1 <= workers <= n:
        raise ValueError(f"a vote of {workers} workers needs at least that many draws, "
                         f"have {n}: raise --draws")
    truth = np.sign(mean)
    signs = np.sign(draws).astype(np.int8)
    single = draws.astype(np.float32)           # only the sign of the sums matters
    vote_wrong = np.zeros(k)
    mean_wrong = np.zeros(k)
    for start in range(0, trials, chunk):
        r = min(chunk, trials - start)
        pick = np.argsort(rng.random((r, n)), axis=1)[:, :workers]           # (r, M) distinct
        s = signs[pick]                                                      # (r, M, K)
        # A zero gradient is sent as a random bit by mpisign: a fair coin.
        zero = s == 0
        s[zero] = rng.integers(0, 2, size=int(zero.sum()), dtype=np.int8) * 2 - 1
        vote_wrong += _wrong(np.sign(s.sum(axis=1, dtype=np.int32)), truth).sum(axis=0)
        mean_wrong += _wrong(np.sign(single[pick].sum(axis=1)), truth).sum(axis=0)
    nan = truth == 0
    return (np.where(nan, np.nan, vote_wrong / trials),
            np.where(nan, np.nan, mean_wrong / trials))


def binomial_majority_error(p: np.ndarray, workers: int) -> np.ndarray:
    """P(the majority of M independent workers is wrong), each wrong with probability p
    (a tie, for even M, counted half)."""
    p = np.asarray(p, dtype=np.float64)
    out = np.zeros_like(p)
    for k in range(workers + 1):
        term = math.comb(workers, k) * p ** k * (1 - p) ** (workers - k)
        if 2 * k > workers:
            out += term
        elif 2 * k == workers:
            out += 0.5 * term
    return out


# -- density ---------------------------------------------------------------------------------------
def density(v) -> float:
    """:math:`\\|v\\|_1^2 / (d \\|v\\|_2^2)`: 1 for a vector of equal magnitudes, 1/d for one
    nonzero entry."""
    v = np.asarray(v, dtype=np.float64).ravel()
    l2 = float((v ** 2).sum())
    return float(np.abs(v).sum() ** 2 / (v.size * l2)) if l2 > 0 else float("nan")


def curvature_density(curvature) -> float:
    """:math:`\\|L\\|_1 / (d \\|L\\|_\\infty)` of a vector of per-coordinate curvatures."""
    a = np.abs(np.asarray(curvature, dtype=np.float64).ravel())
    top = float(a.max()) if a.size else 0.0
    return float(a.sum() / (a.size * top)) if top > 0 else float("nan")
