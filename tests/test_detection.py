"""DisagreementMonitor: windowed per-rank disagreement, its absolute and relative rules, and
their warnings.

The synthetic sequences follow the figures measured with 1 bad rank of 7: honest ranks disagree
with the majority on about N(0.38, 0.03) of the coordinates per step, an inverter on about 0.62,
a random-sign or zero-sending rank on about 0.5.
"""

import logging
import statistics

import numpy as np
import pytest

from mpisign import DisagreementMonitor

HONEST, SD = 0.38, 0.03
BAD = {"inverter": 0.62, "random": 0.5, "zero": 0.5}


def fractions(steps, levels, sd=SD, seed=0):
    """``steps`` x len(levels) per-rank fractions: each rank's level plus normal noise."""
    rng = np.random.default_rng(seed)
    return np.clip(np.asarray(levels) + sd * rng.standard_normal((steps, len(levels))), 0, 1)


def reference_flags(seq, window, threshold, margin, mad_k, noise_k=0.0):
    """Flagged ranks at each step, computed another way: cumulative sums for the windowed means,
    the standard library's median for the crowd and its pstdev for each rank's spread."""
    csum = np.vstack([np.zeros(seq.shape[1]), np.cumsum(seq, axis=0)])
    out = []
    for t in range(len(seq)):
        if t + 1 < window:
            out.append([])
            continue
        means = (csum[t + 1] - csum[t + 1 - window]) / window
        flags = {r for r, m in enumerate(means) if m > threshold}
        if margin is not None and len(means) >= 3:
            med = statistics.median(means.tolist())
            mad = statistics.median([abs(m - med) for m in means])
            spread = statistics.median(statistics.pstdev(seq[t + 1 - window: t + 1, r].tolist())
                                       for r in range(seq.shape[1]))
            tolerance = max(margin, mad_k * 1.4826 * mad, noise_k * spread)
            flags |= {r for r, m in enumerate(means) if m - med > tolerance}
        out.append(sorted(flags))
    return out


def run(mon, seq, verbose=False):
    return [mon.record(f, step, verbose) for step, f in enumerate(seq)]


def test_absolute_rule_alone_flags_only_ranks_over_threshold_after_a_full_window(caplog):
    mon = DisagreementMonitor(threshold=0.5, window=4, margin=None)
    rng = np.random.default_rng(0)
    with caplog.at_level(logging.WARNING):
        for step in range(3):
            assert mon.record([0.2, 0.8, 0.45 + 0.1 * rng.random()], step) == []
        assert mon.record([0.2, 0.8, 0.4], 3) == [1]
    assert "rank 1 voted against the majority" in caplog.text
    assert "absolute rule: mean 0.800 > threshold 0.500" in caplog.text
    assert "relative rule" not in caplog.text
    assert np.allclose(mon.means()[:2], [0.2, 0.8])
    assert mon.median is None and mon.margin_used is None
    # A rank that recovers leaves the flagged set.
    for step in range(4, 8):
        mon.record([0.2, 0.1, 0.4], step)
    assert mon.flagged == set() and mon.rules == {}


@pytest.mark.parametrize("bad", sorted(BAD))
def test_one_bad_rank_of_seven_is_flagged_and_honest_ranks_are_not(bad):
    seq = fractions(500, [BAD[bad]] + [HONEST] * 6, seed=1)
    mon = DisagreementMonitor()
    flagged = run(mon, seq)[mon.window - 1:]
    assert all(set(f) <= {0} for f in flagged), "an honest rank was flagged"
    assert np.mean([0 in f for f in flagged]) > 0.95
    assert mon.flagged == {0} and "relative" in mon.rules[0]


@pytest.mark.parametrize("bad", ["random", "zero"])
def test_absolute_rule_alone_misses_ranks_near_one_half(bad):
    """The reason for the relative rule: 0.5 is no line between 0.38 and 0.5."""
    seq = fractions(500, [BAD[bad]] + [HONEST] * 6, seed=1)
    mon = DisagreementMonitor(margin=None)
    flagged = run(mon, seq)[mon.window - 1:]
    assert np.mean([0 in f for f in flagged]) < 0.6


def test_no_false_flags_over_500_steps_of_honest_noise():
    # The model's noise, and the spread measured on digits (M = 7, clean run): persistent
    # per-rank levels 0.28-0.34 and a per-step standard deviation of 0.07.
    for levels, sd in [([HONEST] * 7, SD),
                       ([0.305, 0.297, 0.296, 0.342, 0.317, 0.326, 0.279], 0.07)]:
        for seed in range(3):
            mon = DisagreementMonitor()
            assert not any(run(mon, fractions(500, levels, sd, seed))), (levels, sd, seed)


@pytest.mark.parametrize("kwargs", [dict(), dict(margin=0.05, mad_k=0.0, noise_k=0.0),
                                    dict(threshold=0.45, window=7, margin=0.02, mad_k=3.0),
                                    dict(margin=0.02, mad_k=0.0, noise_k=1.0),
                                    dict(margin=None)])
@pytest.mark.parametrize("ranks", [2, 3, 7, 8])
def test_matches_a_reference_computed_another_way(kwargs, ranks):
    # Ranks spread between honest and inverted, three adversaries among eight at most.
    levels = np.linspace(HONEST - 0.05, 0.6, ranks)
    seq = fractions(200, levels, sd=0.08, seed=ranks)
    mon = DisagreementMonitor(**kwargs)
    ref = reference_flags(seq, mon.window, mon.threshold, mon.margin, mon.mad_k, mon.noise_k)
    assert run(mon, seq) == ref
    assert any(ref), "the case flags nothing: it tests nothing"


def test_two_ranks_use_the_absolute_rule_only(caplog):
    mon = DisagreementMonitor(window=3)
    with caplog.at_level(logging.WARNING):
        for step in range(3):
            # 0.35 apart, far over the margin: with a crowd the relative rule would fire.
            assert mon.record([0.1, 0.45], step) == []
    assert mon.median is None and mon.margin_used is None and mon.flagged == set()
    for step in range(3, 6):
        flagged = mon.record([0.38, 0.7], step)
    assert flagged == [1] and mon.rules == {1: ("absolute",)}
    assert "relative rule" not in caplog.text
    # The same gap with a third rank is a relative outlier.
    mon = DisagreementMonitor(window=3)
    assert run(mon, [[0.1, 0.1, 0.45]] * 3)[-1] == [2] and mon.rules == {2: ("relative",)}


def test_warning_names_the_rule_and_its_numbers(caplog):
    mon = DisagreementMonitor(window=5)
    with caplog.at_level(logging.WARNING):
        run(mon, [[0.49, 0.7] + [0.38] * 5] * 5, verbose=True)
    lines = caplog.text.splitlines()
    assert len(lines) == 2, caplog.text
    assert "rank 0 voted against the majority on 49.0% of coordinates" in lines[0]
    assert "relative rule: mean 0.490 - median 0.380 = 0.110 > margin 0.100" in lines[0]
    assert "absolute rule" not in lines[0]
    assert "rank 1 " in lines[1] and "absolute rule: mean 0.700 > threshold 0.500" in lines[1]
    assert "relative rule: mean 0.700 - median 0.380 = 0.320 > margin 0.100" in lines[1]
    assert mon.rules == {0: ("relative",), 1: ("absolute", "relative")}
    # No second warning while the ranks stay flagged.
    with caplog.at_level(logging.WARNING):
        mon.record([0.49, 0.7] + [0.38] * 5, 5)
    assert len(caplog.text.splitlines()) == 2


def test_spread_crowd_widens_the_margin():
    # Honest ranks 0.2 to 0.5: MAD 0.1, so the margin is 2 * 1.4826 * 0.1, not the 0.1 floor.
    honest = [0.2, 0.3, 0.35, 0.4, 0.5]
    mon = DisagreementMonitor(window=2, threshold=0.9)
    assert run(mon, [[0.6] + honest + [0.25]] * 2)[-1] == []  # 0.25 above the median 0.35
    assert mon.median == pytest.approx(0.35)
    assert mon.margin_used == pytest.approx(2 * 1.4826 * 0.1)
    assert run(mon, [[0.7] + honest + [0.25]] * 2)[-1] == [0]  # 0.35 above it


def test_recovered_rank_leaves_the_flagged_set():
    mon = DisagreementMonitor(window=4)
    assert run(mon, [[0.5] + [0.38] * 6] * 4)[-1] == [0]
    assert run(mon, [[0.4] + [0.38] * 6] * 4)[-1] == []
    assert mon.flagged == set() and mon.rules == {}


def test_positional_arguments_and_defaults_stay():
    mon = DisagreementMonitor(0.45, 10)
    assert (mon.threshold, mon.window, mon.margin, mon.mad_k) == (0.45, 10, 0.1, 2.0)
    with pytest.raises(TypeError):
        DisagreementMonitor(0.5, 20, 0.1)  # margin and mad_k are keyword-only


@pytest.mark.parametrize("kwargs, word", [
    (dict(threshold=0.0), "threshold"), (dict(threshold=1.0), "threshold"),
    (dict(window=0), "window"), (dict(window=2.0), "window"),
    (dict(margin=0.0), "margin"), (dict(margin=1.0), "margin"), (dict(margin=-0.1), "margin"),
    (dict(margin="0.1"), "margin"), (dict(margin=True), "margin"),
    (dict(mad_k=-1.0), "mad_k"), (dict(mad_k=float("inf")), "mad_k"),
    (dict(mad_k=float("nan")), "mad_k"), (dict(mad_k="2"), "mad_k"), (dict(mad_k=True), "mad_k"),
])
def test_bad_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        DisagreementMonitor(**kwargs)


def momentum_noise_fractions(steps: int, ranks: int, coords: int, seed: int) -> np.ndarray:
    """Each rank's per-step disagreement with the majority when every gradient is Gaussian
    noise and each rank keeps a momentum of 0.9 (Signum's), on ``coords`` coordinates, computed
    in numpy: ties (an even split) count for no one, as in the package's figure."""
    rng = np.random.default_rng(seed)
    m = np.zeros((ranks, coords))
    out = np.empty((steps, ranks))
    for t in range(steps):
        m = 0.9 * m + rng.standard_normal((ranks, coords))
        signs = np.sign(m)
        total = signs.sum(axis=0)
        decided = total != 0
        out[t] = ((signs != np.sign(total)) & decided).sum(axis=1) / coords
    return out


def test_honest_noise_on_few_coordinates_raises_no_warning():
    """#31: 4 honest ranks, 30 coordinates of noise, 5,000 steps: the windowed means range
    about 0.04-0.24 around a median near 0.12, and the margin and MAD terms alone flagged honest
    ranks (5 times in the package's own run); the step-to-step spread term keeps quiet."""
    seq = momentum_noise_fractions(5000, 4, 30, seed=0)
    alarms = {}
    for noise_k in (0.0, DisagreementMonitor().noise_k):
        mon = DisagreementMonitor(noise_k=noise_k)
        alarms[noise_k] = sum(1 for f in run(mon, seq) if f)
    assert alarms[0.0] > 0, "the case raises no alarm even without the noise term: it tests nothing"
    assert alarms[DisagreementMonitor().noise_k] == 0, alarms


def test_a_rank_without_a_figure_is_left_out_and_judged_on_the_steps_it_has():
    """Under a quorum a late rank's figure is NaN (the vote did not count it). Rank 2 has none
    at all: the flags equal those of a monitor that never saw it. Ranks 5 (honest) and 6 (an
    inverter) lack one step in two: 6 is still flagged, 5 never."""
    levels = [HONEST] * 6 + [BAD["inverter"]]
    seq = fractions(200, levels, seed=5)
    gaps = np.random.default_rng(6).random((200, 2)) < 0.5
    seq[:, 5:7][gaps] = np.nan
    seq[:, 2] = np.nan
    with_gap, without = DisagreementMonitor(), DisagreementMonitor()
    flagged = run(with_gap, seq)
    renamed = [[r + (r >= 2) for r in f] for f in run(without, np.delete(seq, 2, axis=1))]
    assert flagged == renamed
    assert all(f == [6] for f in flagged[with_gap.window:]), flagged


def quorum_fractions(steps, levels, inverter=None, seed=0):
    """A quorum's figures on 5 ranks, rank 4 slow: it is counted at 30% of the steps, those
    where all 5 were; otherwise 4 ranks are, or 3 (one of ranks 0-3 late too). An honest rank's
    figure is ``levels[k]`` for k voters, plus noise; an inverter's 0.3 above it. Returns the
    figures and each step's count."""
    rng = np.random.default_rng(seed)
    seq, counts = np.full((steps, 5), np.nan), []
    for t in range(steps):
        present = list(range(4)) + [4] * (rng.random() < 0.3)
        if len(present) == 4 and rng.random() < 0.5:
            present.remove(int(rng.integers(4)))
        k = len(present)
        seq[t, present] = levels[k] + 0.01 * rng.standard_normal(k)
        if inverter in present:
            seq[t, inverter] += 0.3
        counts.append(k)
    return seq, counts


def test_a_slow_rank_counted_only_with_the_most_voters_is_not_named():
    """Under a quorum a rank's disagreement grows with the number of ranks the vote counted. A
    slow rank counted only when everyone was on time sits at the top level: its plain mean is
    over the margin (checked here; a monitor on plain means without the noise term names it);
    each figure levelled by its step's median is not, with or without the noise term. An
    inverter among them is still named, and only it (the levels' jumps hid it in the plain
    figures' spread)."""
    levels = {3: 0.05, 4: 0.1, 5: 0.3}
    seq, _ = quorum_fractions(300, levels)
    plain = np.nanmean(seq[-20:], axis=0)
    assert plain[4] - np.median(plain) > 0.1, plain
    for mon in (DisagreementMonitor(), DisagreementMonitor(noise_k=0)):
        assert not any(run(mon, seq)), mon.rules
    bad, _ = quorum_fractions(300, levels, inverter=1, seed=1)
    flagged = run(DisagreementMonitor(), bad)
    assert all(f == [1] for f in flagged[20:]), flagged


def test_steps_with_fewer_than_three_voters_are_left_out():
    """Two voters never disagree (ties are left out): after an elastic shrink to 3 ranks with a
    quorum of 2, most steps carry 0 for the two on time and nothing for the slow one. Such steps
    say nothing about anyone: the slow rank is not named, an inverter is named on the steps with
    three voters, and with none of those in the window nobody is judged."""
    rng = np.random.default_rng(2)
    full = rng.random(200) < 0.25
    seq = np.zeros((200, 3))
    seq[:, 2] = np.nan
    seq[full] = 0.3 + 0.01 * rng.standard_normal((full.sum(), 3))
    assert not any(run(DisagreementMonitor(), seq))
    bad = seq.copy()
    bad[full, 1] += 0.3
    mon = DisagreementMonitor()
    flagged = run(mon, bad)
    assert all(f == [1] for f in flagged[20:] if f), flagged
    assert sum(1 for f in flagged if f == [1]) > 150, flagged
    silent = DisagreementMonitor(window=5)
    run(silent, np.vstack([bad[full][:5], np.tile([0.0, 0.0, np.nan], (5, 1))]))
    assert np.isnan(silent.means()).all() and silent.flagged == set()
