"""Tree vote: a binomial-tree reduction of bit-sliced vote counts, then a binomial broadcast.

Ranks are numbered relative to ``root``. In round ``k`` (mask ``2**k``) a rank whose bit ``k`` is
set sends its subtree's count to ``rank - 2**k`` and drops out; the others receive from
``rank + 2**k`` and add (ripple-carry, :func:`mpisign.packing.add_counts`). A count of a subtree of
``s`` ranks needs ``bit_length(s)`` planes of ``n`` bits, so a leaf sends its raw sign bits
(one plane) and a node with a large subtree ``~log2(s)`` planes. The root takes the majority and
sends it back down the same tree. Counting is exact, so the answer is the server's, bit for bit.
"""

from __future__ import annotations

import numpy as np

from .. import packing
from .base import TAG_COUNTS, TAG_RESULT, SignVote

__all__ = ["TreeVote"]


class TreeVote(SignVote):
    """Binomial-tree reduce of bit-sliced counts to rank 0, binomial broadcast of the result."""

    name = "tree"

    def _children(self) -> list[tuple[int, int]]:
        """``(child, subtree size)`` of this rank, in round order."""
        out, mask = [], 1
        while mask < self.size:
            if self.rank & mask:
                break
            child = self.rank + mask
            if child < self.size:
                out.append((child, min(mask, self.size - child)))
            mask <<= 1
        return out

    def _parent(self) -> int | None:
        return None if self.rank == 0 else self.rank & (self.rank - 1)

    def _vote(self, words, n):
        w = words.size
        m = self.size
        children = self._children()
        # Step 1: post a receive for every child's count; sizes are known from the tree shape.
        bufs = [np.empty((packing.count_planes(s), w), dtype=np.uint64) for _, s in children]
        reqs = [self._irecv(b, c, TAG_COUNTS) for b, (c, _) in zip(bufs, children)]
        # Wait on MPI: this rank's count is incomplete until every child's has arrived.
        self._wait(reqs, [c for c, _ in children], "waiting for the children's counts")
        # Step 2: add them to this rank's own vote (one plane), ripple-carry.
        count, size = words.reshape(1, w), 1
        for b, (_, s) in zip(bufs, children):
            size += s
            count = packing.add_counts(count, b, packing.count_planes(size))
        parent = self._parent()
        k = 2 if m % 2 == 0 else 1  # the tie mask travels only when a tie is possible
        result = np.empty(k * w, dtype=np.uint64)
        if parent is not None:
            # Step 3: pass the subtree's count up, then wait for the result to come down.
            count = np.ascontiguousarray(count)
            reqs = [self._isend(count, parent, TAG_COUNTS),
                    self._irecv(result, parent, TAG_RESULT)]
            # Wait on MPI: the result is this rank's update, and its children's.
            self._wait(reqs, [parent, parent], "waiting for the parent's result")
        else:
            # Step 3 at the root: the majority of all M votes.
            plus, tie = packing.majority(count, m, n)
            result[:w] = plus
            if tie is not None:
                result[w:] = tie
        # Step 4: send the result down to the children (the reduce's tree, reversed).
        reqs = [self._isend(result, c, TAG_RESULT) for c, _ in children]
        # Wait on MPI: `result` must not be released while a send still reads it.
        self._wait(reqs, [c for c, _ in children], "sending the result to the children")
        return result[:w], (result[w:] if m % 2 == 0 else None)
