"""The MPI helpers every layer shares: communicator checks, the timeout, bounded waits, the
device context in which mpi4py takes a CUDA tensor.

Below the collectives and above mpi4py: the collectives, the optimizer, ``majority_vote``, the
cost model's link measurement and the application all wait on MPI through :func:`wait_all` and
:func:`bounded`, so no wait anywhere in the package can hang: a peer that never arrives ends in
:class:`VoteTimeout` after ``$MPISIGN_TIMEOUT`` seconds (300 by default), naming the missing
ranks where MPI can tell them.
"""

from __future__ import annotations

import contextlib
import os
import time

import torch
from mpi4py import MPI

from .world import check_world

__all__ = ["ANY_RANK", "SPIN_SECONDS", "VoteTimeout", "bounded", "check_comm", "default_timeout",
           "device_of", "wait_all"]

#: How long a wait polls without sleeping before it starts to nap (and yield the core).
SPIN_SECONDS = 1e-4

#: How long a wait then polls with ``sched_yield`` (the core goes to any runnable thread, and
#: comes straight back when there is none) before it naps with a growing sleep: a sleep's
#: timer granularity (50-100 us, then up to 1 ms) is longer than a small vote's round trip, and
#: the ranks of a training step reach the vote milliseconds apart, so a wait of a few
#: milliseconds is the usual case, not a stall (benchmarks/README.md: "Waiting"). MPI's own
#: blocking waits yield without end (Open MPI's mpi_yield_when_idle); these nap after a second
#: (a slow or dead peer, an evaluation).
YIELD_SECONDS = 1.0

#: The peer of a collective request in :func:`wait_all`: every rank, none in particular.
ANY_RANK = "any rank"


def check_comm(comm) -> MPI.Intracomm:
    """Return ``comm`` if it is a usable intracommunicator, else raise ValueError (or
    :class:`mpisign.mpi.world.SingletonWorld` for a launch that gave every task a world of its own)."""
    if not isinstance(comm, MPI.Comm) or comm == MPI.COMM_NULL:
        raise ValueError(f"comm must be an mpi4py communicator (or, for the optimizers, "
                         f"majority_vote and mpisign.ddp, a torch.distributed process group), "
                         f"got {comm!r}")
    if comm.Is_inter():
        raise ValueError("comm must be an intracommunicator: a majority vote needs every rank "
                         "in one group (got an intercommunicator)")
    check_world(comm)   # a size-1 COMM_WORLD where the launcher started more: SingletonWorld
    return comm


class VoteTimeout(RuntimeError):
    """A collective did not complete in time: a rank is dead, stalled or out of step.

    ``rolled``: the ranks' roll call (:mod:`mpisign.mpi.rollcall`) has named the missing ranks
    in the message already."""

    def __init__(self, message: str, rolled: bool = False):
        super().__init__(message)
        self.rolled = rolled


def device_of(buf):
    """The device context of a CUDA buffer, else a no-op. mpi4py takes a tensor through DLPack,
    and torch refuses to export one that is not on the current device ("Can't export tensors on
    a different CUDA device index"): a user whose parameters are on ``cuda:k`` need not call
    ``torch.cuda.set_device(k)`` first."""
    if isinstance(buf, torch.Tensor) and buf.is_cuda:
        return torch.cuda.device(buf.device)
    return contextlib.nullcontext()


def default_timeout() -> float:
    """Seconds a vote may wait on its peers: ``$MPISIGN_TIMEOUT`` or 300."""
    raw = os.environ.get("MPISIGN_TIMEOUT", "300")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"MPISIGN_TIMEOUT must be a number of seconds, got {raw!r}") from None
    if not value > 0:
        raise ValueError(f"MPISIGN_TIMEOUT must be > 0, got {raw!r}")
    return value


def wait_all(requests: list[MPI.Request], peers: list, timeout: float, what: str) -> None:
    """Wait for ``requests`` to complete, or raise :class:`VoteTimeout` naming the missing peers.

    ``peers[i]`` names who request ``i`` waits on: a rank, or :data:`ANY_RANK` for a collective
    request (which cannot tell which rank is missing).

    Polls with ``Testsome`` rather than blocking in ``Waitall``, so that the wait can end with
    the names of the peers that never arrived: it spins for :data:`SPIN_SECONDS`, then yields
    the core between polls for :data:`YIELD_SECONDS` since the last progress (an oversubscribed
    rank gives its core to the ranks it waits for), then naps with a growing sleep.
    """
    pending = dict(enumerate(peers))
    start = since = time.monotonic()
    deadline = start + timeout
    nap = 0.0
    while pending:
        done = MPI.Request.Testsome(requests)  # progresses MPI; indices of completed requests
        if done:
            for i in done:
                pending.pop(i, None)
            nap, since = 0.0, time.monotonic()
            continue
        now = time.monotonic()
        if now - since < SPIN_SECONDS:
            continue  # small messages: answers come within microseconds, do not sleep yet
        if now > deadline:
            missing = sorted(set(pending.values()) - {ANY_RANK})
            for i, peer in pending.items():
                if peer is ANY_RANK:
                    # Cancelling a nonblocking collective is erroneous in MPI (Open MPI's
                    # MPI_Comm_idup request never returns from it): leave it pending.
                    continue
                try:
                    requests[i].Cancel()
                except MPI.Exception:
                    pass
            who = f"no message from rank(s) {missing}" if missing else \
                "not every rank joined (a collective cannot say which rank is missing)"
            raise VoteTimeout(
                f"{what}: {who} after {timeout:g} s (dead, stalled, or not calling the same "
                f"collective; set MPISIGN_TIMEOUT to wait longer)")
        if now - since < YIELD_SECONDS:
            os.sched_yield()
            continue
        time.sleep(nap)
        nap = min(1e-3, nap * 2 + 2e-5)


def bounded(request: MPI.Request, what: str, timeout: float | None = None) -> None:
    """Wait for one nonblocking collective (``Iallreduce``, ``Ibarrier``, ...) at most ``timeout``
    seconds (default ``$MPISIGN_TIMEOUT`` or 300), else raise :class:`VoteTimeout` saying
    ``what`` was waited for: the bounded form of a blocking collective."""
    wait_all([request], [ANY_RANK], default_timeout() if timeout is None else timeout, what)
