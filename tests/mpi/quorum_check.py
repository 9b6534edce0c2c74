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
- ``bad``: the errors of bad options, on every rank before any message.

Usage: quorum_check.py late QUORUM | ties | drain | bad
"""

import sys
import time

import numpy as np
import torch
from common import WORLD, case, expect_everywhere, progress

import mpisign
from mpisign.vote import drain_votes, vote_state

comm = WORLD
rank, size = comm.Get_rank(), comm.Get_size()
N = 1000


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


def run_steps(late_at: dict, quorum, steps: int, grace: float = 0.0):
    """A first call with every rank (it makes the vote's communicator: collective), then
    ``steps`` steps: at each, the ranks ``late_at[step]`` sleep 1 s before voting; where the
    root is among them it sleeps 2 s instead, so that every worker's signs are in when it
    closes the vote. Returns this rank's inputs, results and counted sets."""
    mpisign.majority_vote(torch.ones(N), comm, quorum=quorum, grace=grace)
    inputs, results, counted = [], [], []
    for step in range(1, steps + 1):
        x = data(step, rank)
        if rank in late_at.get(step - 1, ()) and rank != 0:
            x = -inputs[-1]   # a stale message counted now would flip this rank's votes
        if rank in late_at.get(step, ()):
            time.sleep(2.0 if rank == 0 else 1.0)
        stats = {}
        y = mpisign.majority_vote(x, comm, quorum=quorum, grace=grace, stats=stats)
        inputs.append(x)
        results.append(y.numpy().copy())
        counted.append(stats["counted"])
        progress(step)
    return inputs, results, counted


def check_against_reference(inputs, results, counted):
    every_input = comm.allgather(inputs)
    every_result = comm.allgather(results)
    every_counted = comm.allgather(counted)
    for i in range(len(inputs)):
        assert all(c[i] == counted[i] for c in every_counted), (i, every_counted)
        for r in range(size):
            assert np.array_equal(every_result[r][i], results[i]), (i, r)
        # The call's step: majority_vote's count on the communicator (the first call was 0).
        ref = reference({r: every_input[r][i] for r in counted[i]}, i + 1)
        assert np.array_equal(results[i], ref), (i, counted[i])


mode = sys.argv[1]
if mode == "late":
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
elif mode == "ties":
    with case("ties"):
        inputs, results, counted = run_steps({1: {3}, 2: {0}, 3: {2}, 4: {0}}, 3, 4)
        assert [len(c) for c in counted] == [3, 4, 3, 4], counted
        check_against_reference(inputs, results, counted)
        assert (results[1] == 0).any() and (results[3] == 0).any()   # ties among 4 give 0
        assert not (results[0] == 0).any() and not (results[2] == 0).any()   # 3: no tie
        drain_votes(comm)
elif mode == "drain":
    N = 1 << 22   # 512 KiB of signs a rank: past the eager limit, each message a rendezvous
    with case("drain"):
        # The last rank late at the last two steps: two of its messages still to take.
        run_steps({2: {size - 1}, 3: {size - 1}}, size - 1, 3)
        drain_votes(comm)
        voters = [c.voter for c in vote_state(comm).kept.values()]
        assert [v.pending_requests() for v in voters] == [0] * len(voters)
elif mode == "bad":
    x = torch.ones(4)
    for quorum, match in [(size + 1, "between 1 and"), (size // 2, "not a majority"),
                          ("3", "number of ranks"), (1.5, r"in \(0, 1\]"), (True, "number")]:
        with case(f"bad quorum {quorum!r}"), expect_everywhere(ValueError, match):
            mpisign.majority_vote(x, comm, quorum=quorum)
    with case("tree"), expect_everywhere(ValueError, "topology='server'"):
        mpisign.majority_vote(x, comm, topology="tree", quorum=size - 1)
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
print(f"quorum_check OK on {size} ranks: {' '.join(sys.argv[1:])}", flush=True)
