"""Hierarchical quorum vote: the hierarchical vote among the ranks that a roll call counts.

The hierarchical vote (:mod:`mpisign.collectives.hierarchical`) counts each node's votes on the
node's ranks, each owning shards, and trades the counts between nodes along rails: a late rank
would hold up the shards it owns and, through them, every node. Here a roll call at the root
(:mod:`mpisign.collectives.roll`) first agrees on the ``k`` counted ranks, and the vote runs on
the nodes as they stand at this step: node ``i`` votes with its counted ranks only, a node with
none is left out, and the shards and rails are those of that layout
(:class:`mpisign.collectives.hierarchical.NodeLayout`). The counts between nodes add up to the
count of the ``k`` counted ranks, and the result is their majority (a tie where exactly ``k / 2``
say "+"; the tie plane always travels). A bad node, all of whose ranks are late, so abstains as
a whole, and the others' traffic between nodes shrinks with it; a single slow rank abstains on
its own, and its node votes with the rest.

A late rank takes each shard's result from that shard's owner on its own node (or, where its
node has no counted rank, on the counted node ``rank mod N``), as a counted rank of that node
does in the vote's last step, and that owner leaves the send in flight until the late rank
takes it. Bytes for the counted ranks are the hierarchical vote's over the counted layout,
plus the roll; a late rank receives ``2 W``.
"""

from __future__ import annotations

from .hierarchical import SHARE, HierarchicalVote, NodeLayout
from .roll import RollCallVote, RollPending

__all__ = ["HierarchicalQuorumVote"]

#: Layouts (and their plans) kept for the counted sets seen: a few cover a run whose late
#: ranks are the same ones; a run where every step counts another set makes them again.
LAYOUTS_KEPT = 64


class _Pending(RollPending):
    # As the hierarchical vote's: the layout and plan, the node's rows and the counts.
    __slots__ = ("layout", "plan", "rows", "counts")


class HierarchicalQuorumVote(RollCallVote, HierarchicalVote):
    """The hierarchical vote among the ranks counted by a roll at ``root`` (see the module
    docstring). ``nodes``: as :class:`HierarchicalVote`'s."""

    name = "hierarchical"
    pending_type = _Pending

    def __init__(self, comm, timeout=None, tally=None, quorum: int | None = None,
                 grace: float = 0.0, root: int = 0, nodes=None):
        RollCallVote.__init__(self, comm, timeout, tally, quorum=quorum, grace=grace, root=root)
        self._find_nodes(nodes)
        self._layouts: dict = {}   # counted ranks -> their NodeLayout seen from this rank

    def _layout(self, counted) -> NodeLayout:
        key = tuple(counted)
        if key not in self._layouts:
            if len(self._layouts) >= LAYOUTS_KEPT:   # the counted sets of a long run: bounded
                self._layouts.clear()
                self._plans.clear()
            present = set(counted)
            self._layouts[key] = NodeLayout.of(
                [[r for r in m if r in present] for m in self.nodes.members], self.rank)
        return self._layouts[key]

    def _vote_among(self, p) -> tuple[list, list]:
        at = p.layout = self._layout(p.counted)
        p.plan = self._plan(p.words.shape[0], at)
        if at.node is None:   # late: every shard from its owner on the node that serves it
            serving = self._serving(at, self.rank)
            for s in range(at.shards):
                lo, hi = p.plan.shard(s)
                self._irecv(p, p.result[lo:hi], at.owner(serving, s), SHARE)
            return [], []
        self._post_signs(p)
        self._wait(p, "the node's signs (inside the node)")
        self._vote_between_nodes(p)
        self._share(p)

        def to_the_late():
            for r in p.late:
                if self._serving(at, r) != at.node:
                    continue
                for s in at.owned:
                    lo, hi = p.plan.shard(s)
                    self._isend(p, p.result[lo:hi], r, SHARE)
        return self._aside(p, to_the_late)

    def _serving(self, at: NodeLayout, rank: int) -> int:
        """The counted node whose owners send late ``rank`` its result: its own node if any of
        its ranks were counted, else node ``rank mod N`` of the N counted nodes."""
        mine = set(self.nodes.members[self.nodes.node_of[rank]])
        for i, members in enumerate(at.members):
            if mine.intersection(members):
                return i
        return rank % len(at.members)
