"""The small exchanges beside the vote, each one bounded collective on the optimizer's own
communicator: which parameters have a gradient on some rank, and the parameters' digests of the
consistency check. (The monitor's figures ride in the step header: :mod:`mpisign.optim.header`.)"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from mpi4py import MPI

from .comm import bounded

__all__ = ["start_presence", "params_digest", "ranks_differing"]


def start_presence(comm, present: list, timeout: float, what: str):
    """Start an OR over the ranks of one bit a parameter (``present[i]``: this rank has the
    gradient of parameter ``i``). Returns the function that waits and gives the OR as a list of
    bools; ``what`` names the wait in a timeout's message."""
    mine = np.packbits(present, bitorder="little")
    every = np.empty_like(mine)
    req = comm.Iallreduce(mine, every, op=MPI.BOR)

    def wait() -> list:
        bounded(req, what, timeout)
        return np.unpackbits(every, count=len(present), bitorder="little").astype(bool).tolist()
    return wait


def params_digest(tensors) -> bytes:
    """A 16-byte hash of the bytes of ``tensors`` (wherever they live), in order."""
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        flat = t.detach().cpu().contiguous().reshape(-1)
        h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.digest()


def ranks_differing(comm, digest: bytes, timeout: float, what: str) -> list[int]:
    """Allgather every rank's ``digest``; the ranks whose digest differs from rank 0's."""
    mine = np.array(list(digest), dtype=np.uint8)
    every = np.empty((comm.Get_size(), mine.size), dtype=np.uint8)
    bounded(comm.Iallgather(mine, every), what, timeout)
    return [r for r in range(comm.Get_size()) if not np.array_equal(every[r], every[0])]
