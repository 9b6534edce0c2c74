"""majority_vote over a torch.distributed process group (gloo, made beside MPI), on real ranks:
its result against a numpy majority of every rank's tensor (rebuilt from the seed), and against
the same call over MPI, bit for bit; the zero rule's step count; ``out=`` and ``stats``; a group
of some of the ranks; ranks that call it alike or not; the options a group cannot carry.

Usage: group_vote_check.py
"""

import numpy as np
import torch
import torch.distributed as dist
from common import WORLD, case, expect_everywhere, init_gloo, rank_data, reference_vote

from mpisign import majority_vote

rank, size = WORLD.Get_rank(), WORLD.Get_size()
init_gloo()
GROUP = dist.group.WORLD


def everyone(n: int, seed: int, dtype=torch.float32, ranks=None) -> list:
    xs = [rank_data(n, r, seed, dtype) for r in (range(size) if ranks is None else ranks)]
    for x in xs:
        x[::97] = float("nan")   # NaN votes as 0 does
    return xs


for topology in ("server", "allgather", "sharded", "tree"):
    for n, dtype in ((1, torch.float32), (130, torch.float32), (1000, torch.float32),
                     (4099, torch.bfloat16), (70_001, torch.float64)):
        with case(f"{topology} {dtype} n={n}: numpy's majority, and MPI's bits"):
            xs = everyone(n, seed=n, dtype=dtype)
            for step in (0, 1, 7):
                stats = {}
                got = majority_vote(xs[rank].view(-1, 1) if n > 1 else xs[rank], comm=GROUP,
                                    topology=topology, step=step, stats=stats)
                assert got.dtype == dtype and got.numel() == n
                expect = reference_vote(xs, step)
                assert np.array_equal(got.reshape(-1).to(torch.float64).numpy(), expect), step
                mpi_stats = {}
                over_mpi = majority_vote(xs[rank], comm=WORLD, topology=topology, step=step,
                                         stats=mpi_stats)
                assert torch.equal(got.reshape(-1), over_mpi), step
                if topology == "server" and rank:   # a worker sends its words, no more
                    assert stats["bytes_sent"] == 8 * -(-n // 64), stats
                if topology != "sharded":   # the same messages as over MPI (sharded pads)
                    assert stats == mpi_stats, (stats, mpi_stats)
                assert stats["bytes_sent"] > 0 and stats["bytes_received"] > 0, stats

with case("the call count is the default step, per group"):
    xs = everyone(3000, seed=5)
    for expected_step in range(3):
        got = majority_vote(xs[rank], comm=GROUP)
        assert np.array_equal(got.to(torch.float64).numpy(),
                              reference_vote(xs, expected_step)), expected_step

with case("out= takes the result"):
    xs = everyone(500, seed=6)
    out = torch.full((500,), 9.0)
    got = majority_vote(xs[rank], comm=GROUP, step=3, out=out)
    assert got is out and np.array_equal(out.to(torch.float64).numpy(), reference_vote(xs, 3))

with case("a group of some of the ranks votes among them"):
    members = list(range(size - 1))
    sub = dist.new_group(members)   # collective over the default group: every rank makes it
    if rank in members:
        xs = everyone(800, seed=8, ranks=members)
        for topology in ("server", "sharded", "tree"):
            got = majority_vote(xs[rank], comm=sub, step=2, topology=topology)
            assert np.array_equal(got.to(torch.float64).numpy(), reference_vote(xs, 2)), topology

with case("a rank that calls with another size: every rank raises, naming it"):
    n = 600 if rank == 1 else 640
    with expect_everywhere(ValueError, r"rank\(s\) \[1\] call it with another topology or size"):
        majority_vote(torch.ones(n), comm=GROUP, topology="allgather")

with case("what a process group cannot carry is refused"):
    x = torch.ones(10)
    for options, match in (({"topology": "hierarchical"}, "topology must be one of"),
                           ({"quorum": size - 1}, "quorum= needs"),
                           ({"elastic": True}, "elastic=True needs MPI's ULFM"),
                           ({"timeout": 5.0}, "group's own timeout")):
        with expect_everywhere(ValueError, match):
            majority_vote(x, comm=GROUP, **options)

dist.destroy_process_group()
print(f"group_vote_check OK on {size} ranks", flush=True)
