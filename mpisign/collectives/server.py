"""Server vote: the paper's parameter-server topology.

Bernstein et al. (ICLR 2019), Algorithm 1: every worker sends its packed signs to a server (rank
``root``), the server tallies them and sends the packed majority back to every worker.

Traffic, for ``n`` coordinates and M ranks, in bits: each worker sends ``n`` and receives ``n``
(``2n`` with the tie mask when M is even); the root receives ``(M - 1) n`` and sends as much: its
links are the bottleneck as M grows, which is what the tree and sharded topologies fix.
"""

from __future__ import annotations

import numpy as np

from .. import packing
from .base import TAG_RESULT, TAG_VOTES, SignVote

__all__ = ["ServerVote"]


class ServerVote(SignVote):
    """Gather packed signs to ``root``, tally there, send the result to every rank."""

    name = "server"

    def __init__(self, comm, timeout=None, root: int = 0):
        super().__init__(comm, timeout)
        if not 0 <= root < self.size:
            raise ValueError(f"root must be a rank of the communicator (0..{self.size - 1}), "
                             f"got {root}")
        self.root = root
        self._gathered = np.empty((0, 0), dtype=np.uint64)  # root's M x W receive buffer, reused
        self._result = np.empty(0, dtype=np.uint64)          # plus (+ tie) words, reused

    def _buffers(self, w: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self.size if self.rank == self.root else 0
        if self._gathered.shape != (rows, w):
            self._gathered = np.empty((rows, w), dtype=np.uint64)
        k = 2 if self.size % 2 == 0 else 1  # the tie mask travels only when a tie is possible
        if self._result.size != k * w:
            self._result = np.empty(k * w, dtype=np.uint64)
        return self._gathered, self._result

    def _vote(self, words, n):
        w = words.size
        m = self.size
        gathered, result = self._buffers(w)
        others = [r for r in range(m) if r != self.root]
        if self.rank == self.root:
            # Step 1: receive every worker's packed signs into its own row.
            gathered[self.root] = words
            reqs = [self._irecv(gathered[r], r, TAG_VOTES) for r in others]
            # Wait on MPI: the tally needs every vote.
            self._wait(reqs, others, "waiting for the workers' signs")
            # Step 2: tally with bit-sliced counters and take the majority.
            plus, tie = packing.majority(packing.tally(gathered), m, n)
            result[:w] = plus
            if tie is not None:
                result[w:] = tie
            # Step 3: send the packed result to every worker.
            reqs = [self._isend(result, r, TAG_RESULT) for r in others]
            # Wait on MPI: `result` is reused next step, so the sends must have left it.
            self._wait(reqs, others, "sending the result to the workers")
        else:
            reqs = [self._isend(words, self.root, TAG_VOTES),
                    self._irecv(result, self.root, TAG_RESULT)]
            # Wait on MPI: the result is this rank's update; nothing can go on without it.
            self._wait(reqs, [self.root, self.root], "waiting for the server's result")
        plus = result[:w].copy()
        tie = result[w:].copy() if m % 2 == 0 else None
        return plus, tie
