"""Tree vote: a binomial-tree reduction of bit-sliced vote counts, then a binomial broadcast.

In round ``k`` (mask ``2**k``) a rank whose bit ``k`` is set sends its subtree's count to
``rank - 2**k`` and drops out; the others receive from ``rank + 2**k`` and add (ripple-carry,
:func:`mpisign.backends.packing.add_counts`). A count of a subtree of ``s`` ranks needs ``bit_length(s)``
planes of ``n`` bits, so a leaf sends its raw sign bits (one plane) and a node with a large
subtree ``~log2(s)`` planes. Rank 0 takes the majority and sends it back down the same tree.
Counting is exact, so the answer is the server's, bit for bit.
"""

from __future__ import annotations

from ..backends import packing
from .base import Pending, SignVote

__all__ = ["TreeVote", "tree_children", "tree_parent", "tree_subtree", "subtree_count"]

COUNTS, RESULT = 0, 1  # message phases


# -- the shape: the binomial tree ------------------------------------------------------------

def tree_children(rank: int, m: int) -> list[tuple[int, int]]:
    """(child, subtree size) of ``rank`` in the binomial tree of ``m`` ranks rooted at 0, in
    round order: in round ``k`` a rank whose low ``k`` bits are clear takes ``rank + 2**k``."""
    out, mask = [], 1
    while mask < m and not rank & mask:
        child = rank + mask
        if child < m:
            out.append((child, min(mask, m - child)))
        mask <<= 1
    return out


def tree_parent(rank: int) -> int | None:
    """``rank``'s parent in the binomial tree rooted at 0 (None for the root): its lowest set
    bit cleared."""
    return None if rank == 0 else rank & (rank - 1)


def subtree_count(words, child_counts):
    """The bit-sliced count of a subtree: this rank's own vote (one plane of ``words``) plus
    its children's counts, ``[(counter, subtree size)]``, added ripple-carry in that order."""
    count, size = words.reshape(1, -1), 1
    for buf, s in child_counts:
        size += s
        count = packing.add_counts(count, buf, packing.count_planes(size))
    return count


def tree_subtree(rank: int, m: int) -> int:
    """Ranks in ``rank``'s subtree (itself included)."""
    return m if rank == 0 else min(rank & -rank, m - rank)


class _Pending(Pending):
    __slots__ = ("child_counts", "result")  # [(buffer, subtree size)] per child; k x W result


class TreeVote(SignVote):
    """Binomial-tree reduce of bit-sliced counts to rank 0, binomial broadcast of the result."""

    name = "tree"
    pending_type = _Pending

    def __init__(self, comm, timeout=None, tally=None):
        super().__init__(comm, timeout, tally)
        self.children = tree_children(self.rank, self.size)  # (child, subtree size)
        self.parent = tree_parent(self.rank)

    def _start(self, p):
        w = p.words.shape[0]
        # Step 1: post a receive for every child's count; sizes follow from the tree's shape.
        p.child_counts = []
        for i, (child, s) in enumerate(self.children):
            buf = self._buffer(p, f"child{i}", (packing.count_planes(s), w))
            self._irecv(p, buf, child, COUNTS)
            p.child_counts.append((buf, s))
        p.result = self._buffer(p, "result", (2 if self.tie_possible else 1, w))

    def _finish(self, p):
        self._wait(p, "waiting for the children's counts")
        # Step 2: add them to this rank's own vote (one plane), ripple-carry.
        count = subtree_count(p.words, p.child_counts)
        if self.parent is not None:
            # Step 3: pass the subtree's count up; the result comes back down the same edge.
            self._isend(p, count, self.parent, COUNTS)  # contiguous: a view of words, or new
            self._irecv(p, p.result, self.parent, RESULT)
            self._wait(p, "waiting for the parent's result")
        else:
            # Step 3 at the root: the majority of all M votes.
            plus, tie = packing.majority(count, self.size, p.n)
            p.result[0] = plus
            if tie is not None:
                p.result[1] = tie
        # Step 4: send the result down to the children (the reduce's tree, reversed), the
        # largest subtree first: its chain to the leaves is the longest.
        for child, _ in reversed(self.children):
            self._isend(p, p.result, child, RESULT)
        # Left in flight: the bucket's next vote completes them before it receives into the
        # result buffer again.
        self._leave_sends(p, "sending the result to the children")
        return p.result[0], (p.result[1] if self.tie_possible else None)
