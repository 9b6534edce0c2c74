"""Tree quorum vote: the binomial tree of counts among the ranks that a roll call counts.

In the tree vote (:mod:`mpisign.collectives.tree`) every rank adds its children's counts and
passes them up, so a late rank would hold up its parent and every rank above it. Here a roll
call at the root (:mod:`mpisign.collectives.roll`) first agrees on the ``k`` counted ranks, and
the binomial tree is built over them alone: the i-th of them (the root first, then the others
in rank order) takes the place of rank i in the tree of ``k`` ranks
(:func:`mpisign.collectives.tree.tree_children`). The root takes the majority of the ``k``
votes (a tie where exactly ``k / 2`` say "+"; the tie plane always travels) and the result goes
back down the same tree. The root also sends it to every late rank, and leaves those sends in
flight until they take them.

Bytes for the counted ranks are the tree vote's over ``k`` ranks with the result's two planes,
plus the roll; a late rank receives ``2 W``, from the root, which sends ``2 W`` more for each.
"""

from __future__ import annotations

from ..backends import packing
from .roll import RollCallVote
from .tree import subtree_count, tree_children, tree_parent

__all__ = ["TreeQuorumVote"]

COUNTS, RESULT = 0, 1   # message phases, in the vote's own channel of tags


class TreeQuorumVote(RollCallVote):
    """The tree vote among the ranks counted by a roll at ``root`` (see the module docstring)."""

    name = "tree"

    def _vote_among(self, p) -> tuple[list, list]:
        root = self.roll.root
        order = [root] + [r for r in p.counted if r != root]   # the tree's rank i is order[i]
        if self.rank not in order:   # late: the result from the root
            self._irecv(p, p.result, root, RESULT)
            return [], []
        i, k, w = order.index(self.rank), len(order), p.words.shape[0]
        children = [(order[c], s) for c, s in tree_children(i, k)]
        counts = []
        for j, (child, s) in enumerate(children):
            counts.append((self._buffer(p, f"child{j}", (packing.count_planes(s), w)), s))
            self._irecv(p, counts[-1][0], child, COUNTS)
        self._wait(p, "the children's counts")
        count = subtree_count(p.words, counts)
        if i:   # the subtree's count up; the result comes back down the same edge
            parent = order[tree_parent(i)]
            self._isend(p, count, parent, COUNTS)
            self._irecv(p, p.result, parent, RESULT)
            self._wait(p, "the parent's result")
        else:
            plus, tie = packing.majority(count, k, p.n)
            p.result[:, 0] = plus
            p.result[:, 1] = 0 if tie is None else tie
        for child, _ in reversed(children):   # the largest subtree first
            self._isend(p, p.result, child, RESULT)
        if i:
            return [], []

        def to_the_late():
            for r in p.late:
                self._isend(p, p.result, r, RESULT)
        return self._aside(p, to_the_late)
