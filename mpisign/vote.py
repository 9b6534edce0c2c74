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
from .elastic import is_failure, require_ulfm
from .isolation import shared_vote_comm, vote_state
from .recovery import recover_vote

__all__ = ["majority_vote"]


def majority_vote(x: torch.Tensor, comm=MPI.COMM_WORLD, topology: str = "server", *,
                  step: int | None = None, timeout: float | None = None,
                  stats: dict | None = None, out: torch.Tensor | None = None,
                  elastic: bool = False) -> torch.Tensor:
    """Elementwise majority of the signs of ``x`` over the ranks of ``comm``.

    Args:
        x: floating tensor of any shape, different on each rank (same shape on all).
        comm: an mpi4py intracommunicator.
        topology: a key of ``mpisign.TOPOLOGIES`` (``"server"``: gather to rank 0, ``"tree"``,
            ``"sharded"``, ``"allgather"``, ``"hierarchical"``: exact counts inside each node,
            see :mod:`mpisign.collectives.hierarchical`) or ``"auto"`` (the cost model's choice; the link is
            measured, collectively, the first time a communicator is seen).
        step: mixes into the bit sent for 0/NaN coordinates, ``(rank + step) % 2``. None:
            the number of earlier calls on ``comm`` (the same on every rank), so that
            coordinates that are 0 everywhere alternate from call to call instead of drifting.
        timeout: seconds to wait on peers before raising ``VoteTimeout``
            (default ``$MPISIGN_TIMEOUT`` or 300).
        stats: if a dict, receives ``bytes_sent`` and ``bytes_received`` for this call; with
            ``"hierarchical"`` also ``bytes_sent_between_nodes`` and
            ``bytes_received_between_nodes``, the part of those that crossed between nodes.
        out: a tensor of ``x``'s shape, dtype and device to hold the result (it may be ``x``).
        elastic: survive dead ranks (needs ULFM: Open MPI 5 started with ``mpirun --with-ft
            ulfm``; else :class:`mpisign.elastic.ElasticUnavailable`). A call that meets a dead
            rank returns what the survivors agree on: the result that one of them already had
            from the full vote, else their own vote. Later calls on ``comm`` vote among the
            survivors; ``stats["lost_ranks"]`` names the dead by their rank in ``comm``. Every
            rank must pass the same ``elastic``.

    Returns:
        ``out``, or a new tensor of ``x``'s shape, dtype and device, holding -1, 0 (tie) or +1,
        the same on every rank.

    Calls of the same kind (communicator, topology, size, device, dtype) reuse one collective
    and its buffers: in a loop, only the result is allocated, and with ``out`` nothing is.
    """
    # Validate everything before any communication, so every rank raises the same error.
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"x must have a floating dtype, got {x.dtype}")
    check_topology(topology)
    check_comm(comm)
    if elastic:
        require_ulfm()
    if step is not None and (not isinstance(step, int) or step < 0):
        raise ValueError(f"step must be an int >= 0 or None, got {step!r}")
    if out is not None and not (isinstance(out, torch.Tensor) and out.shape == x.shape
                                and out.dtype == x.dtype and out.device == x.device):
        raise ValueError(f"out must be a tensor of x's shape {tuple(x.shape)}, dtype {x.dtype} "
                         f"and device {x.device}, got {_describe(out)}")
    if comm.Get_size() == 1:   # no vote: the sign itself, 0 for 0 and NaN
        if stats is not None:
            stats.update(bytes_sent=0, bytes_received=0)
        result = torch.nan_to_num(x.detach(), nan=0.0, out=out)
        return result.sign_()
    own = vote_state(comm)
    step = own.next_step() if step is None else step
    src = x.detach().contiguous()
    n = src.numel()
    kind = (topology, n, src.device, src.dtype, timeout)
    zero_bit = (comm.Get_rank() + step) % 2
    if elastic:
        plus, tie, call, before = _survived(comm, own, kind, src, zero_bit, step, timeout)
    else:
        call, before = _prepared(comm, own, kind, src, zero_bit, timeout)
        plus, tie = call.voter.vote(call.words, n, step=step)
    if stats is not None:
        after = _counted(call.voter.traffic)
        stats.update({k: v - before.get(k, 0) for k, v in after.items()})
        if elastic:
            stats["lost_ranks"] = list(own.lost)
    result = call.backend.unpack(plus, tie, n, x, out)
    return result if out is not None else result.view(x.shape)


def _prepared(comm, own, kind, src: torch.Tensor, zero_bit: int, timeout):
    """This kind of call's collective over majority_vote's own duplicate of ``comm`` (both
    made the first time: collective), with ``src``'s signs packed into its words; and its
    byte counts so far."""
    shared_vote_comm(comm, timeout)
    call = own.keep(kind, lambda: _Call(kind[0], own.comm, timeout, src))
    call.backend.pack(src, zero_bit, call.words)
    call.backend.settle()
    return call, _counted(call.voter.traffic)


def _survived(comm, own, kind, src: torch.Tensor, zero_bit: int, step: int, timeout):
    """An elastic call: ``(plus, tie, call, before)`` as the plain path gives them, after as
    many recoveries (:func:`mpisign.recovery.recover_vote`) as dead ranks need. Consecutive
    calls alternate between two sets of result buffers, so that a rank that has finished call
    k still holds its result while it votes in call k+1, and can hand it on."""
    call = None
    while True:
        try:
            call, before = _prepared(comm, own, kind, src, zero_bit, timeout)
            plus, tie = call.voter.vote(call.words, src.numel(), step=step,
                                        bucket=own.calls % 2)
            break
        except MPI.Exception as error:
            if not is_failure(error, own.comm):
                raise
            handed = recover_vote(own, None if call is None else call.words, timeout)
            if handed is not None:
                plus, tie = handed
                break
    own.last, own.calls = (plus, tie), own.calls + 1
    return plus, tie, call, before


class _Call:
    """One kind of call's signs backend, collective and word buffer, kept across calls."""

    def __init__(self, topology: str, comm, timeout, like: torch.Tensor):
        # As the optimizer chooses, for one tensor (collective: the ranks agree on a GPU path).
        self.backend = signs.signs_for([like], comm, timeout)
        self.words = self.backend.words(packing.n_words(like.numel()))
        self.voter = make_vote(topology, comm, timeout=timeout, n_coords=like.numel(),
                               tally=self.backend.tally)


def _counted(traffic) -> dict:
    """The byte counts ``stats`` reports: those between nodes where the topology knows them."""
    counted = {"bytes_sent": traffic.sent, "bytes_received": traffic.received}
    if traffic.sent_between_nodes is not None:
        counted.update(bytes_sent_between_nodes=traffic.sent_between_nodes,
                       bytes_received_between_nodes=traffic.received_between_nodes)
    return counted


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"{tuple(t.shape)} {t.dtype} on {t.device}"
    return type(t).__name__
