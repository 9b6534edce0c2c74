"""Faults and bad input on real ranks.  Usage: fault_check.py MODE

  perturb   a rank changes its weights behind the optimizer's back; check_every=1 must stop
            every rank with ParameterDivergence naming it
  kill      the last rank dies by SIGKILL at step 3; the job must end, not hang
  badinput  odd tensors and communicators: clear errors or documented behaviour, no hang
  huge      (2 ranks) a float64 vector of 2**28 + 4097 coordinates: more than 2**31 bytes per
            rank, every offset and count 64-bit safe
"""

import os
import re
import signal
import sys

import numpy as np
import torch
from common import WORLD, case, expect_everywhere, progress, rank_data, reference_vote
from mpi4py import MPI

import mpisign

comm = WORLD
rank, size = comm.Get_rank(), comm.Get_size()
mode = sys.argv[1]


def small_model():
    torch.manual_seed(3)
    return torch.nn.Linear(6, 2)


if mode == "perturb":
    with case("a rank changes its weights: ParameterDivergence on every rank, naming it"):
        model = small_model()
        opt = mpisign.Signum(model.parameters(), lr=0.01, comm=comm, check_every=1)
        with expect_everywhere(mpisign.ParameterDivergence, re.escape("rank(s) [1]")) as raised:
            for step in range(5):
                for p in model.parameters():
                    p.grad = torch.randn(p.shape,
                                         generator=torch.Generator().manual_seed(step + rank))
                if step == 2 and rank == 1:
                    with torch.no_grad():
                        model.bias[0] += 1e-3  # something other than the optimizer
                opt.step()
                progress(step)
        assert "step 3" in str(raised.value), raised.value
        print(f"rank {rank}: caught divergence", flush=True)

elif mode == "kill":
    with case("the last rank dies at step 3: the job ends"):
        for step in range(10):
            if step == 3 and rank == size - 1:
                os.kill(os.getpid(), signal.SIGKILL)
            mpisign.majority_vote(torch.randn(10_000), comm, "server", step=step)
            progress(step)
        raise AssertionError("the job went on without a rank")

elif mode == "badinput":
    with case("non-contiguous and zero-size tensors and parameters"):
        # The vote of a transposed view is the vote of its values; an empty tensor gives an
        # empty result.
        xs = [rank_data(35, r, seed=5) for r in range(size)]
        x = xs[rank].reshape(5, 7).t()  # non-contiguous
        got = mpisign.majority_vote(x, comm, "tree", step=0)
        want = reference_vote([t.reshape(5, 7).t().reshape(-1) for t in xs])
        assert np.array_equal(got.reshape(-1).numpy(), want)
        empty = mpisign.majority_vote(torch.empty(0, 3), comm, "sharded")
        assert empty.shape == (0, 3)
        # An optimizer over a non-contiguous parameter and a zero-size one.
        base = torch.zeros(4, 6)
        p = torch.nn.Parameter(base.t())  # 6 x 4, non-contiguous
        z = torch.nn.Parameter(torch.zeros(0))
        opt = mpisign.SignSGD([p, z], lr=0.5, comm=comm)
        p.grad = torch.ones(6, 4)
        z.grad = torch.zeros(0)
        opt.step()
        assert torch.equal(p.detach(), torch.full((6, 4), -0.5)) and z.numel() == 0
    for bad in (torch.ones(3, dtype=torch.int64), torch.ones(3, dtype=torch.bool)):
        with case(f"a {bad.dtype} tensor is refused on every rank"):
            with expect_everywhere(ValueError, "dtype"):
                mpisign.majority_vote(bad, comm)
    with case("an unknown topology is refused on every rank"):
        with expect_everywhere(ValueError, "topology"):
            mpisign.Signum([torch.nn.Parameter(torch.ones(2, dtype=torch.float64))], comm=comm,
                           topology="fastest")
    # An intercommunicator is refused before any communication.
    if size >= 2:
        half = comm.Split(rank % 2, rank)
        inter = half.Create_intercomm(0, comm, 1 - rank % 2, tag=7)
        for what, call in [
                ("majority_vote", lambda: mpisign.majority_vote(torch.ones(3), inter)),
                ("Signum", lambda: mpisign.Signum([torch.nn.Parameter(torch.ones(2))],
                                                  comm=inter))]:
            with case(f"{what} refuses an intercommunicator on every rank"):
                with expect_everywhere(ValueError, "intracommunicator"):
                    call()
        inter.Free()
        half.Free()
    with case("COMM_NULL is refused on every rank"):
        with expect_everywhere(ValueError, "comm"):
            mpisign.majority_vote(torch.ones(3), MPI.COMM_NULL)
    progress("badinput")

elif mode == "huge":
    with case("a float64 vector past 2**31 bytes"):
        assert size == 2
        n = 2**28 + 4097
        # rank 0 votes + everywhere; rank 1 votes - on every third coordinate: ties there.
        i = torch.arange(n, dtype=torch.int64)
        x = torch.ones(n, dtype=torch.float64)
        if rank == 1:
            x[i % 3 == 0] = -1.0
        del i
        assert x.numel() * x.element_size() > 2**31
        stats = {}
        got = mpisign.majority_vote(x, comm, "sharded", stats=stats)
        del x
        probe = np.unique(np.concatenate([np.arange(0, 200), np.arange(n - 200, n),
                                          np.linspace(0, n - 1, 10_001).astype(np.int64),
                                          [2**28 - 1, 2**28, 2**28 + 1, 2**28 + 63,
                                           2**28 + 64]]))
        want = np.where(probe % 3 == 0, 0.0, 1.0)
        assert np.array_equal(got.numpy()[probe], want)
        assert float(got.sum()) == float(n - (n + 2) // 3)  # every coordinate, summed
        words = (n + 63) // 64
        assert stats["bytes_sent"] + stats["bytes_received"] > 0
        assert stats["bytes_sent"] <= 8 * words * 3, stats
        progress("huge")

comm.Barrier()
if rank == 0:
    print(f"fault_check {mode} OK on {size} ranks", flush=True)
