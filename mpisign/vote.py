"""``majority_vote``: the tensor-level entry to the collective.

.. math::  \\mathrm{majority\\_vote}(x) = \\operatorname{sign}\\Big(\\sum_{r} \\operatorname{sign}(x_r)\\Big)

over the ranks ``r`` of ``comm`` (Bernstein et al., ICLR 2019), with 0 where the vote is tied.
Only packed sign bits cross the wire: one bit per coordinate from each rank, plus what the
topology needs for counts and the result. A coordinate that is 0 or NaN on a rank is sent as
``(rank + step) % 2`` (see :mod:`mpisign.packing`): one bit cannot carry "no vote", and this rule
makes ranks that all hold 0 split their votes evenly.
"""

from __future__ import annotations

import torch
from mpi4py import MPI

from . import packing
from .collectives import check_comm, check_topology, make_vote

__all__ = ["majority_vote"]


def _gpu_path(x: torch.Tensor):
    """The GPU path for ``x`` (:func:`mpisign.cuda.bridge.device_path`), or None: the CPU
    reference path (non-CUDA tensors, float64, no CuPy, or kernels that failed their check)."""
    if not x.is_cuda:
        return None
    from .cuda.bridge import CudaSigns, device_path
    return device_path(x.device) if CudaSigns.handles(x) else None


def majority_vote(x: torch.Tensor, comm=MPI.COMM_WORLD, topology: str = "server", *,
                  step: int = 0, timeout: float | None = None,
                  stats: dict | None = None) -> torch.Tensor:
    """Elementwise majority of the signs of ``x`` over the ranks of ``comm``.

    Args:
        x: floating tensor of any shape, different on each rank (same shape on all).
        comm: an mpi4py intracommunicator.
        topology: a key of ``mpisign.TOPOLOGIES`` (``"server"``: gather to rank 0, ``"tree"``,
            ``"sharded"``, ``"allgather"``) or ``"auto"`` (the cost model's choice; the link is
            measured, collectively, the first time a communicator is seen).
        step: mixes into the bit sent for 0/NaN coordinates, ``(rank + step) % 2``.
        timeout: seconds to wait on peers before raising ``VoteTimeout``
            (default ``$MPISIGN_TIMEOUT`` or 300).
        stats: if a dict, receives ``bytes_sent`` and ``bytes_received`` for this call.

    Returns:
        A new tensor of ``x``'s shape, dtype and device holding -1, 0 (tie) or +1, the same on
        every rank.
    """
    # Validate everything before any communication, so every rank raises the same error.
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"x must have a floating dtype, got {x.dtype}")
    check_topology(topology)
    check_comm(comm)
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    n = x.numel()
    rank, size = comm.Get_rank(), comm.Get_size()
    zero_bit = (rank + step) % 2
    gpu = _gpu_path(x)
    resident = gpu is not None and gpu.resident  # words on the device, for CUDA-aware MPI
    if gpu is not None:  # words on the device, or staged through host memory
        words = gpu.words(packing.n_words(n))
        gpu.pack(x.detach().contiguous(), zero_bit, words)
    else:
        words = packing.pack_signs(x.detach().cpu(), zero_bit=zero_bit)
    if size == 1:
        plus, tie = words, None
        sent = received = 0
    else:
        voter = make_vote(topology, comm, timeout=timeout, n_coords=n,
                          tally=gpu.tally if resident else None)
        plus, tie = voter.vote(words, n, step=step)
        sent, received = voter.traffic.sent, voter.traffic.received
    if stats is not None:
        stats.update(bytes_sent=sent, bytes_received=received)
    if resident:
        return gpu.unpack(plus, tie, n, x.dtype).reshape(x.shape)
    out = packing.unpack_signs(plus, n, tie=tie, dtype=x.dtype)
    return out.reshape(x.shape).to(x.device)
