r"""An alpha-beta-gamma cost model of the vote topologies and of fp32 allreduce, and a chooser.

Hockney's model with a compute term: on the critical path of a collective, a message of ``s``
bytes costs ``alpha + beta * s``, and local elementwise work costs ``gamma`` seconds per byte
per pass (one numpy bitwise op over a packed row, or one fp32 add over a float buffer).

.. math::
    T = \alpha \cdot \text{messages} + \beta \cdot \text{wire bytes} + \gamma \cdot \text{compute bytes}

Symbols below: ``n`` coordinates, ``M`` ranks, ``W = 8 ceil(n / 64)`` bytes of packed signs,
``k = 2`` result planes when M is even (plus and the tie mask) else 1, ``P(m) = bit_length(m)``
bit planes to count ``m`` votes, ``F = 4 n`` bytes of fp32 gradient, ``L = ceil(log2 M)``.

================== ==================================== ===============================================
algorithm          messages on the critical path         wire bytes on the critical path
================== ==================================== ===============================================
server             ``2 (M-1)``: root's M-1 in, M-1 out   ``(M-1) W + (M-1) k W`` (root's link, serialized)
tree               chain of largest subtrees: ``L`` up,  up: ``sum_r P(s_r) W`` (counts grow with the
                   ``sum c_v`` down (concurrent sends)   subtree), down: ``sum c_v * k W``
sharded            ``2 (M-1)``                           ``(1 + k) W (M-1)/M`` (any M: flat per rank)
allgather          ``M-1``                               ``(M-1) W``
hierarchical       ``2 (R-1)`` inside, ``2 (N-1)``       inside: ``(R-1) W/R`` in, ``k (R-1) W/R`` out;
                   between nodes (R ranks a node, N      between: ``(P(R) + k) W/R (N-1)/N`` a rank,
                   nodes)                                ``(P(R) + k) W (N-1)/N`` a node
ring_allreduce     ``2 (M-1)``                           ``2 F (M-1)/M``
rd_allreduce       ``L`` (+2 if M is not a power of 2)   ``L F`` (+2F)
rabenseifner       ``2 L`` (+2)                          ``2 F (M'-1)/M'`` (+2F), M' = 2^floor(log2 M)
allgather8         ``M-1``                               ``(M-1) n`` (GRACE: one byte a sign)
bcast_gather       ``M-1`` one after another, ``L`` down ``(M-1) W + L k W`` (the authors' code)
================== ==================================== ===============================================

Compute bytes count the numpy passes of :mod:`mpisign.backends.packing` (e.g. a tally of ``m`` votes and
its majority take ``P + m (1 + 2P) + 2 + sum_j (1 or 4)`` passes over a row), and one pass per
fp32 block the allreduce adds. The tree's critical path follows the chain of largest children
(rank 0 -> 2^(L-1) -> ...), where each node adds its children's counts before passing its own
up, and where a node's result sends go out concurrently and share its link (``c_v`` children:
each arrives after ``c_v`` message times).

The topologies own their shapes (:func:`~mpisign.collectives.tree.tree_children`,
:func:`~mpisign.collectives.sharded.shard_bounds`,
:func:`~mpisign.collectives.hierarchical.hierarchical_plan`), which the model prices; the
link's figures are measured by :mod:`mpisign.collectives.links`.

The model assumes that each rank has its own full-duplex link to a non-blocking switch (the
emulated cluster, InfiniBand fat trees); on one shared-memory machine the ranks share memory
bandwidth and cores, and the model is optimistic there. :func:`measure_link` fits ``alpha`` and
``beta`` by a ping-pong and ``gamma`` by timing a numpy pass; :func:`choose` is what
``topology="auto"`` uses. On several nodes, :func:`predict_nodes` prices the traffic inside a node
and between nodes on two links, and :func:`choose_nodes` weighs the hierarchical vote against the
flat topologies with them; :func:`between_nodes` counts the bytes that cross between nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..backends.packing import count_planes
from .base import packed_bytes, result_planes
from .hierarchical import HierarchicalPlan, hierarchical_plan
from .links import Link, measure_link
from .sharded import RING_MIN_BYTES, shard_bounds, sharded_ring_gather
from .tree import tree_children, tree_subtree

__all__ = [
    "RING_MIN_BYTES", "sharded_ring_gather", "Link", "Cost", "FLAT_TOPOLOGIES", "TOPOLOGIES",
    "FP32_ALLREDUCES", "HierarchicalPlan", "hierarchical_plan", "between_nodes", "predict_nodes",
    "choose_nodes",
    "BASELINES", "ALGORITHMS", "packed_bytes", "result_planes", "count_planes", "tally_passes",
    "tree_children", "tree_subtree", "shard_bounds",
    "add_counts_passes", "cost", "predict", "choose", "traffic", "measure_link",
]

#: The flat vote topologies of :mod:`mpisign.collectives`, in the order ``choose`` breaks ties.
FLAT_TOPOLOGIES = ("sharded", "allgather", "tree", "server")
#: All vote topologies: the flat ones and the one that knows the nodes (see :func:`choose_nodes`).
TOPOLOGIES = FLAT_TOPOLOGIES + ("hierarchical",)
#: fp32 sum allreduces (the baseline a vote is measured against).
FP32_ALLREDUCES = ("ring_allreduce", "rabenseifner_allreduce", "rd_allreduce")
#: Other ways to move signs: GRACE's 8-bit allgather, the paper's code (broadcast gather).
BASELINES = FP32_ALLREDUCES + ("allgather8", "bcast_gather")
ALGORITHMS = TOPOLOGIES + BASELINES


@dataclass(frozen=True)
class Cost:
    """What lies on a collective's critical path; ``seconds(link)`` prices it."""

    messages: float
    wire_bytes: float
    compute_bytes: float = 0.0

    def seconds(self, link: Link) -> float:
        """``alpha * messages + beta * wire_bytes + gamma * compute_bytes``."""
        return (link.alpha * self.messages + link.beta * self.wire_bytes
                + link.gamma * self.compute_bytes)

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.messages + other.messages, self.wire_bytes + other.wire_bytes,
                    self.compute_bytes + other.compute_bytes)


# -- sizes and pass counts --------------------------------------------------------------------

def _majority_passes(m: int) -> int:
    """Passes of the plane-by-plane compare ``count > m // 2`` (packing._compare_count)."""
    t, planes = m // 2, count_planes(m)
    return 2 + sum(1 if t >> j & 1 else 4 for j in range(planes))


def tally_passes(m: int) -> int:
    """Passes over one packed row to tally ``m`` votes and take the majority.

    ``P`` (zeroed counter) ``+ m (1 + 2P)`` (copy, then an AND and an XOR a plane, per vote)
    ``+ 2 + sum_j (1 if bit j of m//2 is set else 4)`` (the compare), ``P = P(m)``.
    """
    planes = count_planes(m)
    return planes + m * (1 + 2 * planes) + _majority_passes(m)


def add_counts_passes(planes_out: int) -> int:
    """Passes of a ripple-carry add of two counters into ``planes_out`` planes: ``6P + 3``."""
    return planes_out + 3 + 5 * planes_out


def _check(n: int, m: int) -> None:
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n_coords must be an int >= 0, got {n!r}")
    if not isinstance(m, (int, np.integer)) or m < 1:
        raise ValueError(f"ranks must be an int >= 1, got {m!r}")


def _tree_cost(n: int, m: int) -> Cost:
    w, k = packed_bytes(n), result_planes(m)
    up_msgs = up_bytes = compute = down_msgs = 0
    node = 0
    while True:  # follow the chain of largest (last) children from the root down to a leaf
        children = tree_children(node, m)
        if not children:
            break
        size = 1
        for _, s in children:
            size += s
            compute += add_counts_passes(count_planes(size)) * w
        last, s_last = children[-1]
        up_msgs += 1
        up_bytes += count_planes(s_last) * w
        down_msgs += len(children)  # its result sends share its link
        node = last
    compute += (_majority_passes(m) + k) * w
    return Cost(up_msgs + down_msgs, up_bytes + down_msgs * k * w, compute)


def _shard_bytes(n: int, m: int) -> list[int]:
    """Bytes of each rank's shard of the packed words, as ShardedVote.bounds splits them."""
    bounds = shard_bounds(packed_bytes(n) // 8, m)
    return [8 * (bounds[j + 1] - bounds[j]) for j in range(m)]


# -- the model ---------------------------------------------------------------------------------

def cost(algorithm: str, n_coords: int, ranks: int, nodes=None) -> Cost:
    """Messages, wire bytes and compute bytes on the critical path (see the module table).

    ``nodes``: ranks per node, for ``"hierarchical"`` (default: all ``ranks`` on one node);
    its cost here prices every message on one link, see :func:`predict_nodes` for two."""
    _check(n_coords, ranks)
    n, m = int(n_coords), int(ranks)
    w, k, f = packed_bytes(n), result_planes(m), 4 * n
    if m == 1:
        return Cost(0, 0, 0)
    if algorithm == "hierarchical":
        inside, between = _hierarchical_cost(n, _node_sizes(nodes, m))
        return inside + between
    lg = (m - 1).bit_length()  # ceil(log2 m)
    pow2 = 1 << (m.bit_length() - 1)  # largest power of 2 <= m
    extra = 0 if pow2 == m else 1  # non-power-of-2: fold the extra ranks in and out
    if algorithm == "server":
        return Cost(2 * (m - 1), (m - 1) * w + (m - 1) * k * w, (1 + tally_passes(m) + k) * w)
    if algorithm == "tree":
        return _tree_cost(n, m)
    if algorithm == "sharded":
        shards = _shard_bytes(n, m)
        phase = max(max(w - s, (m - 1) * s) for s in shards)  # busiest rank, either direction
        biggest = max(shards)
        return Cost(2 * (m - 1), (1 + k) * phase,
                    (1 + tally_passes(m) + k) * biggest + 2 * k * w)  # + de-interleave
    if algorithm == "allgather":
        return Cost(m - 1, (m - 1) * w, (1 + tally_passes(m)) * w)
    if algorithm == "ring_allreduce":
        return Cost(2 * (m - 1), 2 * f * (m - 1) / m, f * (m - 1) / m)
    if algorithm == "rd_allreduce":
        steps = pow2.bit_length() - 1
        return Cost(steps + 2 * extra, (steps + 2 * extra) * f, (steps + extra) * f)
    if algorithm == "rabenseifner_allreduce":
        steps = pow2.bit_length() - 1
        return Cost(2 * steps + 2 * extra, 2 * f * (pow2 - 1) / pow2 + 2 * extra * f,
                    f * (pow2 - 1) / pow2 + extra * f)
    if algorithm == "allgather8":
        return Cost(m - 1, (m - 1) * n, (m + 2) * n)  # M byte rows summed, then 2 compares
    if algorithm == "bcast_gather":
        return Cost((m - 1) + lg, (m - 1) * w + lg * k * w, (1 + tally_passes(m) + k) * w)
    raise ValueError(f"algorithm must be one of {list(ALGORITHMS)}, got {algorithm!r}")


def predict(algorithm: str, n_coords: int, ranks: int, link: Link) -> float:
    """Seconds for one ``algorithm`` over ``n_coords`` coordinates on ``ranks`` ranks."""
    return cost(algorithm, n_coords, ranks).seconds(link)


def choose(n_coords: int, ranks: int, link: Link, candidates=FLAT_TOPOLOGIES) -> str:
    """The candidate topology the model predicts fastest (ties: the earlier in ``candidates``)."""
    candidates = tuple(candidates)
    if not candidates:
        raise ValueError("choose needs at least one candidate topology")
    return min(candidates, key=lambda a: (predict(a, n_coords, ranks, link), candidates.index(a)))


def traffic(algorithm: str, n_coords: int, ranks: int,
            ring_min_bytes: int = RING_MIN_BYTES, nodes=None) -> list[tuple[int, int]]:
    """``(bytes sent, bytes received)`` of each rank in one operation.

    Exactly what :class:`mpisign.collectives.SignVote.traffic` counts for the vote topologies
    (``ring_min_bytes``: the sharded vote's, see :func:`sharded_ring_gather`);
    for the MPI collectives, the textbook algorithm's figures (``ring_allreduce``: within one
    element per block of Open MPI's split; ``bcast_gather``: a binomial broadcast).
    ``nodes``: ranks per node, consecutive ranks node by node, for ``"hierarchical"`` (default:
    one node).
    """
    _check(n_coords, ranks)
    if algorithm == "hierarchical":
        return [(i_s + b_s, i_r + b_r) for i_s, i_r, b_s, b_r
                in _hierarchical_bytes(n_coords, _node_sizes(nodes, ranks))]
    n, m = int(n_coords), int(ranks)
    w, k = packed_bytes(n), result_planes(m)
    if m == 1:
        return [(0, 0)]
    if algorithm == "server":
        return [((m - 1) * k * w, (m - 1) * w)] + [(w, k * w)] * (m - 1)
    if algorithm in ("tree", "bcast_gather"):
        out = []
        for r in range(m):
            kids = tree_children(r, m)
            if algorithm == "tree":
                up_sent = 0 if r == 0 else count_planes(tree_subtree(r, m)) * w
                up_recv = sum(count_planes(s) * w for _, s in kids)
            else:  # the authors' gather: each worker's signs to rank 0
                up_sent, up_recv = (0, (m - 1) * w) if r == 0 else (w, 0)
            out.append((up_sent + len(kids) * k * w, up_recv + (0 if r == 0 else k * w)))
        return out
    if algorithm == "sharded":
        shards = _shard_bytes(n, m)
        if sharded_ring_gather(n, m, ring_min_bytes):  # a rank forwards all shards but one
            return [((w - s) + k * (w - shards[(r + 1) % m]), (m - 1) * s + k * (w - s))
                    for r, s in enumerate(shards)]
        return [((w - s) + k * (m - 1) * s, (m - 1) * s + k * (w - s)) for s in shards]
    if algorithm == "allgather":
        return [((m - 1) * w, (m - 1) * w)] * m
    if algorithm == "allgather8":
        return [((m - 1) * n, (m - 1) * n)] * m
    if algorithm in FP32_ALLREDUCES:
        c = cost(algorithm, n, m)
        return [(round(c.wire_bytes), round(c.wire_bytes))] * m
    raise ValueError(f"algorithm must be one of {list(ALGORITHMS)}, got {algorithm!r}")


# -- nodes: the hierarchical vote, and what crosses between nodes ----------------------------

def _node_sizes(nodes, ranks: int) -> list[int]:
    sizes = [ranks] if nodes is None else [int(x) for x in nodes]
    if not sizes or min(sizes) < 1 or sum(sizes) != ranks:
        raise ValueError(f"nodes must be ranks per node (each >= 1) adding up to {ranks}, "
                         f"got {nodes!r}")
    return sizes


def _hierarchical_bytes(n: int, sizes: list[int]) -> list[tuple[int, int, int, int]]:
    """Per rank (consecutive ranks, node by node): bytes sent and received inside its node,
    then sent and received between nodes, by the per-phase table of
    :mod:`mpisign.collectives.hierarchical`."""
    w, k = packed_bytes(n) // 8, result_planes(sum(sizes))
    plan, planes = hierarchical_plan(w, sizes), [count_planes(size) for size in sizes]
    out = []
    for i, size in enumerate(sizes):
        for local in range(size):
            in_s = in_r = out_s = out_r = 0
            for s in range(len(plan.shards) - 1):
                ws = plan.shard(s)[1] - plan.shard(s)[0]
                if s % size != local:   # another rank of the node owns shard s
                    in_s, in_r = in_s + ws, in_r + k * ws
                    continue
                in_s, in_r = in_s + k * ws * (size - 1), in_r + (size - 1) * ws
                wi = plan.piece(s, i)[1] - plan.piece(s, i)[0]
                for j in range(len(sizes)):
                    if j != i:
                        wj = plan.piece(s, j)[1] - plan.piece(s, j)[0]
                        out_s += planes[i] * wj + k * wi
                        out_r += planes[j] * wi + k * wj
            out.append((8 * in_s, 8 * in_r, 8 * out_s, 8 * out_r))
    return out


def _hierarchical_cost(n: int, sizes: list[int]) -> tuple[Cost, Cost]:
    """The critical path inside the nodes (phases 1 and 4, and the compute) and between them
    (phases 2 and 3), taking the busiest rank of each phase."""
    m, big_n, w = sum(sizes), len(sizes), packed_bytes(n)
    per_rank = _hierarchical_bytes(n, sizes)
    owned = max(-(-max(sizes) // size) for size in sizes)   # shards a rank owns, at most
    inside_msgs = 2 * max(-(-max(sizes) // size) * (size - 1) for size in sizes)
    shard = owned * -(-w // max(sizes))
    compute = (tally_passes(max(sizes)) * shard
               + (big_n - 1) * add_counts_passes(count_planes(m)) * shard // big_n
               + (_majority_passes(m) + result_planes(m)) * shard // big_n
               + 2 * result_planes(m) * w)   # de-interleave the W x k result
    inside = Cost(inside_msgs, max(max(r[0], r[1]) for r in per_rank), compute)
    between = Cost(2 * owned * (big_n - 1), max(max(r[2], r[3]) for r in per_rank))
    return inside, between


def between_nodes(algorithm: str, n_coords: int, nodes) -> list[tuple[int, int]]:
    """``(bytes sent, bytes received)`` between nodes by each node in one operation, with
    consecutive ranks on each node of ``nodes`` ranks; exactly what the topologies count in
    ``Traffic.sent_between_nodes`` for the vote topologies (not the tree), and for
    ``ring_allreduce`` the ring's one crossing per node."""
    sizes = _node_sizes(nodes, sum(int(x) for x in nodes))
    n, m = int(n_coords), sum(sizes)
    _check(n, m)
    node_of = [i for i, size in enumerate(sizes) for _ in range(size)]
    w, k = packed_bytes(n), result_planes(m)
    sent, received = [0] * len(sizes), [0] * len(sizes)

    def move(src: int, dst: int, nbytes: int) -> None:
        if node_of[src] != node_of[dst]:
            sent[node_of[src]] += nbytes
            received[node_of[dst]] += nbytes

    if algorithm == "hierarchical":
        for r, (_, _, b_s, b_r) in enumerate(_hierarchical_bytes(n, sizes)):
            sent[node_of[r]] += b_s
            received[node_of[r]] += b_r
    elif algorithm == "sharded":
        shards = _shard_bytes(n, m)
        ring = sharded_ring_gather(n, m)
        for r in range(m):
            for j in range(m):
                if j != r:
                    move(r, j, shards[j])
                    if not ring:
                        move(r, j, k * shards[r])
            if ring:
                move(r, (r + 1) % m, k * (w - shards[(r + 1) % m]))
    elif algorithm == "allgather":
        for r in range(m):
            for j in range(m):
                if j != r:
                    move(r, j, w)
    elif algorithm == "server":
        for r in range(1, m):
            move(r, 0, w)
            move(0, r, k * w)
    elif algorithm == "ring_allreduce":
        for r in range(m):
            move(r, (r + 1) % m, round(2 * 4 * n * (m - 1) / m))
    else:
        raise ValueError(f"between_nodes knows hierarchical, sharded, allgather, server and "
                         f"ring_allreduce, got {algorithm!r}")
    return list(zip(sent, received))


def predict_nodes(algorithm: str, n_coords: int, nodes, inside: Link, between: Link) -> float:
    """Seconds for one ``algorithm`` on nodes of ``nodes`` ranks, with ``inside`` the link
    between two ranks of a node and ``between`` a node's link to the others (all of a node's
    traffic to other nodes shares it: the emulated cluster, or one NIC a node).

    The hierarchical vote: its phases inside the nodes on ``inside``, its 2 (N-1) messages
    between nodes on ``between``'s alpha and the busiest node's bytes between nodes on its beta.
    A flat algorithm: ``between``'s alpha for every message of its critical path (it crosses
    nodes), its wire bytes on ``inside``'s beta and compute on its gamma, plus the busiest
    node's bytes between nodes on ``between``'s beta."""
    sizes = _node_sizes(nodes, sum(int(x) for x in nodes))
    m = sum(sizes)
    if len(sizes) == 1:
        return cost(algorithm, n_coords, m, nodes=sizes if algorithm == "hierarchical" else None
                    ).seconds(inside)
    crossing = max(max(s, r) for s, r in between_nodes(algorithm, n_coords, sizes))
    if algorithm == "hierarchical":
        part_inside, part_between = _hierarchical_cost(n_coords, sizes)
        return (part_inside.seconds(inside) + between.alpha * part_between.messages
                + between.beta * crossing)
    flat = cost(algorithm, n_coords, m)
    return (between.alpha * flat.messages + inside.beta * flat.wire_bytes
            + inside.gamma * flat.compute_bytes + between.beta * crossing)


def choose_nodes(n_coords: int, nodes, inside: Link, between: Link,
                 candidates=("hierarchical", "sharded", "allgather", "server")) -> str:
    """The candidate :func:`predict_nodes` finds fastest (ties: the earlier in ``candidates``)."""
    candidates = tuple(candidates)
    if not candidates:
        raise ValueError("choose_nodes needs at least one candidate topology")
    return min(candidates, key=lambda a: (predict_nodes(a, n_coords, nodes, inside, between),
                                          candidates.index(a)))
