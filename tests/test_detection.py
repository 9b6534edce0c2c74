"""DisagreementMonitor: windowed per-rank disagreement and its warnings."""

import logging

import numpy as np
import pytest

from mpisign import DisagreementMonitor


def test_flags_only_ranks_over_threshold_after_a_full_window(caplog):
    mon = DisagreementMonitor(threshold=0.5, window=4)
    rng = np.random.default_rng(0)
    with caplog.at_level(logging.WARNING):
        for step in range(3):
            assert mon.record([0.2, 0.8, 0.45 + 0.1 * rng.random()], step) == []
        assert mon.record([0.2, 0.8, 0.4], 3) == [1]
    assert "rank 1 voted against the majority" in caplog.text
    assert np.allclose(mon.means()[:2], [0.2, 0.8])
    # A rank that recovers leaves the flagged set.
    for step in range(4, 8):
        mon.record([0.2, 0.1, 0.4], step)
    assert mon.flagged == set()


@pytest.mark.parametrize("kwargs", [dict(threshold=0.0), dict(threshold=1.0), dict(window=0)])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        DisagreementMonitor(**kwargs)
