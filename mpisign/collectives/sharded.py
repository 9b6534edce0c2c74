"""Sharded vote: each rank tallies 1/M of the coordinates (alltoall), then an allgather.

The packed words are split into M nearly equal shards. Rank ``j`` receives shard ``j`` of every
rank's signs, tallies that shard with bit-sliced counters, and sends its piece of the result to
every rank. Per rank, in bits: ``n (M-1)/M`` out and in for the signs, ``k n (M-1)/M`` out and in
for the result (``k = 2`` with the tie mask when M is even, else 1), whatever M is: 1/32 of a ring
allreduce's ``64 n (M-1)/M`` for odd M, about 1/21 for even M. Two rounds, like the server.
"""

from __future__ import annotations

from .. import packing
from .base import SignVote

__all__ = ["ShardedVote"]

VOTES, RESULT = 0, 1  # message phases


class ShardedVote(SignVote):
    """Alltoall of 1-bit shards, a local tally of one shard, allgather of the 1-bit results."""

    name = "sharded"

    def bounds(self, w: int) -> list[int]:
        """Word offsets of the M shards: shard j is words ``[b[j], b[j+1])``."""
        return [j * w // self.size for j in range(self.size + 1)]

    def _start(self, p):
        w = p.words.size
        b = p.bounds = self.bounds(w)
        mine = b[self.rank + 1] - b[self.rank]
        # Step 1: post the alltoall: shard j of this rank's signs to rank j, and receive this
        # rank's shard of every rank's signs into a row each.
        p.shards = self._buffer(p.bucket, "shards", (self.size, mine))
        p.shards[self.rank] = p.words[b[self.rank]: b[self.rank + 1]]
        for r in range(self.size):
            if r != self.rank:
                self._irecv(p, p.shards[r], r, VOTES)
                self._isend(p, p.words[b[r]: b[r + 1]], r, VOTES)

    def _finish(self, p):
        b, w, k = p.bounds, p.words.size, (2 if self.tie_possible else 1)
        # Wait on MPI: the shard's tally needs every rank's piece of it.
        self._wait(p, "alltoall of the sign shards")
        # Step 2: tally this rank's shard. Bits past n only occur in the last shard.
        lo, hi = b[self.rank], b[self.rank + 1]
        n_here = max(0, min(p.n - 64 * lo, 64 * (hi - lo)))
        plus, tie = packing.majority(packing.tally(p.shards), self.size, n_here)
        # Step 3: allgather the results; row i of `result` holds word i's plus (and tie), so
        # every shard of the result is one contiguous message.
        result = self._buffer(p.bucket, "result", (w, k))
        result[lo:hi, 0] = plus
        if tie is not None:
            result[lo:hi, 1] = tie
        for r in range(self.size):
            if r != self.rank:
                self._irecv(p, result[b[r]: b[r + 1]], r, RESULT)
                self._isend(p, result[lo:hi], r, RESULT)
        # Wait on MPI: the full result is this rank's update.
        self._wait(p, "allgather of the voted shards")
        plus = self._buffer(p.bucket, "plus", (w,))
        plus[:] = result[:, 0]
        if not self.tie_possible:
            return plus, None
        tie = self._buffer(p.bucket, "tie", (w,))
        tie[:] = result[:, 1]
        return plus, tie
