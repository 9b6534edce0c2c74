"""The link's figures for the cost model (:mod:`mpisign.collectives.costmodel`), measured: a
ping-pong fits the latency ``alpha`` and the time per byte ``beta``, a numpy pass the time per
byte of local work ``gamma``."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["Link", "measure_link"]


@dataclass(frozen=True)
class Link:
    """Network and compute figures: ``alpha`` s per message, ``beta`` s per byte on the wire,
    ``gamma`` s per byte of one local elementwise pass."""

    alpha: float
    beta: float
    gamma: float = 0.0

    def __post_init__(self):
        for name in ("alpha", "beta", "gamma"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"Link.{name} must be a finite number >= 0, got {value!r}")

    @classmethod
    def from_bandwidth(cls, gbit_per_s: float, alpha: float, gamma: float = 0.0) -> "Link":
        """A link of ``gbit_per_s`` Gbit/s (10^9 bits) and latency ``alpha`` seconds."""
        if not gbit_per_s > 0:
            raise ValueError(f"bandwidth must be > 0 Gbit/s, got {gbit_per_s!r}")
        return cls(alpha=alpha, beta=8 / (gbit_per_s * 1e9), gamma=gamma)

    @property
    def gbit_per_s(self) -> float:
        """Bandwidth in Gbit/s (inf for beta = 0)."""
        return math.inf if self.beta == 0 else 8 / self.beta / 1e9

    def as_dict(self) -> dict:
        return asdict(self)


def _pingpong(comm, nbytes: int, repeat: int, concurrent: bool, pair=(0, 1)) -> float:
    """Best half round trip of ``nbytes`` between the ranks of ``pair`` (the others only wait),
    or, ``concurrent``, between every pair (2i, 2i+1) at once, as seen by the slowest pair."""
    from mpi4py import MPI  # here, not at import: the model itself needs no MPI

    rank, size = comm.Get_rank(), comm.Get_size()
    peer = rank ^ 1 if concurrent else {pair[0]: pair[1], pair[1]: pair[0]}.get(rank)
    if peer is not None and peer >= size:
        peer = None  # odd M: the last rank has no partner
    buf = np.zeros(max(1, nbytes), dtype=np.uint8)
    best = math.inf
    for i in range(repeat + 1):  # the first is a warm-up (connections, registration)
        comm.Barrier()
        t = time.perf_counter()
        if peer is not None and rank < peer:
            comm.Send(buf, dest=peer, tag=77)
            comm.Recv(buf, source=peer, tag=77)
        elif peer is not None:
            comm.Recv(buf, source=peer, tag=77)
            comm.Send(buf, dest=peer, tag=77)
        dt = (time.perf_counter() - t) / 2 if peer is not None else 0.0
        if concurrent:
            dt = comm.allreduce(dt, op=MPI.MAX)
        if i:
            best = min(best, dt)
    return best


def _pass_seconds_per_byte(nbytes: int, repeat: int) -> float:
    """Best time per byte of one numpy XOR pass over ``nbytes``-byte uint64 rows."""
    words = max(1, nbytes // 8)
    a = np.arange(words, dtype=np.uint64)
    b = a[::-1].copy()
    out = np.empty_like(a)
    best = math.inf
    for i in range(repeat + 1):
        t = time.perf_counter()
        np.bitwise_xor(a, b, out=out)
        if i:
            best = min(best, time.perf_counter() - t)
    return best / (8 * words)


def measure_link(comm, small: int = 8, large: int = 8 << 20, repeat: int = 5,
                 compute_bytes: int = 32 << 20, concurrent: bool = False, pair=(0, 1)) -> Link:
    """Fit ``alpha`` and ``beta`` by a ping-pong between ranks 0 and 1 (or the two ranks of
    ``pair``: two ranks of one node, or of two nodes), ``gamma`` by a numpy pass.

    Collective over ``comm``: every rank must call it, and every rank gets the same figures.
    ``alpha`` is the half round trip of ``small`` bytes; ``beta`` the slope between ``small``
    and ``large`` bytes (keep ``large`` well above tc's burst and MPI's eager limit); ``gamma``
    the time per byte of one XOR over ``compute_bytes``, on rank 0 while the others wait.
    ``concurrent=True`` measures under load instead: every pair of ranks (2i, 2i+1) ping-pongs
    at once and every rank times the XOR at once, and the slowest counts: what ranks that share
    cores, memory or a switch see in a collective. On one rank, alpha = beta = 0. Takes about
    ``4 (repeat + 1) large / bandwidth`` seconds (under 1 s at 1 Gbit/s with the defaults).
    """
    if not 0 < small < large:
        raise ValueError(f"need 0 < small < large bytes, got small={small}, large={large}")
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    from ..mpi.comm import bounded

    # Wait on MPI, bounded: a rank that never arrives raises VoteTimeout instead of a hang; once
    # all are here, the blocking ping-pongs below time MPI itself, not a polling loop.
    bounded(comm.Ibarrier(), f"measure_link on rank {comm.Get_rank()}")
    alpha = beta = gamma = 0.0
    if comm.Get_size() > 1:
        t_small = _pingpong(comm, small, repeat, concurrent, pair)
        t_large = _pingpong(comm, large, repeat, concurrent, pair)
        beta = max(0.0, (t_large - t_small) / (large - small))
        alpha = max(0.0, t_small - beta * small)
    if concurrent:
        from mpi4py import MPI

        comm.Barrier()
        gamma = comm.allreduce(_pass_seconds_per_byte(compute_bytes, repeat), op=MPI.MAX)
    elif comm.Get_rank() == 0:
        gamma = _pass_seconds_per_byte(compute_bytes, repeat)
    # Every rank gets rank 0's figures, so that choose() agrees everywhere.
    alpha, beta, gamma = comm.bcast((alpha, beta, gamma), root=0)
    return Link(alpha=alpha, beta=beta, gamma=gamma)
