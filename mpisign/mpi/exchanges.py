"""The small exchanges beside the vote, each one bounded collective on the optimizer's own
communicator: which parameters have a gradient on some rank, and the parameters' digests of the
consistency check. (The monitor's figures ride in the step header: :mod:`mpisign.optim.header`.)"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from mpi4py import MPI

from .comm import bounded

__all__ = ["start_presence", "start_all_zero", "all_zero", "zero_flags", "zero_mask", "params_digest",
           "ranks_differing"]


def start_presence(comm, present: list, timeout: float, what: str):
    """Start an OR over the ranks of one bit a parameter (``present[i]``: this rank has the
    gradient of parameter ``i``). Returns the function that waits and gives the OR as a list of
    bools; ``what`` names the wait in a timeout's message."""
    mine = np.packbits(present, bitorder="little")
    every = np.empty_like(mine)
    req = comm.Iallreduce(mine, every, op=MPI.BOR)

    def wait() -> list:
        # mpi4py keeps no reference to a nonblocking collective's buffers: ``mine`` must live
        # until the request is done, or MPI reads freed memory (it did: the exact-zero AND
        # came out wrong in ~2% of its bits before its buffer was kept like this).
        bounded((req, mine)[0], what, timeout)
        return np.unpackbits(every, count=len(present), bitorder="little").astype(bool).tolist()
    return wait


FULL = np.uint64(2**64 - 1)   # a word whose 64 coordinates are all exactly 0


def zero_flags(zeros: np.ndarray) -> np.ndarray:
    """Two flags a word of a zero mask, as 0/1 bytes: some coordinate of it is 0 (the first
    half), all of them are (the second)."""
    return np.concatenate([zeros != 0, zeros == FULL]).astype(np.uint8)


def zero_mask(zeros: np.ndarray, flags: np.ndarray, and_words) -> np.ndarray | None:
    """The coordinates exactly 0 on every rank, from the ranks' AND of :func:`zero_flags`
    (``flags``): a word whole on every rank is whole, a word that every rank flagged but not
    every rank whole gets the AND of the ranks' masks (``and_words`` of this rank's words at
    those places: a collective). None where there is nothing."""
    w = zeros.size
    some, whole = flags[:w].astype(bool), flags[w:].astype(bool)
    shared = np.flatnonzero(some & ~whole)
    if shared.size == 0 and not whole.any():
        return None
    mask = np.zeros_like(zeros)
    mask[whole] = FULL
    if shared.size:
        mask[shared] = and_words(np.ascontiguousarray(zeros[shared]))
    return mask


def start_all_zero(comm, zeros: np.ndarray, timeout: float, what: str):
    """:func:`all_zero`, started: its flags' AND is posted now (beside the votes); the
    function returned waits for it, and ANDs the shared words' masks if there are any."""
    if zeros.size == 0:
        return lambda: None
    mine = np.packbits(zero_flags(zeros), bitorder="little")
    every = np.empty_like(mine)
    req = comm.Iallreduce(mine, every, op=MPI.BAND)

    def and_words(words: np.ndarray) -> np.ndarray:
        both = np.empty_like(words)
        bounded(comm.Iallreduce(words, both, op=MPI.BAND), what, timeout)
        return both

    def wait() -> np.ndarray | None:
        bounded((req, mine)[0], what, timeout)   # mine: alive until MPI is done (above)
        flags = np.unpackbits(every, count=2 * zeros.size, bitorder="little")
        return zero_mask(zeros, flags, and_words)
    return wait


def all_zero(comm, zeros: np.ndarray, timeout: float, what: str) -> np.ndarray | None:
    """The coordinates that are exactly 0 on every rank, as packed words, from each rank's
    zero mask ``zeros``: an AND over the ranks of two flags a word (some coordinate of it is 0
    here; all are), 1/32 of the words' bytes, then, only for the words that every rank
    flagged but not every rank has whole, an AND of their masks. A model without exact zeros
    pays the flags alone; an embedding's rows that no rank saw cost their flags, not their
    words. None where no coordinate is 0 on every rank's flags. Every rank must pass masks of
    the same length."""
    return start_all_zero(comm, zeros, timeout, what)()


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
