"""The GPU path, agreed by every rank and proven on the wire before the first vote.

Each rank first finds what its own device allows, a *level*: :data:`RESIDENT` (words on the
device, MPI is CUDA-aware), :data:`STAGED` (kernels on the device, words through host memory),
:data:`HOST` (kernels failed their self-check: the CPU reference on host copies) or
:data:`FAULTED` (the self-check left the device unusable: no path works). A rank without CUDA
tensors has no opinion and offers :data:`RESIDENT`, the most permissive level.

:func:`agree` then takes, on every rank at once, the most conservative level any rank offers:

* one rank's faulted device stops every rank with :class:`DeviceFault`, instead of one rank
  dying and the others waiting for it;
* device-resident words are first proven by :func:`ring_transfer`: every rank sends a small
  buffer of its words (device memory on the GPU ranks) to the next rank and checks what the
  previous one sent. Any wrong bit or MPI error anywhere puts every rank on the staged path,
  logged as an error. (A library that is not CUDA-aware may crash on a device pointer instead:
  the log line before the transfer says what to set.) The proof runs until it has passed once
  on every rank.

Every collective here is bounded by the timeout (:func:`mpisign.mpi.comm.bounded`), so a rank that
never comes to the agreement ends in :class:`mpisign.mpi.comm.VoteTimeout`, not a hang.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from mpi4py import MPI

from ..mpi.comm import bounded, device_of, wait_all
from .aware import sync_for_mpi

__all__ = ["FAULTED", "HOST", "STAGED", "RESIDENT", "NAMES", "DeviceFault", "agree",
           "ring_transfer", "device_usable"]

log = logging.getLogger(__name__)

FAULTED, HOST, STAGED, RESIDENT = -1, 0, 1, 2
NAMES = {FAULTED: "faulted device", HOST: "CPU reference on host copies",
         STAGED: "GPU kernels, words staged through host memory",
         RESIDENT: "GPU kernels, words on the device (CUDA-aware MPI)"}
_PROOF_WORDS = 33   # odd and past a 256-byte line: no size an MPI path special-cases
_PROOF_TAG = 0x7A11


class DeviceFault(RuntimeError):
    """A rank's CUDA device failed so that no path can use it (a sticky fault: every later
    CUDA call on that context fails too)."""


def device_usable(device: torch.device) -> bool:
    """Whether ``device`` still takes work after a failed self-check: a sticky fault (an
    illegal address, say) makes every later call on its context fail, the fallback's copies
    to the host included."""
    try:
        torch.cuda.synchronize(device)
        torch.zeros(1, device=device).cpu()
        return True
    except Exception as exc:   # the CUDA error itself: what a dead context raises varies
        log.error("CUDA device %s is unusable after its kernels' self-check: %s", device, exc)
        return False


def _pattern(rank: int, w: int) -> np.ndarray:
    """The words ``rank`` sends in the proof: every bit position taken in both states."""
    i = np.arange(w, dtype=np.uint64)
    return (i * np.uint64(0x9E3779B97F4A7C15)) ^ np.uint64(rank) ^ (i << np.uint64(57))


def ring_transfer(comm, words_of, timeout: float) -> bool:
    """Send a pattern from this rank's kind of word buffer (``words_of(w)``: a numpy uint64
    array, or an int64 tensor on the device) to the next rank, receive the previous rank's into
    another, and check every bit. True where this rank received the right bits."""
    rank, size = comm.Get_rank(), comm.Get_size()
    send, recv = words_of(_PROOF_WORDS), words_of(_PROOF_WORDS)
    pattern = _pattern(rank, _PROOF_WORDS)
    tensor = isinstance(send, torch.Tensor)
    if tensor:
        send.copy_(torch.from_numpy(pattern.view(np.int64)))
        sync_for_mpi(send.device)   # MPI reads send next
    else:
        send[:] = pattern
    after, before = (rank + 1) % size, (rank - 1) % size
    requests = []
    for buf, call, peer in ((recv, comm.Irecv, before), (send, comm.Isend, after)):
        with device_of(buf):
            requests.append(call(buf, peer, _PROOF_TAG))
    wait_all(requests, [before, after], timeout, f"proving the GPU path's transfer on rank {rank}")
    got = recv.cpu().numpy().view(np.uint64) if tensor else recv
    return bool(np.array_equal(got, _pattern(before, _PROOF_WORDS)))


def _min(comm, values: list[int], what: str, timeout: float) -> list[int]:
    mine = np.array(values, dtype=np.int64)
    every = np.empty_like(mine)
    bounded(comm.Iallreduce(mine, every, op=MPI.MIN), what, timeout)
    return [int(v) for v in every]


def agree(comm, level: int | None, proven: bool, words_of, timeout: float) -> int | None:
    """The level every rank of ``comm`` takes (collective; see the module docstring).

    ``level``: what this rank's device allows, None for a rank without CUDA tensors (no
    opinion); ``proven``: this rank's resident transfer has passed the proof before (or it has
    no device); ``words_of(w)``: a word buffer of the kind this rank would vote with, for the
    proof. Raises :class:`DeviceFault` on every rank when any rank's device is faulted. None:
    no rank has CUDA tensors."""
    rank = comm.Get_rank()
    offer = RESIDENT if level is None else level
    agreed, all_proven, no_device = _min(comm, [offer, int(proven or level is None),
                                                int(level is None)],
                                         "agreeing on the GPU path", timeout)
    if no_device:
        return None   # no rank has CUDA tensors: nothing to agree on
    if agreed == FAULTED:
        raise DeviceFault(f"a rank's CUDA device failed its kernels' self-check and is no longer "
                          f"usable (rank {rank} offered: {NAMES[offer]}); see that rank's log")
    if agreed == RESIDENT and not all_proven:
        log.info("proving CUDA-aware MPI with a %d-word device transfer between ranks; a crash "
                 "here means MPI cannot take device memory: set MPISIGN_CUDA_AWARE=0",
                 _PROOF_WORDS)
        try:
            ok = ring_transfer(comm, words_of, timeout)
        except MPI.Exception as exc:
            log.error("rank %d: the device transfer failed in MPI: %s", rank, exc)
            ok = False
        if not _min(comm, [int(ok)], "the GPU path's proof", timeout)[0]:
            if rank == 0 or not ok:
                log.error("device words did not cross MPI intact (wrong bits on rank %s): every "
                          "rank stages its words through host memory instead",
                          rank if not ok else "another")
            return STAGED
    if level is not None and agreed < level:
        log.warning("GPU path: %s on every rank (this rank could take: %s)",
                    NAMES[agreed], NAMES[level])
    return agreed
