"""Sharded vote: each rank tallies 1/M of the coordinates (alltoall), then an allgather.

The packed words are split into M nearly equal shards. Rank ``j`` receives shard ``j`` of every
rank's signs, tallies that shard with bit-sliced counters, and sends its piece of the result to
every rank: all at once for small shards, by a ring allgather for large ones (one flow per link,
M-1 steps; see :data:`mpisign.collectives.costmodel.RING_MIN_BYTES` for the measurements). Per rank, in
bits: ``n (M-1)/M`` out and in for the signs, ``k n (M-1)/M`` out and in for the result (``k = 2``
with the tie mask when M is even, else 1), whatever M is: 1/32 of a ring allreduce's
``64 n (M-1)/M`` for odd M, about 1/21 for even M. Two phases, like the server.
"""

from __future__ import annotations

from .base import Pending, SignVote, packed_bytes, result_planes

__all__ = ["ShardedVote", "RING_MIN_BYTES", "shard_bounds", "sharded_ring_gather"]

VOTES, RESULT = 0, 1  # message phases


# -- the shape: the shards, and how their results travel ------------------------------------

#: The sharded vote's second phase is a ring allgather when each result shard is at least this
#: many bytes. Measured on the emulated 1 Gbit/s cluster (benchmarks/README.md, 2026-11-23): with
#: shards of 357 KiB and more the ring (one flow per link) beat posting all M-1 messages at once
#: by 10-28% (M = 3, 4, 8); with 31-61 KiB its M-1 sequential steps lost by up to 2x (M = 8).
RING_MIN_BYTES = 256 * 1024


def sharded_ring_gather(n_coords: int, ranks: int, min_bytes: int = RING_MIN_BYTES) -> bool:
    """Whether the sharded vote sends its result by ring (the same answer on every rank)."""
    words = packed_bytes(n_coords) // 8
    shard = 8 * result_planes(ranks) * -(-words // ranks)  # the largest shard's result bytes
    return ranks > 2 and shard >= min_bytes


def shard_bounds(w: int, m: int) -> list[int]:
    """Word offsets of the sharded vote's ``m`` shards of ``w`` words: shard ``j`` is words
    ``[b[j], b[j+1])``, nearly equal."""
    return [j * w // m for j in range(m + 1)]


class _Pending(Pending):
    __slots__ = ("bounds", "shards")  # shard word offsets; M x (this rank's shard) votes


class ShardedVote(SignVote):
    """Alltoall of 1-bit shards, a local tally of one shard, allgather of the 1-bit results."""

    name = "sharded"
    pending_type = _Pending

    def __init__(self, comm, timeout=None, tally=None, ring_min_bytes: int = RING_MIN_BYTES):
        super().__init__(comm, timeout, tally)
        self.ring_min_bytes = int(ring_min_bytes)

    def bounds(self, w: int) -> list[int]:
        """Word offsets of the M shards: shard j is words ``[b[j], b[j+1])``."""
        return shard_bounds(w, self.size)

    def _prepare(self, p) -> None:
        """Shard bounds, and this rank's row of its own shard, in the buffer the others fill."""
        w = p.words.shape[0]
        b = p.bounds = self.bounds(w)
        p.shards = self._buffer(p, "shards", (self.size, b[self.rank + 1] - b[self.rank]))
        p.shards[self.rank] = p.words[b[self.rank]: b[self.rank + 1]]

    def _start(self, p):
        # Step 1: post the alltoall: shard j of this rank's signs to rank j, and receive this
        # rank's shard of every rank's signs into a row each.
        self._prepare(p)
        b = p.bounds
        for r in range(self.size):
            if r != self.rank:
                self._irecv(p, p.shards[r], r, VOTES)
                self._isend(p, p.words[b[r]: b[r + 1]], r, VOTES)

    def _finish(self, p):
        self._wait(p, "alltoall of the sign shards")
        result = self._tally_shard(p)
        self._gather_results(p, result)
        return self._split(p, result)

    def _tally_shard(self, p):
        """Step 2: the majority of this rank's shard, in its rows of a W x k result buffer (row
        i holds word i's plus and tie, so every shard of the result is one contiguous message).
        Bits past n only occur in the last shard."""
        b, k = p.bounds, (2 if self.tie_possible else 1)
        lo, hi = b[self.rank], b[self.rank + 1]
        n_here = max(0, min(p.n - 64 * lo, 64 * (hi - lo)))
        plus, tie = self.tally(p.shards, n_here)
        result = self._buffer(p, "result", (p.words.shape[0], k))
        result[lo:hi, 0] = plus
        if tie is not None:
            result[lo:hi, 1] = tie
        return result

    def _gather_results(self, p, result) -> None:
        """Step 3: the allgather of the voted shards: every message posted at once, or for
        large shards a ring (in step ``s`` rank ``r`` passes shard ``r - s`` to ``r + 1`` and
        receives shard ``r - s - 1`` from ``r - 1``), which keeps one flow on each link."""
        b, m, r = p.bounds, self.size, self.rank
        if sharded_ring_gather(64 * p.words.shape[0], m, self.ring_min_bytes):
            right, left = (r + 1) % m, (r - 1) % m
            for s in range(m - 1):
                out, inc = (r - s) % m, (r - s - 1) % m
                self._irecv(p, result[b[inc]: b[inc + 1]], left, RESULT)
                self._isend(p, result[b[out]: b[out + 1]], right, RESULT)
                # Wait on MPI: the next step forwards what this one receives.
                self._wait(p, f"ring allgather of the voted shards, step {s + 1} of {m - 1}")
            return
        mine = result[b[r]: b[r + 1]]
        for q in range(m):
            if q != r:
                self._irecv(p, result[b[q]: b[q + 1]], q, RESULT)
                self._isend(p, mine, q, RESULT)
        self._wait(p, "allgather of the voted shards")
