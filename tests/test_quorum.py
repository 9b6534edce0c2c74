"""The quorum vote (mpisign.collectives.quorum): late ranks abstain, every rank applies the same
result, and it is the majority of exactly the ranks it names; on real ranks
(tests/mpi/quorum_check.py) against a numpy majority of the counted ranks' inputs."""

from __future__ import annotations

from fractions import Fraction

import pytest

import mpirun
from mpisign.collectives.quorum import check_quorum_topology, resolve_quorum, survivors_quorum


#: The hierarchical vote's nodes on n ranks: 3 and 5 ranks so that one node's ranks are all
#: late at some step (quorum_check's "late": the last rank, then the last n - quorum ranks)
#: and, on 5, also a late rank whose node still votes; 4 (ties) for nodes of 2 and 2.
NODES = {3: "2,1", 4: "2,2", 5: "3,2"}


def quorum_check(n: int, *args: str, topology: str = "server", timeout: float = 120) -> None:
    """tests/mpi/quorum_check.py on n ranks, its quorum votes of ``topology`` (hierarchical: on
    nodes of :data:`NODES`' sizes)."""
    out = mpirun.run(n, "quorum_check.py", *args, timeout=timeout,
                     env={"QUORUM_TOPOLOGY": topology, "QUORUM_NODES": NODES[n]})
    assert f"quorum_check OK on {n} ranks: {' '.join(args)} ({topology})" in out, out[-2000:]


@pytest.mark.parametrize("n, quorum, topology", [
    (3, 2, "server"), (4, 3, "server"), (5, 4, "server"), (5, 3, "server"),
    (3, 2, "sharded"), (5, 3, "sharded"), (3, 2, "hierarchical"), (5, 3, "hierarchical"),
    (3, 2, "tree"), (5, 3, "tree")])
def test_late_ranks_abstain_and_stale_signs_never_count(n, quorum, topology):
    quorum_check(n, "late", str(quorum), topology=topology)


@pytest.mark.parametrize("topology", ["server", "sharded", "hierarchical", "tree"])
def test_ties_and_the_zero_rule_and_no_request_pending_after_the_drain(topology):
    """Ties and the zero rule with 3 and 4 voters; then, in the same launch, no request left
    pending after the drain, with a rank late at the last two votes and messages past the
    eager limit; then votes of one kind go on after a drain that took the next vote's
    messages (they were dropped, and the vote waited for them until its timeout)."""
    quorum_check(4, "ties,drain,again", topology=topology, timeout=180)


@pytest.mark.parametrize("topology", ["server", "sharded"])
def test_two_kinds_of_quorum_call_on_one_communicator_keep_their_own_messages(topology):
    quorum_check(3, "kinds", topology=topology)


def test_bad_options_raise_on_every_rank():
    quorum_check(3, "bad")


@pytest.mark.parametrize("quorum, size, count", [
    (None, 4, 4), (3, 4, 3), (4, 4, 4), (0.75, 4, 3), (0.7, 4, 3), (0.51, 4, 3), (1.0, 5, 5),
    (Fraction(2, 3), 6, 4), (1, 1, 1), (2, 3, 2)])
def test_a_quorum_is_a_count_or_a_fraction_rounded_up(quorum, size, count):
    assert resolve_quorum(quorum, size) == count


@pytest.mark.parametrize("quorum, size, match", [
    (5, 4, "between 1 and the 4 ranks"), (0, 4, "between 1"), (2, 4, "not a majority"),
    (0.5, 4, "not a majority"), (1.5, 4, r"in \(0, 1\]"), (-0.5, 4, r"in \(0, 1\]"),
    ("3", 4, "number of ranks"), (True, 4, "number of ranks")])
def test_bad_quorums_are_refused(quorum, size, match):
    with pytest.raises(ValueError, match=match):
        resolve_quorum(quorum, size)


def test_a_minority_needs_to_be_asked_for():
    assert resolve_quorum(2, 4, allow_minority=True) == 2
    assert resolve_quorum(0.25, 8, allow_minority=True) == 2


@pytest.mark.parametrize("quorum, before, after, kept", [
    (3, 4, 3, 2),     # one rank may be late, before and after
    (4, 5, 3, 2),     # ... but never fewer than a majority of the survivors
    (2, 3, 2, 2),     # two survivors: both (a majority of 2)
    (5, 8, 5, 3),     # three may be late of 8: of 5, a majority is 3
    (8, 8, 6, 6),     # all of them stays all of them
    (2, 4, 3, 1),     # a minority, allowed: as many late as before
    (1, 3, 1, 1)])
def test_the_survivors_quorum_lets_as_many_ranks_be_late_as_before(quorum, before, after, kept):
    assert survivors_quorum(quorum, before, after) == kept


@pytest.mark.parametrize("topology", ["allgather", "auto"])
def test_topologies_that_cannot_close_on_a_quorum_say_why(topology):
    with pytest.raises(ValueError, match="topology='server', 'sharded', 'hierarchical' or 'tree'"):
        check_quorum_topology(topology)
    for topology in ("server", "sharded", "hierarchical", "tree"):
        check_quorum_topology(topology)


@pytest.mark.parametrize("n, topology", [(3, "server"), (4, "server"), (5, "server"),
                                         (4, "sharded"), (5, "sharded"), (5, "hierarchical"),
                                         (5, "tree")])
def test_signum_with_a_quorum_matches_a_replay_of_the_ranks_it_counted(n, topology):
    """Late ranks (a slow loader, a slow backward) abstain, skip to catch up, and every rank's
    parameters equal a one-process replay of each rank's momentum and the counted votes."""
    quorum_check(n, "signum", topology=topology, timeout=180)


def test_a_rank_s_own_mistake_is_raised_on_every_rank_under_a_quorum():
    quorum_check(4, "mistakes", timeout=180)


def test_a_straggler_is_slow_as_told():
    import argparse

    from mpisign.train.straggler import Straggler, parse_straggle

    assert str(parse_straggle("3:x2")) == "3:x2" and str(parse_straggle("1:0.5@0.1")) == "1:0.5@0.1"
    for bad in ("3", "x:1", "1:0.5@0", "1:0.5@1.5", "1:x0.9"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_straggle(bad)
    none = Straggler(["3:x2"], rank=1, seed=0)
    assert none(0.01) == 0.0
    twice = Straggler(["3:x2"], rank=3, seed=0)
    assert twice(0.01) == pytest.approx(0.01)        # as long again as its compute
    some = Straggler(["2:0.001@0.25"], rank=2, seed=0)
    slept = [some(0.0) for _ in range(400)]
    assert 60 <= sum(1 for s in slept if s) <= 140   # a quarter of the steps, seeded
    again = Straggler(["2:0.001@0.25"], rank=2, seed=0)
    assert [again(0.0) for _ in range(400)] == slept


@pytest.mark.parametrize("lag", [0, -1, 1.5, True, "2"])
def test_a_bad_lag_is_refused(lag):
    import torch
    from mpi4py import MPI

    import mpisign

    with pytest.raises(ValueError, match="lag must be an int >= 1"):
        mpisign.Signum([torch.nn.Parameter(torch.zeros(3))], lr=1e-3, comm=MPI.COMM_SELF,
                       lag=lag)


def test_the_hierarchical_quorum_lays_its_shards_over_the_counted_ranks_only():
    """NodeLayout: a node votes with its counted ranks, a node with none is left out, and a
    rank of a smaller node owns several shards (the hierarchical vote's rule, s mod L)."""
    from mpisign.collectives.hierarchical import NodeLayout

    nodes = [[0, 1, 2], [3, 4]]
    without_4 = [[r for r in m if r != 4] for m in nodes]
    at = NodeLayout.of(without_4, 3)
    assert at.members == ((0, 1, 2), (3,)) and at.sizes == (3, 1) and at.voters == 4
    assert at.node == 1 and at.shards == 3 and at.owned == (0, 1, 2)
    assert [at.owner(0, s) for s in range(3)] == [0, 1, 2]
    assert NodeLayout.of(without_4, 4).node is None and NodeLayout.of(without_4, 4).owned == ()
    whole_node_late = NodeLayout.of([[0, 1, 2], []], 1)
    assert whole_node_late.members == ((0, 1, 2),) and whole_node_late.owned == (1,)


@pytest.mark.parametrize("ranks,modes", [(4, "slow,zeros,invert"), (3, "slow,zeros")])
def test_the_monitor_names_no_slow_rank_and_still_the_inverter(ranks, modes):
    """Signum(quorum=M-1) with a DisagreementMonitor, the last rank slow at every step
    (tests/mpi/quorum_monitor_check.py): no rank named with a slow one, with or without inputs
    that are always 0; on 4 ranks an inverter among them named, and only it. On 3 ranks (as
    after an elastic shrink from 4) most votes count two ranks, which never disagree: the slow
    rank, counted only with all three, was named before those votes were left out. An inverter
    is not tested there: two voters cannot show it."""
    out = mpirun.run(ranks, "quorum_monitor_check.py", modes, timeout=180)
    assert f"quorum_monitor_check OK on {ranks} ranks: {modes}" in out, out[-2000:]


def test_a_quorum_stages_its_words_through_host_memory(monkeypatch):
    """A quorum vote runs on host words (its root's standing receives, the results it keeps
    in flight for late ranks). Where every rank could keep its words on the device (CUDA-aware
    MPI), the optimizer's quorum and majority_vote's take the staged path (GPU kernels, words
    through host memory), where both refused CUDA tensors before. On a GPU node
    tests/mpi/gpu_check.py runs it for real."""
    import torch
    from mpi4py import MPI

    from mpisign import vote
    from mpisign.backends import signs
    from mpisign.cuda import startup
    from mpisign.optim import ranks
    from mpisign.optim.quorate import Quorate
    levels = [None, startup.HOST, startup.STAGED, startup.RESIDENT]
    assert [signs.staged_at_most(level) for level in levels] == [
        None, startup.HOST, startup.STAGED, startup.STAGED]
    monkeypatch.setattr(ranks.Ensemble, "gpu_level", lambda self, params: startup.RESIDENT)
    assert Quorate.gpu_level(object.__new__(Quorate), []) == startup.STAGED
    asked = []
    real = signs.signs_for
    monkeypatch.setattr(signs, "signs_for", lambda t, agreed=None: asked.append(agreed) or
                        real(t, None))
    like = torch.zeros(10)
    vote._Call("server", MPI.COMM_SELF, 10.0, like, startup.RESIDENT, quorum=1)
    vote._Call("server", MPI.COMM_SELF, 10.0, like, startup.RESIDENT)
    assert asked == [startup.STAGED, startup.RESIDENT]
