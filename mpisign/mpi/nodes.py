"""Which ranks share a node: the grouping the hierarchical vote counts inside.

By default the ranks that share memory (``MPI.COMM_TYPE_SHARED``) form a node. ``$MPISIGN_NODE``,
when set on a rank, names that rank's node instead: the emulated cluster's network namespaces
share one hostname and one ``/dev/shm``, so shared memory cannot tell its hosts apart, and a
user may want to group ranks by something MPI does not see (a socket, a switch).

Nodes are numbered in the order of their lowest rank, and each node's ranks are listed in rank
order, so every rank derives the same grouping from the same names.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from .comm import bounded, check_comm, default_timeout

__all__ = ["NODE_VAR", "Nodes", "discover"]

#: The environment variable that names a rank's node.
NODE_VAR = "MPISIGN_NODE"


@dataclass(frozen=True)
class Nodes:
    """A grouping of a communicator's ranks into nodes."""

    node_of: tuple[int, ...]               # rank -> node index
    members: tuple[tuple[int, ...], ...]   # node index -> its ranks, ascending

    @classmethod
    def from_keys(cls, keys) -> "Nodes":
        """The grouping where ranks with equal ``keys[rank]`` share a node."""
        index: dict = {}
        node_of = tuple(index.setdefault(k, len(index)) for k in keys)
        members = tuple(tuple(r for r, i in enumerate(node_of) if i == n)
                        for n in range(len(index)))
        return cls(node_of, members)

    @property
    def sizes(self) -> list[int]:
        """Ranks in each node."""
        return [len(m) for m in self.members]

    def __len__(self) -> int:
        return len(self.members)

    def describe(self) -> str:
        """E.g. "2 nodes of 4+4 ranks"."""
        return f"{len(self)} node{'s' if len(self) != 1 else ''} of " \
               f"{'+'.join(map(str, self.sizes))} ranks"


def _key(text: str) -> int:
    """A nonzero 64-bit digest of ``text`` (0 stands for "no name")."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") | 1


def discover(comm: MPI.Intracomm, name: str | None = None,
             timeout: float | None = None) -> Nodes:
    """Collective over ``comm``: every rank's node (see the module's rules).

    ``name``, if given, names this rank's node (overriding ``$MPISIGN_NODE``). The ranks first
    trade names; only if some rank has none do they all split by shared memory. Bounded: a rank
    that never joins raises :class:`mpisign.mpi.comm.VoteTimeout` instead of hanging, and every rank
    has been seen before the split, which blocks. (On the emulated cluster, where every rank
    has a name, Open MPI's shared-memory split hung on one namespace's ranks.)"""
    check_comm(comm)
    timeout = default_timeout() if timeout is None else timeout
    if name is None:
        name = os.environ.get(NODE_VAR) or None
    keys = _trade(comm, 0 if name is None else _key(f"name:{name}"), timeout, "names")
    if keys.all():
        return Nodes.from_keys(keys.tolist())
    shared = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    groups = shared.Get_group(), comm.Get_group()
    try:   # the node's lowest rank names a shared-memory node: shared rank 0, as key=rank orders
        lowest = groups[0].Translate_ranks([0], groups[1])[0]
    finally:
        for group in groups:
            group.Free()
        shared.Free()
    mine = _key(f"shared:{lowest}") if name is None else _key(f"name:{name}")
    return Nodes.from_keys(_trade(comm, mine, timeout, "shared-memory nodes").tolist())


def _trade(comm, key: int, timeout: float, what: str) -> np.ndarray:
    """Every rank's ``key`` (nonzero), or 0 where a rank has none; bounded."""
    keys = np.empty(comm.Get_size(), dtype=np.uint64)
    mine = np.array([key], dtype=np.uint64)   # a name: alive until MPI is done with it
    bounded(comm.Iallgather(mine, keys), f"exchanging the {what} on rank {comm.Get_rank()}",
            timeout)
    return keys
