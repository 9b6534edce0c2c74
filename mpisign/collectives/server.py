"""Server vote: the paper's parameter-server topology.

Bernstein et al. (ICLR 2019), Algorithm 1: every worker sends its packed signs to a server (rank
``root``), the server tallies them and sends the packed majority back to every worker.

Traffic, for ``n`` coordinates and M ranks, in bits: each worker sends ``n`` and receives ``n``
(``2n`` with the tie mask when M is even); the root receives ``(M - 1) n`` and sends as much: its
links are the bottleneck as M grows, which is what the tree and sharded topologies fix.
"""

from __future__ import annotations

from .base import Pending, SignVote

__all__ = ["ServerVote"]

VOTES, RESULT = 0, 1  # message phases


class _Pending(Pending):
    __slots__ = ("result", "gathered")  # k x W result; M x W votes, on the root only


class ServerVote(SignVote):
    """Gather packed signs to ``root``, tally there, send the result to every rank."""

    name = "server"
    pending_type = _Pending

    def __init__(self, comm, timeout=None, tally=None, root: int = 0):
        super().__init__(comm, timeout, tally)
        if not 0 <= root < self.size:
            raise ValueError(f"root must be a rank of the communicator (0..{self.size - 1}), "
                             f"got {root}")
        self.root = root
        self.others = [r for r in range(self.size) if r != root]

    def _start(self, p):
        w = p.words.shape[0]
        k = 2 if self.tie_possible else 1  # the tie mask travels only when a tie is possible
        p.result = self._buffer(p, "result", (k, w))
        if self.rank == self.root:
            # Step 1: post a receive of every worker's packed signs into its own row.
            p.gathered = self._buffer(p, "gathered", (self.size, w))
            p.gathered[self.root] = p.words
            for r in self.others:
                self._irecv(p, p.gathered[r], r, VOTES)
        else:
            self._isend(p, p.words, self.root, VOTES)
            self._irecv(p, p.result, self.root, RESULT)

    def _finish(self, p):
        if self.rank == self.root:
            self._wait(p, "waiting for the workers' signs")
            # Step 2: tally with bit-sliced counters and take the majority.
            plus, tie = self.tally(p.gathered, p.n)
            p.result[0] = plus
            if tie is not None:
                p.result[1] = tie
            # Step 3: send the packed result to every worker.
            for r in self.others:
                self._isend(p, p.result, r, RESULT)
            # Left in flight: the bucket's next vote completes them before it writes the
            # result buffer again.
            self._leave_sends(p, "sending the result to the workers")
        else:
            self._wait(p, "waiting for the server's result")
        return p.result[0], (p.result[1] if self.tie_possible else None)
