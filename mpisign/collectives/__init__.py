"""The custom MPI collective: a majority vote of packed sign bits, one module per topology.

``make_vote(topology, comm)`` returns an object whose ``vote(words, n)`` gives every rank the
packed majority ``(plus, tie)`` of all ranks' packed signs, the same bits whatever the topology.
``topology="auto"`` picks one with :mod:`mpisign.collectives.costmodel` from the message size, the number of
ranks and the link's latency and bandwidth, measured once per communicator; when the ranks span
several nodes with more than one rank on some node (:mod:`mpisign.mpi.nodes`), from the node layout
and the links inside and between nodes, measured separately, with the hierarchical vote among
the candidates.
"""

from __future__ import annotations

import logging

from . import costmodel, links
from ..mpi.nodes import discover
from .base import SignVote, Traffic, VoteTimeout, bounded, check_comm, default_timeout, wait_all
from .allgather import AllgatherVote
from .hierarchical import HierarchicalVote
from .local import LocalVote
from .quorum import QuorumVote
from .quorum_hierarchical import HierarchicalQuorumVote
from .quorum_sharded import ShardedQuorumVote
from .quorum_tree import TreeQuorumVote
from .server import ServerVote
from .sharded import ShardedVote
from .tree import TreeVote

__all__ = ["TOPOLOGIES", "QUORUM_VOTES", "AUTO", "make_vote", "make_quorum_vote",
           "check_topology", "resolve_topology", "SignVote", "ServerVote", "TreeVote",
           "ShardedVote", "AllgatherVote", "HierarchicalVote", "LocalVote", "QuorumVote",
           "ShardedQuorumVote", "HierarchicalQuorumVote",
           "TreeQuorumVote", "Traffic", "VoteTimeout", "bounded", "check_comm",
           "default_timeout", "wait_all"]

#: Topology name -> class. Every entry gives the same answer bit for bit.
TOPOLOGIES: dict[str, type[SignVote]] = {
    "server": ServerVote,
    "tree": TreeVote,
    "sharded": ShardedVote,
    "allgather": AllgatherVote,
    "hierarchical": HierarchicalVote,
}

#: Topology name -> the class of its vote closed on a quorum (mpisign.collectives.quorum).
QUORUM_VOTES: dict[str, type[SignVote]] = {
    "server": QuorumVote,
    "sharded": ShardedQuorumVote,
    "hierarchical": HierarchicalQuorumVote,
    "tree": TreeQuorumVote,
}

#: Let the cost model choose (see :func:`resolve_topology`).
AUTO = "auto"

log = logging.getLogger(__name__)
_links: dict = {}     # communicator handle -> _Measured
_announced: set = set()


def check_topology(topology) -> str:
    """Return ``topology`` if it names a known topology or "auto", else raise ValueError."""
    if topology != AUTO and topology not in TOPOLOGIES:
        raise ValueError(f"topology must be one of {sorted(TOPOLOGIES) + [AUTO]}, "
                         f"got {topology!r}")
    return topology


def resolve_topology(topology: str, comm, n_coords: int) -> str:
    """``topology`` itself, or for "auto" the cost model's choice for ``n_coords`` on ``comm``.

    Collective the first time "auto" meets a communicator: the ranks find the nodes and measure
    the link (a short ping-pong between ranks 0 and 1; on several nodes, one inside a node and
    one between two nodes) and every rank gets rank 0's figures, so all choose alike. The
    choice is logged once on rank 0.
    """
    check_topology(topology)
    if topology != AUTO:
        return topology
    if comm.Get_size() == 1:
        return "server"  # nothing travels on one rank
    key = comm.py2f()
    if key not in _links:
        _links[key] = _Measured(comm)
    measured = _links[key]
    choice = measured.choose(n_coords)
    if comm.Get_rank() == 0 and (key, n_coords, choice) not in _announced:
        _announced.add((key, n_coords, choice))
        log.info("topology=auto: %s for %d coordinates on %d ranks (%s)", choice, n_coords,
                 comm.Get_size(), measured)
    return choice


class _Measured:
    """A communicator's nodes and links, measured once (collective), and the choice they give."""

    def __init__(self, comm):
        self.nodes = discover(comm)
        members = self.nodes.members
        self.hierarchical = 1 < len(members) < comm.Get_size()
        if not self.hierarchical:   # one node, or one rank a node: one kind of link
            self.link, self.between = links.measure_link(comm), None
            return
        inside = max(members, key=len)[:2]
        self.link = links.measure_link(comm, pair=tuple(inside))
        self.between = links.measure_link(comm, pair=(members[0][0], members[1][0]))

    def choose(self, n_coords: int) -> str:
        if not self.hierarchical:
            return costmodel.choose(n_coords, len(self.nodes.node_of), self.link)
        return costmodel.choose_nodes(n_coords, self.nodes.sizes, self.link, self.between)

    def __str__(self) -> str:
        text = f"link: alpha {1e6 * self.link.alpha:.1f} us, {self.link.gbit_per_s:.2f} Gbit/s"
        if self.between is not None:
            text = (f"{self.nodes.describe()}; inside a node {text}; between nodes: alpha "
                    f"{1e6 * self.between.alpha:.1f} us, {self.between.gbit_per_s:.2f} Gbit/s")
        return text


def make_vote(topology: str, comm, timeout: float | None = None, n_coords: int = 0,
              tally=None) -> SignVote:
    """The vote collective for ``topology`` over ``comm``; "auto" resolves with ``n_coords``
    (and measures the link the first time, see :func:`resolve_topology`). ``tally``: see
    :class:`SignVote` (default: the host reference, for numpy or torch words)."""
    chosen = resolve_topology(topology, comm, n_coords)
    return TOPOLOGIES[chosen](comm, timeout=timeout, tally=tally)


def make_quorum_vote(topology: str, comm, quorum: int, grace: float = 0.0,
                     timeout: float | None = None, tally=None) -> SignVote:
    """The vote of ``topology`` over ``comm`` that closes once ``quorum`` ranks have voted,
    plus up to ``grace`` seconds (see :mod:`mpisign.collectives.quorum`; the topology is
    checked by :func:`mpisign.collectives.quorum.check_quorum_topology`)."""
    return QUORUM_VOTES[topology](comm, timeout=timeout, tally=tally, quorum=quorum,
                                  grace=grace)
