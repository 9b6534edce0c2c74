"""``majority_vote``: the tensor-level entry to the collective.

.. math::  \\mathrm{majority\\_vote}(x) = \\operatorname{sign}\\Big(\\sum_{r} \\operatorname{sign}(x_r)\\Big)

over the ranks ``r`` of ``comm`` (Bernstein et al., ICLR 2019), with 0 where the vote is tied.
Only packed sign bits cross the wire: one bit per coordinate from each rank, plus what the
topology needs for counts and the result. A coordinate that is 0 or NaN on a rank is sent as
``(rank + step) % 2`` (see :mod:`mpisign.packing`): one bit cannot carry "no vote", and this rule
makes ranks that all hold 0 split their votes evenly. Without ``step=``, each call on a
communicator advances that communicator's own count, so that in a loop such coordinates
alternate instead of drifting one way. On one rank there is no vote: the result is ``sign(x)``,
0 for 0 and NaN.

The vote travels on a duplicate of ``comm`` kept for ``majority_vote`` alone (made by every rank
at the first call on a communicator, freed with it), so it never meets the user's messages.
"""

from __future__ import annotations

import torch
from mpi4py import MPI

from . import packing, signs
from .collectives import check_comm, check_topology, make_vote
from .isolation import shared_vote_comm

__all__ = ["majority_vote"]


def majority_vote(x: torch.Tensor, comm=MPI.COMM_WORLD, topology: str = "server", *,
                  step: int | None = None, timeout: float | None = None,
                  stats: dict | None = None) -> torch.Tensor:
    """Elementwise majority of the signs of ``x`` over the ranks of ``comm``.

    Args:
        x: floating tensor of any shape, different on each rank (same shape on all).
        comm: an mpi4py intracommunicator.
        topology: a key of ``mpisign.TOPOLOGIES`` (``"server"``: gather to rank 0, ``"tree"``,
            ``"sharded"``, ``"allgather"``) or ``"auto"`` (the cost model's choice; the link is
            measured, collectively, the first time a communicator is seen).
        step: mixes into the bit sent for 0/NaN coordinates, ``(rank + step) % 2``. None:
            the number of earlier calls on ``comm`` (the same on every rank), so that
            coordinates that are 0 everywhere alternate from call to call instead of drifting.
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
    if step is not None and (not isinstance(step, int) or step < 0):
        raise ValueError(f"step must be an int >= 0 or None, got {step!r}")
    n = x.numel()
    rank, size = comm.Get_rank(), comm.Get_size()
    if size == 1:   # no vote: the sign itself, 0 for 0 and NaN
        if stats is not None:
            stats.update(bytes_sent=0, bytes_received=0)
        return torch.nan_to_num(x.detach(), nan=0.0).sign()
    own = shared_vote_comm(comm, timeout)
    step = own.next_step() if step is None else step
    zero_bit = (rank + step) % 2
    src = x.detach().contiguous()
    backend = signs.signs_for([src])   # as the optimizer chooses, for this one tensor
    words = backend.words(packing.n_words(n))
    backend.pack(src, zero_bit, words)
    voter = make_vote(topology, own.comm, timeout=timeout, n_coords=n, tally=backend.tally)
    plus, tie = voter.vote(words, n, step=step)
    if stats is not None:
        stats.update(bytes_sent=voter.traffic.sent, bytes_received=voter.traffic.received)
    return backend.unpack(plus, tie, n, x).reshape(x.shape)
