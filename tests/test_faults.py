"""Faults and bad input on real ranks: a diverged rank, a dead rank, odd tensors and
communicators, and a vector whose float buffer passes 2**31 bytes."""

import re
import time

import pytest

import mpirun


def test_consistency_check_catches_a_perturbed_rank():
    out = mpirun.run(3, "fault_check.py", "perturb")
    assert out.count("caught divergence") == 3  # every rank stops, not just the odd one


def test_dead_rank_ends_the_job_within_the_timeout():
    bound = 90  # MPISIGN_TIMEOUT is 60 s in tests; mpiexec usually notices the death sooner
    start = time.monotonic()
    out = mpirun.run(3, "fault_check.py", "kill", timeout=bound, env={"MPISIGN_TIMEOUT": "30"},
                     expect_fail=True)
    assert time.monotonic() - start < bound
    # Named either by the MPI launcher or by a surviving rank's VoteTimeout.
    assert re.search(r"rank 2 .*(signal 9|Killed)|no message from rank\(s\) \[2\]", out,
                     re.S), out[-2000:]
    assert "the job went on without a rank" not in out


def test_bad_input_gets_clear_errors_and_odd_tensors_work():
    out = mpirun.run(3, "fault_check.py", "badinput")
    assert "fault_check badinput OK on 3 ranks" in out


def test_vector_past_2_to_the_31_bytes():
    out = mpirun.run(2, "fault_check.py", "huge", timeout=600)
    assert "fault_check huge OK on 2 ranks" in out


@pytest.mark.parametrize("attack, k, n", [("invert", 2, 5), ("random", 2, 5), ("inf", 1, 3),
                                          ("nan", 1, 3)])
def test_vote_trains_through_blind_adversaries(attack, k, n):
    """90% test accuracy with K < M/2 adversaries; for inf/nan the fp32 mean breaks."""
    out = mpirun.run(n, "adversary_check.py", attack, str(k))
    assert f"adversary_check {attack} {k}/{n} OK" in out


ROLLCALL = re.compile(r"@rollcall rank=(\d+) (.*)")


@pytest.mark.parametrize("topology, stalled, how", [
    ("server", 2, "step"), ("server", 0, "step"), ("tree", 0, "step"), ("sharded", 1, "step"),
    ("allgather", 3, "step"), ("server", 1, "vote"), ("tree", 0, "vote")])
def test_a_stalled_rank_is_named_on_every_rank(topology, stalled, how):
    """Rank ``stalled`` is SIGSTOPped before step 3 and woken after the others gave up: every
    other rank names it (the roll call, whatever each one waited on: the root, a header's
    allgather), and the woken rank raises too, naming itself, with step 3 not applied; the
    same with majority_vote's calls (``vote``)."""
    out = mpirun.run(4, "rollcall_check.py", topology, str(stalled), "12",
                     *(["vote"] if how == "vote" else []), timeout=120,
                     env={"MPISIGN_TIMEOUT": "3"})
    said = {int(r): text for r, text in ROLLCALL.findall(out)}
    assert sorted(said) == [0, 1, 2, 3], out[-3000:]
    for rank, text in said.items():
        if rank == stalled:
            assert "steps=3 VoteTimeout" in text and "named this rank missing" in text, text
        else:
            assert f"rank(s) [{stalled}] did not answer" in text, (rank, text)
        assert "steps=3 " in text, (rank, text)   # no rank applied step 3
