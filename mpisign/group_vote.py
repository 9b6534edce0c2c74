"""``majority_vote(x, comm=process_group)``: the public vote over a ``torch.distributed`` process
group, for a job that has torch.distributed and no MPI (``torchrun``, gloo or NCCL).

The same packed words, the same zero rule (``(rank + step) % 2``) and the same tally as over MPI
(:mod:`mpisign.collectives.torchdist`), so the result is the MPI vote's, bit for bit, over
the group's ``"server"``, ``"allgather"``, ``"sharded"`` or ``"tree"`` topology.
What each group keeps is :class:`_Kept`: the call count (the default ``step``) and one vote and
word buffer per kind of call (topology, size, device, dtype). The first call of a kind checks,
with one all-gather of 8 bytes, that every rank of the group calls it alike (the same topology
and size), or raises ``ValueError`` naming the ranks that differ, on every rank.

What the MPI path has and a process group does not: ``quorum=`` (it needs messages that a rank
can leave unanswered) and ``elastic=`` (ULFM): both are refused with a clear error. A group's
own timeout (``init_process_group(timeout=...)``) bounds each call, not ``timeout=``.
"""

from __future__ import annotations

import weakref

import torch

from .backends import packing, signs
from .collectives.base import Traffic
from .collectives.torchdist import make_group_vote
from .optim.grouped import check_group_options, is_process_group
from .optim.header import digest64

__all__ = ["is_process_group", "check_group_call", "group_vote"]


def check_group_call(topology: str, quorum, elastic: bool, timeout) -> None:
    """The options of ``majority_vote`` that a process group cannot carry: ValueError, before
    any communication, on every rank alike (the optimizers' checks, and ``timeout=``)."""
    check_group_options("majority_vote", topology, elastic, quorum, overlap=False)
    if timeout is not None:
        raise ValueError("majority_vote over a torch.distributed process group: its calls are "
                         "bounded by the group's own timeout (init_process_group(timeout=...)), "
                         "not timeout=")


class _Call:
    """One kind of call's vote and word buffer, kept across calls."""

    def __init__(self, group, topology: str, like: torch.Tensor):
        agreed = None
        if like.is_cuda:   # host words, which the group carries (to the GPU for NCCL)
            from .cuda import startup
            agreed = startup.STAGED
        self.backend = signs.signs_for([like], agreed)
        self.words = self.backend.words(packing.n_words(like.numel()))
        self.voter = make_group_vote(group, topology, tally=self.backend.tally)


class _Kept:
    """What ``majority_vote`` keeps on one process group: its call count and calls by kind."""

    def __init__(self):
        self.step = 0
        self.calls: dict = {}


_KEPT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def group_vote(x: torch.Tensor, group, topology: str, step: int | None,
               stats: dict | None, out: torch.Tensor | None) -> torch.Tensor:
    """``majority_vote`` over ``group`` (its arguments checked by ``majority_vote``)."""
    kept = _KEPT.get(group)
    if kept is None:
        kept = _KEPT[group] = _Kept()
    if step is None:
        step, kept.step = kept.step, kept.step + 1
    src = x.detach().contiguous()
    n = src.numel()
    kind = (topology, n, src.device, src.dtype)
    call = kept.calls.get(kind)
    if call is None:
        call = _Call(group, topology, src)
        differing = call.voter.ranks_differing(
            digest64(repr((topology, n)).encode()).to_bytes(8, "little"))
        if differing:
            raise ValueError(f"majority_vote over a process group: rank(s) {differing} call it "
                             f"with another topology or size than the group's first rank (this "
                             f"rank's: {topology!r}, {n} coordinates)")
        kept.calls[kind] = call
    before = (call.voter.traffic.sent, call.voter.traffic.received)
    call.backend.pack(src, (call.voter.rank + step) % 2, call.words)
    call.backend.settle()
    plus, tie = call.voter.vote(call.words, n)
    if stats is not None:
        traffic: Traffic = call.voter.traffic
        stats.update(bytes_sent=traffic.sent - before[0],
                     bytes_received=traffic.received - before[1])
    result = call.backend.unpack(plus, tie, n, x, out)
    return result if out is not None else result.view(x.shape)
