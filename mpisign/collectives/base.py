"""What every vote topology shares: argument checks, bounded waits, and byte accounting.

A topology takes this rank's packed sign words (see :mod:`mpisign.packing`) and returns the packed
majority ``(plus, tie)``, identical on every rank. Every message is a point-to-point send or
receive that this package posts itself, so the bytes each rank sends and receives are counted
exactly, and every wait is bounded: a peer that never arrives ends in :class:`VoteTimeout`
naming the ranks that are missing instead of a hang.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

__all__ = ["Traffic", "VoteTimeout", "SignVote", "check_comm", "default_timeout", "wait_all"]

log = logging.getLogger(__name__)

#: Tag of the vote messages. A topology's messages never share a tag with another phase.
TAG_VOTES, TAG_COUNTS, TAG_RESULT, TAG_PROBE = 0x5301, 0x5302, 0x5303, 0x5304


def check_comm(comm) -> MPI.Intracomm:
    """Return ``comm`` if it is a usable intracommunicator, else raise ValueError."""
    if not isinstance(comm, MPI.Comm) or comm == MPI.COMM_NULL:
        raise ValueError(f"comm must be an mpi4py communicator, got {comm!r}")
    if comm.Is_inter():
        raise ValueError("comm must be an intracommunicator: a majority vote needs every rank "
                         "in one group (got an intercommunicator)")
    return comm


class VoteTimeout(RuntimeError):
    """A collective did not complete in time: a rank is dead, stalled or out of step."""


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

    ``peers[i]`` names who request ``i`` waits on: a rank, or a phrase for a collective request.

    Polls with ``Testsome`` and a short, growing sleep rather than blocking in ``Waitall``: an
    oversubscribed rank then yields its core to the ranks it is waiting for, and the wait can
    end with the names of the peers that never arrived.
    """
    pending = dict(enumerate(peers))
    deadline = time.monotonic() + timeout
    nap = 0.0
    while pending:
        done = MPI.Request.Testsome(requests)  # progresses MPI; indices of completed requests
        if done:
            for i in done:
                pending.pop(i, None)
            nap = 0.0
            continue
        if time.monotonic() > deadline:
            missing = sorted(set(pending.values()), key=str)
            for i in pending:
                try:
                    requests[i].Cancel()
                except MPI.Exception:
                    pass
            raise VoteTimeout(
                f"{what}: no message from rank(s) {missing} after {timeout:g} s "
                f"(dead, stalled, or not calling the same collective; "
                f"set MPISIGN_TIMEOUT to wait longer)")
        time.sleep(nap)
        nap = min(1e-3, nap * 2 + 2e-5)


@dataclass
class Traffic:
    """Bytes this rank moved in votes (payload only, as posted to MPI)."""

    sent: int = 0
    received: int = 0
    votes: int = 0

    def as_dict(self) -> dict:
        return {"bytes_sent": self.sent, "bytes_received": self.received, "votes": self.votes}


class SignVote:
    """Base of the topologies: ``vote(words) -> (plus, tie)`` over ``comm``."""

    name = "?"

    def __init__(self, comm: MPI.Comm, timeout: float | None = None):
        self.comm = check_comm(comm)
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.timeout = default_timeout() if timeout is None else float(timeout)
        if not self.timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        self.traffic = Traffic()
        self.step = 0  # the caller's step of the current vote; named in timeout messages

    def vote(self, words: np.ndarray, n: int, step: int | None = None
             ) -> tuple[np.ndarray, np.ndarray | None]:
        """Majority of every rank's ``words`` (packed ``n`` bits): ``(plus, tie)`` on every rank.

        ``tie`` is None when the communicator size is odd (no tie is possible). ``step`` is the
        caller's step number, for error messages (default: this object's count of votes).
        """
        if words.dtype != np.uint64 or words.ndim != 1:
            raise ValueError(f"words must be a 1-D uint64 array, got {words.dtype} {words.shape}")
        self.step = self.traffic.votes if step is None else step
        self.traffic.votes += 1
        return self._vote(words, n)

    def _vote(self, words, n):
        raise NotImplementedError

    # -- point-to-point with accounting ------------------------------------------------------
    def _isend(self, buf: np.ndarray, dest: int, tag: int) -> MPI.Request:
        self.traffic.sent += buf.nbytes
        return self.comm.Isend(buf, dest=dest, tag=tag)

    def _irecv(self, buf: np.ndarray, source: int, tag: int) -> MPI.Request:
        self.traffic.received += buf.nbytes
        return self.comm.Irecv(buf, source=source, tag=tag)

    def _wait(self, requests, peers, what: str) -> None:
        wait_all(requests, peers, self.timeout,
                 f"{self.name} vote at step {self.step} on rank {self.rank}: {what}")
