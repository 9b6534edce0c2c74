"""The custom MPI collective: a majority vote of packed sign bits, one module per topology.

``make_vote(topology, comm)`` returns an object whose ``vote(words, n)`` gives every rank the
packed majority ``(plus, tie)`` of all ranks' packed signs, the same bits whatever the topology.
"""

from __future__ import annotations

from .base import SignVote, Traffic, VoteTimeout, check_comm, default_timeout, wait_all
from .allgather import AllgatherVote
from .server import ServerVote
from .sharded import ShardedVote
from .tree import TreeVote

__all__ = ["TOPOLOGIES", "make_vote", "check_topology", "SignVote", "ServerVote", "TreeVote", "ShardedVote", "AllgatherVote",
           "Traffic", "VoteTimeout", "check_comm", "default_timeout", "wait_all"]

#: Topology name -> class. Every entry gives the same answer bit for bit.
TOPOLOGIES: dict[str, type[SignVote]] = {
    "server": ServerVote,
    "tree": TreeVote,
    "sharded": ShardedVote,
    "allgather": AllgatherVote,
}


def check_topology(topology) -> str:
    """Return ``topology`` if it names a known topology, else raise ValueError naming the choices."""
    if topology not in TOPOLOGIES:
        raise ValueError(f"topology must be one of {sorted(TOPOLOGIES)}, got {topology!r}")
    return topology


def make_vote(topology: str, comm, timeout: float | None = None) -> SignVote:
    """The vote collective for ``topology`` over ``comm`` (no communication happens here)."""
    return TOPOLOGIES[check_topology(topology)](comm, timeout=timeout)
