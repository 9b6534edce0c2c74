"""Hierarchical vote: exact counts inside each node, counts added between nodes, the flat vote's bits.

The ranks are grouped into N nodes (:mod:`mpisign.mpi.nodes`: shared memory, or ``$MPISIGN_NODE``);
node ``i`` has ``L_i`` ranks, and ``S = max L_i``. The packed words are cut into S shards. On
node ``i``, shard ``s`` belongs to its local rank ``s mod L_i``: each rank of the largest nodes
owns one shard, a rank of a smaller node may own several. The owners of shard ``s`` (one per
node) form its *rail*. Each shard is cut again into N pieces, piece ``j`` decided on node ``j``.

1. Inside each node (an alltoall): every rank sends each shard of its signs to the node's owner
   of that shard, which counts the node's ``L_i`` votes exactly, bit-sliced, in
   ``P_i = bit_length(L_i)`` planes (:mod:`mpisign.backends.packing`).
2. Between nodes, along each rail: the owner on node ``i`` sends piece ``j`` of its count to the
   owner on node ``j``, and receives piece ``i`` of every other node's count.
3. It adds the N counts (exact and associative: the flat vote's count), compares the sum with
   the global threshold ("+" above M/2, tie at M/2 for even M) and sends its piece of the result
   (``k`` planes: 2 with the tie mask for even M, else 1) to the rail's other owners.
4. Inside each node (an allgather): each owner sends its shards' results to the node's others.

Every rank gets the server's bits, whatever the grouping. On one node, step 3 takes the majority
of the node's rows with the signs backend's tally (the CUDA kernel on the GPU path), as the
sharded vote does; across nodes the counts are added with :mod:`mpisign.backends.packing`'s bitwise ops,
which run on the words' device, as the tree's do. Bytes per rank, with ``w_s`` the words
of shard s and ``w_sj`` of its piece j (:func:`mpisign.collectives.costmodel.traffic` counts them exactly):

======================== ============================================ ===========================
phase                    sent                                         received
======================== ============================================ ===========================
1 signs (inside)         ``w_s`` for each shard s it does not own     ``(L_i - 1) w_s`` per owned s
2 counts (between)       ``P_i w_sj`` per owned s, per node j != i    ``P_j w_si`` likewise
3 result (between)       ``k w_si (N - 1)`` per owned s               ``k (w_s - w_si)`` per owned s
4 result (inside)        ``k w_s (L_i - 1)`` per owned s              ``k w_s`` per shard not owned
======================== ============================================ ===========================

Between nodes a node sends about ``(P_i + k) W (N-1)/N`` bytes (W: the packed words' bytes)
where the flat sharded vote sends ``L_i (1 + k) W (N-1)/N``: 4x less for 8 ranks a node, 2.4x
for 4. That traffic leaves the node from all of its ranks, one rail each, so a node with a NIC
per GPU uses every NIC; the tally of each shard runs on its owner, in parallel.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..backends import packing
from ..mpi.nodes import discover
from .base import Pending, SignVote
from .sharded import shard_bounds

__all__ = ["HierarchicalVote", "HierarchicalPlan", "NodeLayout", "hierarchical_plan"]

SIGNS, COUNTS, RESULT, SHARE = 0, 1, 2, 3  # message phases


# -- the shape: shards of shards ------------------------------------------------------------

@dataclass(frozen=True)
class HierarchicalPlan:
    """Where the hierarchical vote cuts W packed words: S shards (S: the largest node's ranks),
    each cut again in N pieces (N nodes). Word offsets, as :func:`shard_bounds` gives them."""

    shards: tuple[int, ...]                # S + 1 offsets
    pieces: tuple[tuple[int, ...], ...]    # per shard, N + 1 offsets (absolute)

    def shard(self, s: int) -> tuple[int, int]:
        """Words ``[lo, hi)`` of shard ``s``."""
        return self.shards[s], self.shards[s + 1]

    def piece(self, s: int, j: int) -> tuple[int, int]:
        """Words ``[lo, hi)`` of piece ``j`` of shard ``s`` (decided on node ``j``)."""
        return self.pieces[s][j], self.pieces[s][j + 1]


def hierarchical_plan(w: int, node_sizes) -> HierarchicalPlan:
    """The hierarchical vote's cut of ``w`` words over nodes of ``node_sizes`` ranks."""
    bounds = shard_bounds(w, max(node_sizes))
    return HierarchicalPlan(tuple(bounds), tuple(
        tuple(lo + x for x in shard_bounds(hi - lo, len(node_sizes)))
        for lo, hi in zip(bounds, bounds[1:])))


@dataclass(frozen=True)
class NodeLayout:
    """Who votes in the hierarchical vote, grouped by node, and what this rank owns: node ``i``
    votes with ``members[i]`` (a node with no voter is left out), shard ``s`` on node ``i``
    belongs to ``members[i][s % L_i]``. ``node`` is this rank's node index, None if it does
    not vote (a late rank under a quorum)."""

    members: tuple[tuple[int, ...], ...]
    node: int | None
    owned: tuple[int, ...]

    @classmethod
    def of(cls, members, rank: int) -> "NodeLayout":
        """The layout of ``members`` (node -> its voting ranks; empty nodes dropped) seen from
        ``rank``."""
        members = tuple(tuple(m) for m in members if m)
        node = next((i for i, m in enumerate(members) if rank in m), None)
        shards = max(len(m) for m in members)
        owned = () if node is None else tuple(
            s for s in range(shards) if members[node][s % len(members[node])] == rank)
        return cls(members, node, owned)

    @property
    def sizes(self) -> tuple[int, ...]:
        """Voters on each node."""
        return tuple(len(m) for m in self.members)

    @property
    def shards(self) -> int:
        """S: the largest node's voters."""
        return max(self.sizes)

    @property
    def voters(self) -> int:
        return sum(self.sizes)

    @property
    def local(self) -> tuple[int, ...]:
        """This rank's node's voters."""
        return self.members[self.node]

    def owner(self, node: int, shard: int) -> int:
        """The rank of ``node`` that owns ``shard``."""
        members = self.members[node]
        return members[shard % len(members)]


class _Pending(Pending):
    # The layout and plan for these words; shard -> the node's votes (L x w_s); (shard, node)
    # -> a count of that piece (this node's, or received); the W x k result.
    __slots__ = ("layout", "plan", "rows", "counts", "result")


class HierarchicalVote(SignVote):
    """Counts inside each node, a sharded exchange of counts between nodes along rails, the
    1-bit result back inside each node. ``nodes``: a :class:`mpisign.mpi.nodes.Nodes` of ``comm``
    (default: :func:`mpisign.mpi.nodes.discover`, a collective).

    The phases read who votes from ``p.layout`` (here every rank, grouped by node), so that a
    vote among fewer ranks (:mod:`mpisign.collectives.quorum_hierarchical`) runs them as they
    are."""

    name = "hierarchical"
    pending_type = _Pending

    def __init__(self, comm, timeout=None, tally=None, nodes=None):
        super().__init__(comm, timeout, tally)
        self._find_nodes(nodes)

    def _find_nodes(self, nodes) -> None:
        """The nodes (``nodes``, or discovered: a collective), and every rank's layout."""
        self.count_nodes(discover(self.comm, timeout=self.timeout) if nodes is None else nodes)
        self.layout = NodeLayout.of(self.nodes.members, self.rank)
        self._plans: dict = {}

    def _plan(self, w: int, layout: NodeLayout) -> HierarchicalPlan:
        key = (w, layout.sizes)
        if key not in self._plans:
            self._plans[key] = hierarchical_plan(w, layout.sizes)
        return self._plans[key]

    def _start(self, p):
        p.layout = self.layout
        self._post_signs(p)

    def _post_signs(self, p) -> None:
        """Step 1: post the node's alltoall: each shard of this rank's signs to its owner here,
        and for each shard this rank owns, a row for every local rank's signs. This rank's
        own rows first: device work goes before a phase's first post (SignVote._ready)."""
        at = p.layout
        p.plan = self._plan(p.words.shape[0], at)
        p.rows, p.counts = {}, {}
        me = at.local.index(self.rank)
        for s in at.owned:
            lo, hi = p.plan.shard(s)
            rows = p.rows[s] = self._buffer(p, f"rows{s}.{len(at.local)}",
                                            (len(at.local), hi - lo))
            rows[me] = p.words[lo:hi]
        for s in range(at.shards):
            lo, hi = p.plan.shard(s)
            owner = at.owner(at.node, s)
            if owner != self.rank:
                self._isend(p, p.words[lo:hi], owner, SIGNS)
                continue
            for i, r in enumerate(at.local):
                if r != self.rank:
                    self._irecv(p, p.rows[s][i], r, SIGNS)

    def _finish(self, p):
        self._wait(p, "the node's signs (inside the node)")
        p.result = self._buffer(p, "result", (p.words.shape[0], 2 if self.tie_possible else 1))
        self._vote_between_nodes(p)
        self._share(p)
        self._wait(p, "the node's results (inside the node)")
        return self._split(p, p.result)

    def _vote_between_nodes(self, p) -> None:
        """Steps 2 and 3, once the node's signs are in: every owned piece decided, and every
        piece of this rank's owned shards in ``p.result`` (W x k, k = 2 with the tie plane)."""
        self._exchange_counts(p)
        self._wait(p, "the other nodes' counts")
        self._decide(p)
        self._wait(p, "the other nodes' results")

    def _exchange_counts(self, p) -> None:
        """Step 2: count the node's votes on each owned shard, piece by piece; send piece j to
        node j's owner of the shard and receive every other node's count of this node's piece.
        Every count is made before the first post (SignVote._ready)."""
        at = p.layout
        sizes = at.sizes
        if len(sizes) == 1:
            return   # one node: no counts to trade; step 3 tallies the rows
        for s in at.owned:
            lo = p.plan.shard(s)[0]
            for j in range(len(sizes)):
                c, d = p.plan.piece(s, j)
                # Piece j's count: this node's own in counts[s, node]; the others' are sent
                # from counts[s, j, "sent"], alive until the sends complete.
                key = (s, j) if j == at.node else (s, j, "sent")
                p.counts[key] = packing.tally(p.rows[s][:, c - lo: d - lo])
        for s in at.owned:
            a, b = p.plan.piece(s, at.node)
            for j in range(len(sizes)):
                if j == at.node:
                    continue
                self._isend(p, p.counts[s, j, "sent"], at.owner(j, s), COUNTS)
                theirs = self._buffer(p, f"count{s}.{j}", (packing.count_planes(sizes[j]), b - a))
                self._irecv(p, theirs, at.owner(j, s), COUNTS)
                p.counts[s, j] = theirs

    def _decide(self, p) -> None:
        """Step 3: add the nodes' counts of each owned piece, take the majority of every voter,
        and trade the pieces' results along the rail (every piece decided before the first
        post)."""
        at = p.layout
        sizes = at.sizes
        for s in at.owned:
            a, b = p.plan.piece(s, at.node)
            n_here = max(0, min(p.n - 64 * a, 64 * (b - a)))
            if len(sizes) == 1:   # one node: its rows are all the votes; the backend's tally
                self._set_result(p, a, b, *self.tally(p.rows[s], n_here))
                continue
            total, voters = p.counts[s, at.node], sizes[at.node]
            for j in range(len(sizes)):
                if j != at.node:
                    voters += sizes[j]
                    total = packing.add_counts(total, p.counts[s, j],
                                               packing.count_planes(voters))
            self._set_result(p, a, b, *packing.majority(total, at.voters, n_here))
        for s in at.owned:
            a, b = p.plan.piece(s, at.node)
            for j in range(len(sizes)):
                if j != at.node:
                    other = at.owner(j, s)
                    self._isend(p, p.result[a:b], other, RESULT)
                    c, d = p.plan.piece(s, j)
                    self._irecv(p, p.result[c:d], other, RESULT)

    @staticmethod
    def _set_result(p, a: int, b: int, plus, tie) -> None:
        p.result[a:b, 0] = plus
        if p.result.shape[1] > 1:   # the tie plane travels: 0 where no tie can be
            p.result[a:b, 1] = 0 if tie is None else tie

    def _share(self, p) -> None:
        """Step 4: each shard's result from its owner to the node's other ranks."""
        at = p.layout
        for s in range(at.shards):
            lo, hi = p.plan.shard(s)
            owner = at.owner(at.node, s)
            if owner != self.rank:
                self._irecv(p, p.result[lo:hi], owner, SHARE)
                continue
            for r in at.local:
                if r != self.rank:
                    self._isend(p, p.result[lo:hi], r, SHARE)
