"""Experimental schedules of the sharded vote, measured beside the package's own (not used by it).

``PairwiseShardedVote`` moves the same bytes as :class:`mpisign.collectives.ShardedVote` but in
M-1 rounds: in round ``k`` rank ``r`` sends to ``r + k`` and receives from ``r - k`` (mod M) and
waits before the next round, so each link carries one flow at a time, as a ring does, instead of
M-1 concurrent flows. On TCP (the emulated cluster) concurrent flows reach well below the link
rate; see the README of benchmarks/ for the figures.
"""

from __future__ import annotations

from mpi4py import MPI

from mpisign.collectives.sharded import RESULT, VOTES, ShardedVote

__all__ = ["PairwiseShardedVote", "BlockingWaitShardedVote", "ConcurrentGatherShardedVote"]


class PairwiseShardedVote(ShardedVote):
    """The sharded vote with a pairwise-exchange schedule (one peer per round)."""

    name = "sharded-pairwise"

    def _start(self, p):
        self._prepare(p)  # nothing posted early: the rounds run in _finish

    def _rounds(self):
        for k in range(1, self.size):
            yield (self.rank + k) % self.size, (self.rank - k) % self.size

    def _finish(self, p):
        # Step 1: the alltoall of sign shards, one peer pair per round.
        b = p.bounds
        for dst, src in self._rounds():
            self._irecv(p, p.shards[src], src, VOTES)
            self._isend(p, p.words[b[dst]: b[dst + 1]], dst, VOTES)
            # Wait on MPI: one round at a time keeps one flow on each link.
            self._wait(p, f"pairwise alltoall round with ranks {dst}, {src}")
        return super()._finish(p)  # its first wait finds nothing pending

    def _gather_results(self, p, result):
        # Step 3: the allgather of the voted shards, one peer pair per round.
        b = p.bounds
        mine = result[b[self.rank]: b[self.rank + 1]]
        for dst, src in self._rounds():
            self._irecv(p, result[b[src]: b[src + 1]], src, RESULT)
            self._isend(p, mine, dst, RESULT)
            # Wait on MPI: as above.
            self._wait(p, f"pairwise allgather round with ranks {dst}, {src}")


class BlockingWaitShardedVote(ShardedVote):
    """The sharded vote, waiting in ``MPI_Waitall`` (continuous MPI progress, no timeout) instead
    of the package's bounded ``Testsome``-and-nap loop: measures what the naps cost."""

    name = "sharded-waitall"

    def _wait(self, pending, what):
        requests = pending.requests
        pending.requests, pending.peers = [], []
        # Wait on MPI: blocking, so the MPI library progresses the transfer all the time.
        MPI.Request.Waitall(requests)


class ConcurrentGatherShardedVote(ShardedVote):
    """The sharded vote with its result phase always posted at once (M-1 concurrent flows per
    rank), never the ring allgather the package switches to for large shards
    (:data:`mpisign.collectives.costmodel.RING_MIN_BYTES`): what the ring gains."""

    name = "sharded-concurrent"

    def __init__(self, comm, timeout=None, tally=None):
        super().__init__(comm, timeout, tally, ring_min_bytes=1 << 62)
