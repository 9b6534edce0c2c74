"""Elastic optimizers on real ranks that really die (``mpirun --with-ft ulfm``, SIGKILL).

Usage: elastic_check.py TOPOLOGY KILLS [--mid] [--overlap] [--nodes 2,2]
       elastic_check.py vote TOPOLOGY KILLS [--mid]
       elastic_check.py quorum
       elastic_check.py straggler TOPOLOGY [--nodes 2,2]
       elastic_check.py vote-straggler TOPOLOGY
       elastic_check.py unavailable

  KILLS      who dies when: "2@3" (rank 2 kills itself at the start of step 3), "1@2,3@5", ...
  --mid      the first victim dies in the middle of its step: it is the server (rank 0) and it
             kills itself after sending that step's result to rank 1 alone, so rank 1 has
             finished the step and the other survivors have not
  --in-check the first victim dies in the consistency check after its step (check_every=1):
             its step is voted with it, and the survivors meet its death in their check
  --overlap  votes start from gradient hooks, one bucket per parameter
  --nodes    name the ranks' nodes ($MPISIGN_NODE), for the hierarchical vote

Every survivor trains to the end, then checks, against a single-process reference that replays
every rank's momentum and the majority of the ranks alive at each step (torch on one process,
not the package's vote), that its parameters equal the reference's bit for bit; that the
survivors hold identical parameters; that ``stats.lost_ranks`` names the victims and
``opt.comm`` holds the survivors; and that the loss fell about as far as in a clean run.

``vote``: the same deaths during calls of ``majority_vote(elastic=True)``: every survivor's
result of every call equals a numpy majority of the ranks alive in that call (of all of them
in the call where the server answered one worker before it died).

``quorum``: with ``min_ranks`` equal to the world, the last rank dies at step 2: every survivor
raises ``TooFewRanks`` naming the survivors, instead of carrying on.

``straggler``: ``Signum(quorum=size-1, elastic=True)`` with the last rank slow: never lost
while it is only slow; then rank 1 dies while the slow rank is steps behind, and the survivors
carry on, every one of them with the parameters of a replay of exactly the votes counted.

``vote-straggler``: the same with ``majority_vote(quorum=size-1, elastic=True)``: every
result equals a numpy majority of exactly the ranks ``stats["counted"]`` names (ranks of the
launch), including the calls whose results a survivor further on handed to the slow one,
which was calls behind when rank 1 died; each survivor prints a digest of all its results, for
the test to compare.

``unavailable``: ``elastic=True`` in a launch without fault tolerance raises
``ElasticUnavailable`` at construction, on every rank, saying how to enable it.
"""

import hashlib
import os
import signal
import sys
import time

import numpy as np
import torch
from common import WORLD, case, expect_everywhere, progress, rank_data, reference_vote

import mpisign
from mpisign.collectives import server
from mpisign.mpi.elastic import ElasticUnavailable
from mpisign.vote import vote_state

rank, size = WORLD.Get_rank(), WORLD.Get_size()
SHAPES = [(300,), (7, 11)]
STEPS, LR, BETA = 10, 0.05, 0.9


def targets():
    g = torch.Generator().manual_seed(11)
    return [torch.randn(s, generator=g) for s in SHAPES]


def gradient(r: int, step: int, params: list) -> list:
    """Rank r's gradient at ``step``: of 0.5 |x - T|^2 plus noise of its own (autograd on
    copies, so the reference computes exactly what the ranks compute)."""
    g = torch.Generator().manual_seed(1000 * step + r)
    xs = [p.detach().clone().requires_grad_(True) for p in params]
    loss = sum(0.5 * ((x - t) ** 2).sum() + (torch.randn(x.shape, generator=g) * x).sum()
               for x, t in zip(xs, targets()))
    loss.backward()
    return [x.grad for x in xs]


def loss_of(params: list) -> float:
    return float(sum(((p.detach() - t) ** 2).sum() for p, t in zip(params, targets())))


def reference(voters_at) -> list:
    """The parameters after STEPS steps when ``voters_at(step)`` ranks vote at each step."""
    params = [torch.zeros(s) for s in SHAPES]
    momenta = {r: [torch.zeros(s) for s in SHAPES] for r in range(size)}
    for step in range(STEPS):
        total = [torch.zeros(s) for s in SHAPES]
        for r in voters_at(step):
            m = momenta[r]
            torch._foreach_mul_(m, BETA)
            torch._foreach_add_(m, gradient(r, step, params), alpha=1 - BETA)
            for t, mi in zip(total, m):
                t.add_(torch.sign(mi))
        for p, t in zip(params, total):
            p.sub_(torch.sign(t) * LR)
    return params


def die() -> None:
    print(f"@victim rank={rank} dies", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def die_mid_broadcast(at: int) -> None:
    """Make this rank (the server) answer rank 1 alone at step ``at``, then die."""
    finish = server.ServerVote._finish

    def answer_one_then_die(self, p):
        if p.step != at:
            return finish(self, p)
        self._wait(p, "waiting for the workers' signs")
        plus, tie = self.tally(p.gathered, p.n)
        p.result[0] = plus
        if tie is not None:
            p.result[1] = tie
        self._isend(p, p.result, 1, server.RESULT)
        self._wait(p, "sending the result to rank 1")
        time.sleep(0.5)   # rank 1 takes the message before the sender is gone
        die()
    server.ServerVote._finish = answer_one_then_die


def run(topology: str, kills: dict, mid: bool, in_check: bool, overlap: bool) -> None:
    params = [torch.nn.Parameter(torch.zeros(s)) for s in SHAPES]
    opt = mpisign.Signum(params, lr=LR, momentum=BETA, comm=WORLD, topology=topology,
                         elastic=True, overlap=overlap, bucket_mb=1e-6,
                         check_every=1 if in_check else 0)
    first = min(kills, key=kills.get)
    late = mid or in_check   # the first victim votes in its last step, and dies after
    if mid:
        assert first == 0 and topology == "server", "--mid: the server, rank 0, dies"
        if rank == 0:
            die_mid_broadcast(kills[0])
    if in_check and rank == first:
        check = opt.check_consistency
        opt.check_consistency = lambda: die() if opt.stats.steps == kills[first] + 1 else check()
    before = loss_of(params)
    for step in range(STEPS):
        progress(step)
        if kills.get(rank) == step and not (late and rank == first):
            die()
        grads = gradient(rank, step, params)
        if overlap:   # the gradients arrive through autograd, so that the hooks fire
            loss = sum((p * g).sum() for p, g in zip(params, grads))
            loss.backward()
        else:
            for p, g in zip(params, grads):
                p.grad = g
        opt.step()
        opt.zero_grad(set_to_none=True)

    # The survivors: who they are, and what they hold.
    victims = sorted(kills)
    assert opt.stats.lost_ranks == victims, (opt.stats.lost_ranks, victims)
    assert opt.comm.Get_size() == size - len(victims), opt.comm.Get_size()
    assert opt.world_size == opt.comm.Get_size() and opt.rank == opt.comm.Get_rank()
    every = opt.comm.allgather(opt.params_digest())
    assert len(set(every)) == 1, "the survivors' parameters differ"

    def voters_at(step):   # a victim votes until it dies; a late one in its last step too
        return [r for r in range(size)
                if r not in kills or step < kills[r] or (late and r == first and step == kills[r])]
    expected = reference(voters_at)
    for p, e in zip(params, expected):
        assert torch.equal(p.detach(), e), f"differs from the reference in " \
            f"{int((p.detach() != e).sum())} of {e.numel()} coordinates"
    if late:   # the test can fail: had the step been voted again without the victim's vote,
        # the parameters would differ
        again = reference(lambda s: [r for r in voters_at(s) if not (r == first and s == kills[r])])
        assert any(not torch.equal(a, e) for a, e in zip(again, expected))
    clean = reference(lambda s: range(size))
    after, clean_after = loss_of(params), loss_of(clean)
    assert after < 0.6 * before, (before, after)
    assert after < 1.25 * clean_after, (after, clean_after)
    print(f"@elastic rank={rank} now={opt.rank} size={opt.comm.Get_size()} lost={victims} "
          f"loss {before:.2f}->{after:.2f} (clean {clean_after:.2f}) at={time.time():.3f}",
          flush=True)


def votes(topology: str, kills: dict, mid: bool) -> None:
    first = min(kills, key=kills.get)
    if mid:
        assert first == 0 and topology == "server", "--mid: the server, rank 0, dies"
        if rank == 0:
            die_mid_broadcast(kills[0])
    for call in range(STEPS):
        progress(call)
        if kills.get(rank) == call and not (mid and rank == first):
            die()
        stats = {}
        n = 1000 + 37 * call   # every call of another size: a new collective each time
        got = mpisign.majority_vote(rank_data(n, rank, call, zeros=0.0), WORLD, topology,
                                    elastic=True, stats=stats)
        voters = [r for r in range(size) if r not in kills or call < kills[r]
                  or (mid and r == first and call == kills[r])]
        want = reference_vote([rank_data(n, r, call, zeros=0.0) for r in voters])
        assert np.array_equal(got.numpy(), want), f"call {call}: differs from the majority " \
            f"of {voters} in {int((got.numpy() != want).sum())} of {n}"
        lost = sorted(r for r in kills if kills[r] <= call)
        if mid and call == kills[first]:   # the worker that the server answered lost no one
            assert stats["lost_ranks"] in (lost, lost[1:]), stats
        else:
            assert stats["lost_ranks"] == lost, stats
    print(f"@elastic rank={rank} now=? size={size - len(kills)} lost={sorted(kills)}",
          flush=True)


def quorum() -> None:
    params = [torch.nn.Parameter(torch.zeros(s)) for s in SHAPES]
    opt = mpisign.Signum(params, lr=LR, comm=WORLD, topology="tree", elastic=True,
                         min_ranks=size)
    for step in range(STEPS):
        progress(step)
        if step == 2 and rank == size - 1:
            die()
        for p, g in zip(params, gradient(rank, step, params)):
            p.grad = g
        try:
            opt.step()
        except mpisign.TooFewRanks as e:
            assert f"{size - 1} rank(s) survive ({list(range(size - 1))}" in str(e), e
            print(f"@toofew rank={rank} at step {step}: {e}", flush=True)
            return
    raise AssertionError("carried on below min_ranks")


def straggler(kill: int | None, lag: int, topology: str) -> None:
    """Signum(quorum=size-1, elastic=True): the last rank is slow (it sleeps before its
    gradient, as a stalled data loader would, and skips the steps whose votes closed without
    it); with ``kill``, rank 1 dies at the start of step ``kill`` while the slow one is still
    asleep, steps behind the others (``lag`` lets the root run that far ahead). Every survivor
    checks its parameters against a replay: each rank's momentum updated at the steps it
    computed (recorded), and each step's vote the majority of exactly the ranks its result says
    it counted (rank 0's record, in the launch's ranks)."""
    slow = size - 1
    naps = {3: 3.0} if kill is not None else {2: 1.0, 6: 1.0}
    params = [torch.nn.Parameter(torch.zeros(s)) for s in SHAPES]
    opt = mpisign.Signum(params, lr=LR, momentum=BETA, comm=WORLD, topology=topology,
                         elastic=True, quorum=size - 1, lag=lag)
    computed, counted, voters = [], {}, {}
    while opt.param_groups[0]["step"] < STEPS:
        step = opt.param_groups[0]["step"]
        progress(step)
        if rank == 1 and step == kill:
            die()
        if rank == slow:
            time.sleep(naps.get(step, 0.0))
        if opt.late():
            opt.skip()
        else:
            computed.append(step)
            for p, g in zip(params, gradient(rank, step, params)):
                p.grad = g
            opt.step()
        # What this step's vote counted (a step done again after a loss: its last vote).
        members = opt.engine.recovery.members
        counted[opt.param_groups[0]["step"] - 1] = [members[r] for r in opt.stats.counted]
        if opt.engine.plan is not None:
            voters[id(opt.engine.plan.voter)] = opt.engine.plan.voter
    opt.drain()
    # The vote on the revoked communicator, and the survivors': nothing left pending.
    assert len(voters) == (1 if kill is None else 2), voters
    assert [v.pending_requests() for v in voters.values()] == [0] * len(voters)

    lost = [] if kill is None else [1]
    assert opt.stats.lost_ranks == lost, opt.stats.lost_ranks     # the slow rank stays
    assert opt.comm.Get_size() == size - len(lost)
    if kill is not None:   # as many ranks may be late as before: 2 of the 3 survivors
        assert opt.engine.quorum == size - 2, opt.engine.quorum
    assert len(set(opt.comm.allgather(opt.params_digest()))) == 1, "the survivors differ"
    every_computed = dict(zip(opt.engine.recovery.members, opt.comm.allgather(computed)))
    if kill is not None:   # rank 1 computed every step until it died: never the late one
        every_computed[1] = list(range(kill))
    skipped = sorted(set(range(STEPS)) - set(every_computed[slow]))
    assert skipped, every_computed   # the slow rank fell behind, and caught up by skip()
    at = opt.comm.bcast(counted, root=0)   # rank 0 closes the votes: it has every step's
    assert any(slow not in at[s] for s in range(STEPS)), at

    ref = [torch.zeros(s) for s in SHAPES]
    momenta = {r: [torch.zeros(s) for s in SHAPES] for r in range(size)}
    for step in range(STEPS):
        for r in range(size):
            if step in every_computed.get(r, ()):
                torch._foreach_mul_(momenta[r], BETA)
                torch._foreach_add_(momenta[r], gradient(r, step, ref), alpha=1 - BETA)
        total = [torch.zeros(s) for s in SHAPES]
        for r in at[step]:
            for t, m in zip(total, momenta[r]):
                t.add_(torch.sign(m))
        for p, t in zip(ref, total):
            p.sub_(torch.sign(t) * LR)
    for p, e in zip(params, ref):
        assert torch.equal(p.detach(), e), f"differs from the replay in " \
            f"{int((p.detach() != e).sum())} of {e.numel()} coordinates: {at} {every_computed}"
    print(f"@straggler rank={rank} now={opt.rank} size={opt.comm.Get_size()} lost={lost} "
          f"quorum={opt.engine.quorum} skipped={skipped} counted={[at[s] for s in range(STEPS)]}",
          flush=True)


def vote_straggler(topology: str, kill: int | None) -> None:
    """majority_vote(quorum=size-1, elastic=True), the last rank slow (naps before its calls);
    with ``kill``, rank 1 dies at the start of call ``kill`` while the slow rank sleeps calls
    behind. Three sizes of call in turn, so that a result handed on for another call's size
    would show."""
    slow = size - 1
    naps = {2: 3.0} if kill is not None else {2: 1.0, 6: 1.0}
    results, late = hashlib.sha256(), []
    before = [c.voter for c in vote_state(WORLD).kept.values()]   # the votes to come, too
    for call in range(STEPS):
        progress(call)
        if rank == 1 and call == kill:
            die()
        if rank == slow:
            time.sleep(naps.get(call, 0.0))
        stats = {}
        n = 1000 + 37 * (call % 3)
        got = mpisign.majority_vote(rank_data(n, rank, call, zeros=0.0), WORLD, topology,
                                    quorum=size - 1, elastic=True, stats=stats)
        want = reference_vote([rank_data(n, r, call, zeros=0.0) for r in stats["counted"]])
        assert np.array_equal(got.numpy(), want), f"call {call}: differs from the majority " \
            f"of {stats['counted']} in {int((got.numpy() != want).sum())} of {n}"
        late += [call] if slow not in stats["counted"] else []
        results.update(got.numpy().tobytes() + bytes(stats["counted"]))
    mpisign.drain_votes(WORLD)
    lost = [] if kill is None else [1]
    assert stats["lost_ranks"] == lost, stats      # the slow rank stays
    assert late, "the slow rank was counted in every vote: the case tests nothing"
    if kill is not None:   # the votes on the revoked communicator: nothing left pending
        assert before and [v.pending_requests() for v in before] == [0] * len(before)
    print(f"@vote-straggler rank={rank} lost={lost} late={late} results={results.hexdigest()}",
          flush=True)


def unelastic(topology: str) -> None:
    """A launch with fault tolerance, an optimizer without elastic: the last rank dies at step
    2, and every survivor raises RanksLost naming it."""
    params = [torch.nn.Parameter(torch.zeros(s)) for s in SHAPES]
    opt = mpisign.Signum(params, lr=LR, comm=WORLD, topology=topology)
    for step in range(STEPS):
        progress(step)
        if step == 2 and rank == size - 1:
            die()
        for p, g in zip(params, gradient(rank, step, params)):
            p.grad = g
        try:
            opt.step()
        except mpisign.RanksLost as e:
            assert f"rank(s) [{size - 1}] of the optimizer's {size} died at step" in str(e), e
            assert "elastic=True" in str(e)
            print(f"@lost rank={rank} at step {step}: {e}", flush=True)
            return
    raise AssertionError("a dead rank went unnoticed")


def unavailable() -> None:
    with expect_everywhere(ElasticUnavailable, "--with-ft ulfm") as raised:
        mpisign.Signum([torch.nn.Parameter(torch.zeros(3))], comm=WORLD, elastic=True)
    print(f"@unavailable rank={rank}: {raised.value}", flush=True)


def main(argv: list) -> None:
    if "--nodes" in argv:
        from common import name_nodes
        name_nodes(argv[argv.index("--nodes") + 1])
    if argv[0] == "quorum":
        with case("quorum"):
            quorum()
        return
    if argv[0] == "straggler":
        topology = argv[1]
        with case(f"quorum, elastic, {topology}: a slow rank, never lost"):
            straggler(None, lag=2, topology=topology)
        with case(f"quorum, elastic, {topology}: a rank dies while the slow one is steps behind"):
            straggler(5, lag=4, topology=topology)
        return
    if argv[0] == "vote-straggler":
        topology = argv[1]
        with case(f"majority_vote, quorum, elastic, {topology}: a slow rank, never lost"):
            vote_straggler(topology, None)
        with case(f"majority_vote, quorum, elastic, {topology}: a rank dies while the slow one "
                  f"is calls behind"):
            vote_straggler(topology, 5)
        return
    if argv[0] == "unelastic":
        with case(f"unelastic {argv[1]}"):
            unelastic(argv[1])
        return
    if argv[0] == "unavailable":
        with case("unavailable"):
            unavailable()
        return
    if argv[0] == "vote":
        kills = dict(tuple(int(x) for x in k.split("@")) for k in argv[2].split(","))
        with case(f"majority_vote {argv[1]} kills {kills}"):
            votes(argv[1], kills, "--mid" in argv)
        return
    topology, kills = argv[0], dict(tuple(int(x) for x in k.split("@")) for k in argv[1].split(","))
    with case(f"elastic {topology} kills {kills}"):
        run(topology, kills, "--mid" in argv, "--in-check" in argv, "--overlap" in argv)


if __name__ == "__main__":
    main(sys.argv[1:])
