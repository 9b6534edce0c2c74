"""The quorum vote (mpisign.collectives.quorum) on real ranks, through majority_vote: late ranks
made late on purpose (a sleep before their call), every result checked against a numpy majority
of exactly the ranks the result says it counted, on their inputs of that step.

- ``late``: ranks late at chosen steps (the root never: it closes the vote). A late rank's input
  at the step it is late flips the sign of every coordinate it holds at the next step, so a stale
  message counted in the next step would change that step's result; the next step waits for it
  (the others sleep), so it is counted there with its fresh signs.
- ``ties``: 4 ranks, quorum 3: 3 voters (no tie possible) and 4 voters (ties give 0), the zero
  rule among the counted ranks.
- ``drain``: no request left pending once drain_votes has run, with a rank two steps late at
  the end and messages past the eager limit (its late sends complete only when received).
- ``again``: votes of the same kind after a drain, with the last rank late at the vote
  before it: the root still waits in the drain for that rank's message while the others have
  drained and begun the next vote. Their messages, taken by the drain, are counted there.
- ``bad``: the errors of bad options, on every rank before any message.

- ``kinds``: two kinds of quorum call taking turns on one communicator, each with its own tags.

Usage: quorum_check.py late QUORUM | kinds | ties | drain | again | ties,drain | bad | signum
       | mistakes
"""

import os
import sys
import time

import numpy as np
import torch
from common import WORLD, case, expect_everywhere, name_nodes, progress

import mpisign
from mpisign.vote import drain_votes, vote_state

comm = WORLD
rank, size = comm.Get_rank(), comm.Get_size()
N = 1000
#: The quorum vote's topology under test: "server" (its root closes each vote), "sharded",
#: "hierarchical" or "tree" (those votes among the ranks a roll call at the root counts). The
#: hierarchical vote's nodes: consecutive ranks in nodes of $QUORUM_NODES's sizes ("2,2").
TOPOLOGY = os.environ.get("QUORUM_TOPOLOGY", "server")
if TOPOLOGY == "hierarchical":
    name_nodes(os.environ["QUORUM_NODES"])


def reference(inputs: dict, step: int) -> np.ndarray:
    """sign(sum over the counted ranks of sign(x_r)), 0 or NaN voting +1 for odd rank + step."""
    total = np.zeros(N, dtype=np.int64)
    for r, x in inputs.items():
        a = x.numpy().astype(np.float64)
        s = np.sign(a).astype(np.int64)
        s[a == 0] = 1 if (r + step) % 2 else -1
        total += s
    return np.sign(total)


def data(step: int, r: int) -> torch.Tensor:
    rng = np.random.default_rng([step, r])
    x = rng.standard_normal(N)
    x[rng.random(N) < 0.05] = 0.0
    return torch.from_numpy(x).float()


def run_steps(late_at: dict, quorum, steps: int, grace: float = 0.0, kinds: int = 1):
    """A first call with every rank (it makes the vote's communicator: collective), then
    ``steps`` steps: at each, the ranks ``late_at[step]`` sleep 1 s before voting; where the
    root is among them it sleeps 2 s instead, so that every worker's signs are in when it
    closes the vote. With ``kinds`` > 1, the steps take turns among that many kinds of call
    (graces differing by 1 ns: each its own collective on the one communicator). Returns this
    rank's inputs, results and counted sets."""
    graces = [grace + 1e-9 * k for k in range(kinds)]
    for g in graces:
        mpisign.majority_vote(torch.ones(N), comm, TOPOLOGY, quorum=quorum, grace=g)
    inputs, results, counted = [], [], []
    for step in range(1, steps + 1):
        x = data(step, rank)
        if rank in late_at.get(step - 1, ()) and rank != 0:
            x = -inputs[-1]   # a stale message counted now would flip this rank's votes
        if rank in late_at.get(step, ()):
            time.sleep(2.0 if rank == 0 else 1.0)
        stats = {}
        y = mpisign.majority_vote(x, comm, TOPOLOGY, quorum=quorum, grace=graces[step % kinds],
                                  stats=stats)
        inputs.append(x)
        results.append(y.numpy().copy())
        counted.append(stats["counted"])
        progress(step)
    return inputs, results, counted


def check_against_reference(inputs, results, counted, first: int = 1):
    every_input = comm.allgather(inputs)
    every_result = comm.allgather(results)
    every_counted = comm.allgather(counted)
    for i in range(len(inputs)):
        assert all(c[i] == counted[i] for c in every_counted), (i, every_counted)
        for r in range(size):
            assert np.array_equal(every_result[r][i], results[i]), (i, r)
        # The call's step: majority_vote's count on the communicator (``first`` calls before).
        ref = reference({r: every_input[r][i] for r in counted[i]}, i + first)
        assert np.array_equal(results[i], ref), (i, counted[i])


mode = sys.argv[1]
modes = mode.split(",")   # "ties,drain": one launch, one after the other
if "late" in modes:
    quorum = int(sys.argv[2])
    late, spare = size - 1, size - quorum
    # Step 1: the last rank late; step 2: the root waits, so the late rank's fresh signs are
    # counted and its stale ones dropped; step 4: as many ranks late as the quorum lets.
    late_at = {1: {late}, 2: {0}, 4: set(range(size - spare, size))}
    with case(f"late {quorum} of {size}"):
        inputs, results, counted = run_steps(late_at, quorum, 6)
        # Closed at the quorum: the late ranks are never among the counted, the others may be.
        assert late not in counted[0] and len(counted[0]) >= quorum, counted
        assert counted[1] == list(range(size)), counted     # fresh signs, stale ones dropped
        assert set(counted[3]).isdisjoint(late_at[4]) and len(counted[3]) >= quorum, counted
        check_against_reference(inputs, results, counted)
        voter = [c.voter for c in vote_state(comm).kept.values()][0]
        assert voter.abstained[late] >= 2, voter.abstained
        drain_votes(comm)
        assert voter.pending_requests() == 0
        if rank == 0:   # the late messages of steps 1 and 4 at least, dropped
            assert voter.dropped >= 1 + spare, voter.dropped
if "kinds" in modes:
    # Two kinds of quorum call on one communicator, taking turns, the root's receives of each
    # standing between its votes: a message of one kind is never taken by the other's.
    late = size - 1
    with case("two kinds"):
        inputs, results, counted = run_steps({1: {late}, 2: {0}, 5: {late}, 6: {0}}, size - 1,
                                             8, kinds=2)
        assert late not in counted[0] and late not in counted[4], counted
        assert counted[1] == counted[5] == list(range(size)), counted   # waited for: counted
        check_against_reference(inputs, results, counted, first=2)
        drain_votes(comm)
        voters = [c.voter for c in vote_state(comm).kept.values()]
        assert len({v.channel for v in voters}) == 2, [v.channel for v in voters]
        assert [v.pending_requests() for v in voters] == [0, 0]
if "ties" in modes:
    with case("ties"):
        inputs, results, counted = run_steps({1: {3}, 2: {0}, 3: {2}, 4: {0}}, 3, 4)
        assert [len(c) for c in counted] == [3, 4, 3, 4], counted
        check_against_reference(inputs, results, counted)
        assert (results[1] == 0).any() and (results[3] == 0).any()   # ties among 4 give 0
        assert not (results[0] == 0).any() and not (results[2] == 0).any()   # 3: no tie
        drain_votes(comm)
if "drain" in modes:
    N = 1 << 22   # 512 KiB of signs a rank: past the eager limit, each message a rendezvous
    with case("drain"):
        # The last rank late at the last two steps: two of its messages still to take.
        run_steps({2: {size - 1}, 3: {size - 1}}, size - 1, 3)
        drain_votes(comm)
        voters = [c.voter for c in vote_state(comm).kept.values()]
        assert [v.pending_requests() for v in voters] == [0] * len(voters)
if "again" in modes:
    with case("again"):
        run_steps({3: {size - 1}}, size - 1, 3)
        drain_votes(comm)
        first = vote_state(comm).step + 1   # run_steps' first call, with every rank
        inputs, results, counted = run_steps({}, size - 1, 3)
        check_against_reference(inputs, results, counted, first=first)
        drain_votes(comm)
        voters = [c.voter for c in vote_state(comm).kept.values()]
        assert [v.pending_requests() for v in voters] == [0] * len(voters)
if "bad" in modes:
    x = torch.ones(4)
    for quorum, match in [(size + 1, "between 1 and"), (size // 2, "not a majority"),
                          ("3", "number of ranks"), (1.5, r"in \(0, 1\]"), (True, "number")]:
        with case(f"bad quorum {quorum!r}"), expect_everywhere(ValueError, match):
            mpisign.majority_vote(x, comm, quorum=quorum)
    with case("allgather"), expect_everywhere(ValueError, "topology='server'"):
        mpisign.majority_vote(x, comm, topology="allgather", quorum=size - 1)
    with case("grace"), expect_everywhere(ValueError, "grace"):
        mpisign.majority_vote(x, comm, quorum=size - 1, grace=-1.0)
    with case("minority allowed"):
        y = mpisign.majority_vote(x, comm, quorum=size // 2, allow_minority=True)
        assert (y == 1).all()
        drain_votes(comm)
    with case("fraction"):
        stats = {}
        y = mpisign.majority_vote(x, comm, quorum=0.75, stats=stats)
        assert (y == 1).all() and len(stats["counted"]) >= -(-3 * size // 4)
        drain_votes(comm)
if set(modes) & {"late", "kinds", "ties", "drain", "again", "bad"}:
    print(f"quorum_check OK on {size} ranks: {' '.join(sys.argv[1:])} ({TOPOLOGY})", flush=True)


# -- the optimizer: Signum(quorum=) -----------------------------------------------------------
class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1234)
        self.body = torch.nn.Linear(11, 6)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


def gradients(model, r, step):
    model.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(1000 * step + r)
    x, y = torch.randn(4, 11, generator=g), torch.randn(4, 3, generator=g)
    torch.nn.functional.mse_loss(model(x), y).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def signum_run(steps: int, late: int, sleeps: dict, lr=0.01, beta=0.9, wd=0.01):
    """Signum(quorum=size-1): rank ``late`` sleeps ``sleeps[step]`` = ("before" | "after", s)
    its gradient; every rank skips a step whose vote has closed without it. Returns the
    model, the optimizer, the counted sets and this rank's skipped steps."""
    model = Net()
    opt = mpisign.Signum(model.parameters(), lr=lr, momentum=beta, weight_decay=wd, comm=comm,
                         topology=TOPOLOGY, quorum=size - 1)
    counted, skipped = [], []
    for step in range(steps):
        when, seconds = sleeps.get(step, (None, 0)) if rank == late else (None, 0)
        if when == "before":
            time.sleep(seconds)   # a slow data loader
        if opt.late():
            opt.skip()
            skipped.append(step)
        else:
            for p, g in zip(model.parameters(), gradients(model, rank, step)):
                p.grad = g
            if when == "after":
                time.sleep(seconds)   # a slow backward pass: its signs come late
            opt.step()
        counted.append(opt.stats.counted)
        progress(step)
    return model, opt, counted, skipped


def signum_reference(steps, counted, skipped_by_rank, lr=0.01, beta=0.9, wd=0.01):
    """Every rank replayed here: each its own momentum (not updated at a step it skipped), the
    vote a numpy majority of the counted ranks' momentum signs, with the zero rule."""
    ref = Net()
    params = list(ref.parameters())
    mom = [[torch.zeros_like(p) for p in params] for _ in range(size)]
    for step in range(steps):
        every = [gradients(ref, r, step) for r in range(size)]
        with torch.no_grad():
            total = [np.zeros(p.numel(), dtype=np.int64) for p in params]
            for r in range(size):
                if step not in skipped_by_rank[r]:
                    for i, g in enumerate(every[r]):
                        mom[r][i] = beta * mom[r][i] + (1 - beta) * g
                if r not in counted[step]:
                    continue
                for i in range(len(params)):
                    m = mom[r][i].reshape(-1).double().numpy()
                    total[i] += np.where(m > 0, 1, np.where(m < 0, -1,
                                                            1 if (r + step) % 2 else -1))
            for p, t in zip(params, total):
                v = torch.from_numpy(np.sign(t).astype(np.float64)).to(p.dtype).view_as(p)
                p.copy_(p - lr * (v + wd * p))
    return ref


if mode == "signum":
    late = size - 1
    steps = 9
    sleeps = {2: ("before", 1.0), 5: ("after", 1.0)}
    with case("signum quorum: late ranks, skips, against the replay"):
        model, opt, counted, skipped = signum_run(steps, late, sleeps)
        every_counted = comm.allgather(counted)
        assert all(c == counted for c in every_counted), every_counted
        assert len(set(comm.allgather(opt.params_digest()))) == 1, "ranks diverged"
        skipped_by_rank = comm.allgather(skipped)
        assert skipped_by_rank[late], skipped_by_rank   # it fell behind, and caught up
        assert any(late not in c for c in counted), counted
        assert opt.stats.abstentions[late] >= 2 and opt.stats.skipped == len(skipped)
        ref = signum_reference(steps, counted, skipped_by_rank)
        for p, q in zip(model.parameters(), ref.parameters()):
            err = (p - q).abs().max().item()
            assert err < 1e-6, f"differs from the replay by {err}: {counted} {skipped_by_rank}"
        opt.drain()
        assert opt.engine.plan.voter.pending_requests() == 0
        assert not opt.engine.ranks.lagged
    with case("signum quorum: skip() on a rank that is not late"), \
            expect_everywhere(ValueError, "not late"):
        model = Net()
        o = mpisign.Signum(model.parameters(), lr=0.01, comm=comm, quorum=size - 1)
        for p, g in zip(model.parameters(), gradients(model, rank, 0)):
            p.grad = g
        o.step()
        o.skip()   # nobody has voted on step 1 yet: no rank is late
elif mode == "mistakes":
    from mpisign.optim.quorate import LAG, MissingGradient

    with case("quorum: an lr on rank 1 alone is raised on every rank, LAG steps on"):
        model = Net()
        opt = mpisign.Signum(model.parameters(), lr=0.01, comm=comm, quorum=size - 1)
        reached = []
        with expect_everywhere(mpisign.HyperparameterMismatch, r"rank\(s\) \[1\]"):
            for step in range(8):
                if rank == 1 and step == 3:
                    opt.param_groups[0]["lr"] = 0.02
                for p, g in zip(model.parameters(), gradients(model, rank, step)):
                    p.grad = g
                reached.append(step)
                opt.step()
        assert reached[-1] == 3 + LAG, reached   # every rank at the same step
    with case("quorum: a missing gradient is raised on every rank"):
        model = Net()
        opt = mpisign.Signum(model.parameters(), lr=0.01, comm=comm, quorum=size - 1)
        with expect_everywhere(MissingGradient, r"rank\(s\) \[2\]"):
            for step in range(8):
                for p, g in zip(model.parameters(), gradients(model, rank, step)):
                    p.grad = g
                if rank == 2 and step == 1:
                    model.head.bias.grad = None
                opt.step()
    with case("quorum: bad options"):
        params = Net().parameters()
        for kwargs, match in [(dict(quorum=size + 1), "between 1"),
                              (dict(quorum=size - 1, topology="allgather"), "topology='server'"),
                              (dict(quorum=size - 1, overlap=True), "overlap"),
                              (dict(quorum=1), "not a majority")]:
            with expect_everywhere(ValueError, match):
                mpisign.Signum(params, lr=0.01, comm=comm, **kwargs)
if mode in ("signum", "mistakes"):
    print(f"quorum_check OK on {size} ranks: {mode} ({TOPOLOGY})", flush=True)
