"""The small exchanges beside the vote, each one bounded collective on the optimizer's own
communicator: which parameters have a gradient on some rank, and the parameters' digests of the
consistency check. (The monitor's figures ride in the step header: :mod:`mpisign.optim.header`.)"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from mpi4py import MPI

from .comm import bounded

__all__ = ["start_presence", "all_zero", "params_digest", "ranks_differing"]


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


def all_zero(comm, zeros: np.ndarray, timeout: float, what: str) -> np.ndarray | None:
    """The coordinates that are exactly 0 on every rank, as packed words, from each rank's
    zero mask ``zeros``: an AND over the ranks of one flag a word (some coordinate of it is 0
    here: 1/64 of the words' bytes), then, only for the words that every rank flagged, an AND
    of their masks. None when no word is flagged by every rank (a model without exact zeros
    pays the flags alone). Every rank must pass masks of the same length."""
    if zeros.size == 0:
        return None
    flags = np.packbits(zeros != 0, bitorder="little")
    every = np.empty_like(flags)
    bounded(comm.Iallreduce(flags, every, op=MPI.BAND), what, timeout)
    shared = np.flatnonzero(np.unpackbits(every, count=zeros.size, bitorder="little"))
    if shared.size == 0:
        return None
    mine = np.ascontiguousarray(zeros[shared])
    both = np.empty_like(mine)
    bounded(comm.Iallreduce(mine, both, op=MPI.BAND), what, timeout)
    mask = np.zeros_like(zeros)
    mask[shared] = both
    return mask


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
