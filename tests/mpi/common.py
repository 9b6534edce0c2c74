"""Shared by the MPI test scripts: progress lines and named cases for the launcher, errors
expected on every rank, and rank-seeded data."""

import contextlib
import os
import re

import numpy as np
import torch
from mpi4py import MPI

WORLD = MPI.COMM_WORLD


def progress(step, comm=WORLD) -> None:
    """Tell the launcher (tests/mpirun.py) how far this rank got, for stall reports."""
    print(f"@progress rank={comm.Get_rank()} step={step}", flush=True)


@contextlib.contextmanager
def case(name: str, comm=WORLD):
    """One named case of a script: the launcher (tests/mpirun.py) names it in its report when
    it fails or stalls, so a failing launch says which of its cases broke."""
    print(f"@case rank={comm.Get_rank()} {name}", flush=True)
    try:
        yield
    except BaseException as e:
        print(f"@failed rank={comm.Get_rank()} {name}: {type(e).__name__}: {e}", flush=True)
        raise


class Raised:
    """What :func:`expect_everywhere` caught on this rank, as pytest.raises's ``excinfo``:
    ``value`` is the exception once the block has ended."""
    value: BaseException | None = None


@contextlib.contextmanager
def expect_everywhere(error_type, match=None, comm=WORLD):
    """The block raises ``error_type`` on this rank (with a message in which ``re.search``
    finds ``match``, if given), and on every other rank of ``comm``: checked collectively (an
    allgather), so that every rank fails alike, naming the ranks that did not raise or raised
    something else, instead of the others going on. Yields a :class:`Raised`, for checks of
    the exception beyond its type and message::

        with expect_everywhere(ValueError, "lr") as raised:
            Signum(params, lr=-1.0)
        assert ...raised.value...
    """
    raised = Raised()
    wrong, other = None, None   # what went wrong on this rank, in words; another exception
    try:
        yield raised
        wrong = f"no {error_type.__name__}"
    except error_type as e:
        raised.value = e
        if match is not None and not re.search(match, str(e)):
            wrong = f"{type(e).__name__}({str(e)!r}) does not match {match!r}"
    except Exception as e:
        wrong, other = f"{type(e).__name__} instead: {e}", e
    every = comm.allgather(wrong)
    if any(w is not None for w in every):
        bad = [r for r, w in enumerate(every) if w is not None]
        raise AssertionError(
            f"expected {error_type.__name__} on every rank; rank(s) {bad} did not: "
            + "; ".join(f"rank {r}: {every[r]}" for r in bad)) from other


def rank_data(n: int, rank: int, seed: int, dtype=torch.float32, zeros=0.1) -> torch.Tensor:
    """The tensor rank ``rank`` votes with: normal noise, some exact zeros. Any rank can
    rebuild any other rank's tensor, which is how the references see all votes."""
    rng = np.random.default_rng([seed, rank, n])
    x = rng.standard_normal(n)
    x[rng.random(n) < zeros] = 0.0
    return torch.from_numpy(x).to(dtype)


def reference_vote(xs: list[torch.Tensor], step: int = 0) -> np.ndarray:
    """sign(sum_r sign(x_r)) in numpy on unpacked signs, with the documented zero rule:
    a 0 or NaN on rank r votes +1 if (r + step) is odd, -1 if even. One rank alone holds no
    vote: the result is its sign, 0 for 0 and NaN."""
    if len(xs) == 1:
        return np.sign(np.nan_to_num(xs[0].to(torch.float64).numpy().reshape(-1), nan=0.0))
    total = np.zeros(xs[0].numel(), dtype=np.int64)
    for r, x in enumerate(xs):
        a = x.to(torch.float64).numpy().reshape(-1)
        s = np.sign(np.nan_to_num(a, nan=0.0)).astype(np.int64)
        undecided = (a == 0) | np.isnan(a)
        s[undecided] = 1 if (r + step) % 2 else -1
        total += s
    return np.sign(total)


def name_nodes(sizes_arg: str | None, comm=WORLD) -> list[int]:
    """Group the ranks in nodes of the sizes "1,3" names (consecutive ranks; None: one node of
    all ranks) by setting $MPISIGN_NODE on this rank; returns the sizes."""
    sizes = [int(x) for x in sizes_arg.split(",")] if sizes_arg else [comm.Get_size()]
    os.environ["MPISIGN_NODE"] = str([i for i, s in enumerate(sizes) for _ in range(s)]
                                     [comm.Get_rank()])
    return sizes


def init_gloo(comm=WORLD, timeout: float = 120.0) -> None:
    """A torch.distributed gloo process group beside MPI, of the ranks of ``comm`` (rank 0 picks
    a free port and tells the others)."""
    import os
    import socket
    from datetime import timedelta

    import torch.distributed as dist
    port = None
    if comm.Get_rank() == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(comm.bcast(port)))
    dist.init_process_group("gloo", rank=comm.Get_rank(), world_size=comm.Get_size(),
                            timeout=timedelta(seconds=timeout))
