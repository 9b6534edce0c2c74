"""``majority_vote``: the tensor-level entry to the collective.

.. math::  \\mathrm{majority\\_vote}(x) = \\operatorname{sign}\\Big(\\sum_{r} \\operatorname{sign}(x_r)\\Big)

over the ranks ``r`` of ``comm`` (Bernstein et al., ICLR 2019), with 0 where the vote is tied.
Only packed sign bits cross the wire: one bit per coordinate from each rank, plus what the
topology needs for counts and the result. A coordinate that is 0 or NaN on a rank is sent as
``(rank + step) % 2`` (see :mod:`mpisign.backends.packing`): one bit cannot carry "no vote", and this rule
makes ranks that all hold 0 split their votes evenly. Without ``step=``, each call on a
communicator advances that communicator's own count, so that in a loop such coordinates
alternate instead of drifting one way. On one rank there is no vote: the result is ``sign(x)``,
0 for 0 and NaN.

The vote travels on a duplicate of ``comm`` kept for ``majority_vote`` alone (made by every rank
at the first call on a communicator, freed with it), so it never meets the user's messages.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.distributed as dist
from mpi4py import MPI

from .backends import packing, signs
from .collectives import (VoteTimeout, check_comm, check_topology, default_timeout,
                          make_quorum_vote, make_vote)
from .collectives.quorum import QuorumVote, check_quorum, resolve_quorum, survivors_quorum
from .group_vote import check_group_call, group_vote, is_process_group
from .mpi import rollcall
from .mpi.elastic import require_ulfm
from .mpi.isolation import attached, duplicate, release
from .optim.recovery import recover_vote, retry_on_failure, words_like

__all__ = ["majority_vote", "drain_votes"]


def majority_vote(x: torch.Tensor, comm=MPI.COMM_WORLD, topology: str = "server", *,
                  step: int | None = None, timeout: float | None = None,
                  stats: dict | None = None, out: torch.Tensor | None = None,
                  elastic: bool = False, quorum: int | float | None = None, grace: float = 0.0,
                  allow_minority: bool = False) -> torch.Tensor:
    """Elementwise majority of the signs of ``x`` over the ranks of ``comm``.

    Args:
        x: floating tensor of any shape, different on each rank (same shape on all).
        comm: an mpi4py intracommunicator, or a ``torch.distributed`` process group: the
            same vote over its collectives (:mod:`mpisign.group_vote` says what it takes).
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
            ulfm``; else :class:`mpisign.mpi.elastic.ElasticUnavailable`). A call that meets a dead
            rank returns what the survivors agree on: the result that one of them already had
            from the full vote, else their own vote. Later calls on ``comm`` vote among the
            survivors; ``stats["lost_ranks"]`` names the dead by their rank in ``comm``. Every
            rank must pass the same ``elastic``.
        quorum: close the vote once this many ranks' signs are in (an int, or a fraction of
            the ranks, rounded up), plus up to ``grace`` seconds for the rest: the ranks that
            are later abstain (see :mod:`mpisign.collectives.quorum`). Every rank gets the
            same result; ``stats["counted"]`` names the ranks counted. Default: all ranks.
            Any ``topology`` but ``"allgather"`` and ``"auto"``; a quorum of half the ranks or
            fewer needs ``allow_minority=True``. Every rank must pass the same values. With
            ``elastic``, a survivor calls behind takes the results it missed from one further
            on (:func:`mpisign.optim.recovery.recover_vote`); ``stats["counted"]`` names
            ranks of ``comm``.

    Returns:
        ``out``, or a new tensor of ``x``'s shape, dtype and device, holding -1, 0 (tie) or +1,
        the same on every rank.

    Calls of the same kind (communicator, topology, size, device, dtype) reuse one collective
    and its buffers, and a host result's memory once nothing holds it any more (a loop
    ``y = majority_vote(x)`` allocates nothing from its third call on; see :class:`_Results`).
    With ``out``, nothing is allocated at all.
    """
    # Validate everything before any communication, so every rank raises the same error.
    size = _checked_size(x, comm, topology, step, out, quorum, grace, allow_minority, elastic,
                         timeout)
    if size == 1:   # no vote: the sign itself, 0 for 0 and NaN
        _report(stats, {}, [0] if quorum is not None else None, None)
        return torch.nan_to_num(x.detach(), nan=0.0, out=out).sign_()
    if is_process_group(comm):   # torch.distributed's: mpisign.group_vote
        return group_vote(x, comm, topology, step, stats, out)
    own = vote_state(comm)
    step = own.next_step() if step is None else step
    src = x.detach().contiguous()
    n = src.numel()
    kind = (topology, n, src.device, src.dtype, timeout)
    if quorum is not None:   # a quorum's collective is of a kind of its own
        kind += (quorum, grace)
    zero_bit = (comm.Get_rank() + step) % 2
    if elastic:
        voted = None if own.calls in own.backlog else _survived(comm, own, kind, src,
                                                                 zero_bit, step, timeout)
        if voted is None:   # a survivor further on handed this call's result on
            return _handed_on(x, own, stats, out)
        plus, tie, call, before, counted = voted
    else:
        call, before = _prepared(comm, own, kind, src, zero_bit, timeout)
        plus, tie = _voted(call, own, n, step, timeout)
        counted = call.voter.counted if quorum is not None else None
    if stats is not None:
        moved = {k: v - before.get(k, 0) for k, v in _counted(call.voter.traffic).items()}
        _report(stats, moved, counted, own.lost if elastic else None)
    result = call.backend.unpack(plus, tie, n, x, call.results.take(x) if out is None else out)
    return result if out is not None else result.view(x.shape)


def _checked_size(x, comm, topology: str, step, out, quorum, grace: float,
                  allow_minority: bool, elastic: bool, timeout) -> int:
    """majority_vote's arguments, checked before any communication (every rank raises alike),
    and the number of ranks of ``comm``."""
    _check_tensors(x, step, out)
    check_topology(topology)
    if is_process_group(comm):
        check_group_call(topology, quorum, elastic, timeout)
        return dist.get_world_size(comm)
    check_comm(comm)
    if quorum is not None:
        check_quorum(topology, comm, quorum, grace, allow_minority)
    if elastic:
        require_ulfm()
    return comm.Get_size()


def _check_tensors(x, step, out) -> None:
    """The arguments that do not depend on the communicator."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"x must have a floating dtype, got {x.dtype}")
    if step is not None and (not isinstance(step, int) or step < 0):
        raise ValueError(f"step must be an int >= 0 or None, got {step!r}")
    if out is not None and not (isinstance(out, torch.Tensor) and out.shape == x.shape
                                and out.dtype == x.dtype and out.device == x.device):
        raise ValueError(f"out must be a tensor of x's shape {tuple(x.shape)}, dtype {x.dtype} "
                         f"and device {x.device}, got {_describe(out)}")


def _prepared(comm, own, kind, src: torch.Tensor, zero_bit: int, timeout):
    """This kind of call's collective over majority_vote's own duplicate of ``comm`` (both
    made the first time: collective), with ``src``'s signs packed into its words; and its
    byte counts so far."""
    shared_vote_comm(comm, timeout)
    if not own.gpu_agreed:   # at the first call on comm, on every rank: one GPU path for all
        own.gpu_level, own.gpu_agreed = signs.gpu_level([src], own.comm, timeout), True
    call = own.keep(kind, lambda: _Call(kind[0], own.comm, timeout, src, own.gpu_level,
                                        *kind[5:], ranks=own.original.Get_size()))
    call.backend.pack(src, zero_bit, call.words)
    call.backend.settle()
    return call, _counted(call.voter.traffic)


def _voted(call, own, n: int, step: int, timeout):
    """The call's vote on ``own.comm`` (majority_vote's duplicate). A rank whose wait times out
    calls the roll, so that every rank names the same missing ranks; a rank that finds the
    others gave up on an earlier call (it was the stalled one) raises before it votes
    (:mod:`mpisign.mpi.rollcall`)."""
    comm = own.comm
    wait = default_timeout() if timeout is None else timeout
    who = f"majority_vote on rank {comm.Get_rank()}"
    rollcall.check(comm, step, wait, who, own.watch)
    try:
        return call.voter.vote(call.words, n, step=step)
    except VoteTimeout as err:
        named = rollcall.after_timeout(comm, err, step, wait, who)
        if named is err:
            raise
        raise named from err


def _survived(comm, own, kind, src: torch.Tensor, zero_bit: int, step: int, timeout):
    """An elastic call: ``(plus, tie, call, before, counted)`` as the plain path gives them
    (``counted``: ranks of ``comm``, under a quorum), after as many recoveries
    (:func:`mpisign.optim.recovery.recover_vote`) as dead ranks need; None where a recovery
    found that a survivor further on had this call's result: it is in ``own.backlog``.
    Consecutive calls alternate between two sets of result buffers, so that a rank that has
    finished call k still holds its result while it votes in call k+1, and can hand it on; a
    quorum's results are kept for as many calls as a late rank may be behind
    (:meth:`_VoteState.remember`)."""
    prepared: list = []   # the call's collective and byte counts, once made
    quorum = len(kind) > 5

    def attempt():
        prepared[:] = _prepared(comm, own, kind, src, zero_bit, timeout)
        voter = prepared[0].voter
        plus, tie = voter.vote(prepared[0].words, src.numel(), step=step, bucket=own.calls % 2)
        return plus, tie, own.named(voter.counted) if quorum else []

    def recovered():
        return (None,) if recover_vote(own, timeout) else None
    voted = retry_on_failure(attempt, lambda: own.comm, recovered)
    if voted is None:
        return None
    plus, tie, counted = voted
    own.remember(plus, tie, counted)
    return plus, tie, prepared[0], prepared[1], counted


def _handed_on(x: torch.Tensor, own, stats: dict | None, out):
    """An elastic call whose result a survivor further on handed on at a recovery (this rank
    was behind it; under a quorum, maybe calls behind): that result, without a vote. Every
    rank makes the same calls, so its size must be this call's."""
    plus, tie, counted = own.backlog.pop(own.calls)
    n = x.numel()
    if plus.shape[0] != packing.n_words(n):
        raise RuntimeError(f"majority_vote on rank {own.comm.Get_rank()}: call {own.calls} "
                           f"has {n} coordinates here, and the survivor that handed its "
                           f"result on voted {plus.shape[0]} words: the ranks do not make the "
                           f"same calls")
    own.remember(plus, tie, counted)
    _report(stats, {}, counted or None, own.lost)
    backend = signs.signs_for([x], own.gpu_level)
    kind = backend.words(1)
    plus, tie = (words_like(kind, part) if part is not None else None for part in (plus, tie))
    result = backend.unpack(plus, tie, n, x, out)
    return result if out is not None else result.view(x.shape)


class _Results:
    """Host memory for one kind of call's results, used again once nothing holds it.

    A fresh 100 MB result costs page faults and a cold fill on every call (a tenth to a fifth
    of a vote over 1 Gbit/s: benchmarks/README.md, "Result memory"). A loop ``y = majority_vote(x)``
    holds only the last result while it votes, so the one before is free: its memory is taken
    again, and from the third call on the loop runs as fast as with ``out=``.

    Memory is free when nothing can see it: each result is ``torch.from_numpy`` of an array kept
    here, and every tensor, view, ``.numpy()`` array or DLPack export of that result keeps its
    storage, whose deleter holds one reference to the array. So an array that only this pool
    references is unreachable from any tensor. At most :data:`KEPT` arrays are kept per kind of
    call (the one the user holds, and one more); CUDA results take torch's caching allocator,
    which already reuses device memory without faults."""

    KEPT = 2

    def __init__(self):
        self.arrays: list[np.ndarray] = []

    def _free(self, i: int) -> bool:
        return sys.getrefcount(self.arrays[i]) == 2   # the list's and the argument's: no tensor

    def take(self, like: torch.Tensor) -> torch.Tensor | None:
        """A tensor of ``like``'s shape and dtype in free memory of this pool, else in new
        memory (kept); None for a result that is not on the host."""
        if like.device.type != "cpu":
            return None
        free = [i for i in range(len(self.arrays)) if self._free(i)]
        if free:
            array = self.arrays[free[0]]
        else:
            if len(self.arrays) >= self.KEPT:
                self.arrays.pop(0)   # the oldest stays alive only as long as a tensor holds it
            array = signs.host_array(like.numel(), like.dtype)   # huge pages
            self.arrays.append(array)
        return signs.host_tensor(array, like.dtype).view(like.shape)


class _Call:
    """One kind of call's signs backend, collective and word buffer, kept across calls, and
    its results' memory (:class:`_Results`)."""

    def __init__(self, topology: str, comm, timeout, like: torch.Tensor, gpu_level,
                 quorum=None, grace: float = 0.0, ranks: int | None = None):
        self.results = _Results()
        if quorum is not None:   # a quorum vote's words are in host memory
            gpu_level = signs.staged_at_most(gpu_level)
        self.backend = signs.signs_for([like], gpu_level)   # as the optimizer chooses
        self.words = self.backend.words(packing.n_words(like.numel()))
        if quorum is None:
            self.voter = make_vote(topology, comm, timeout=timeout, n_coords=like.numel(),
                                   tally=self.backend.tally)
        else:   # checked by majority_vote: a count or fraction the communicator allows
            size = comm.Get_size()
            ranks = size if ranks is None else ranks   # of the user's communicator
            count = resolve_quorum(quorum, ranks, allow_minority=True)
            if ranks != size:   # an elastic call lost some: as many may be late as before
                count = survivors_quorum(count, ranks, size)
            self.voter = make_quorum_vote(topology, comm, count, grace, timeout=timeout,
                                          tally=self.backend.tally)


def _report(stats: dict | None, moved: dict, counted, lost) -> None:
    """A call's ``stats``: its bytes (``moved``; none where it sent nothing), the ranks counted
    (under a quorum) and the ranks lost (elastic), where not None."""
    if stats is None:
        return
    stats.update(dict(bytes_sent=0, bytes_received=0), **moved)
    if counted is not None:
        stats["counted"] = list(counted)
    if lost is not None:
        stats["lost_ranks"] = list(lost)


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


# -- what majority_vote keeps per communicator ---------------------------------------------
class _VoteState:
    """What ``majority_vote`` keeps per user communicator: its duplicate, its call count, and
    the collectives and word buffers of its recent calls (reused by calls of the same kind)."""

    #: Kinds of call (topology, size, device, dtype, timeout) whose collective is kept.
    KEPT = 8

    def __init__(self, comm: MPI.Intracomm):
        self.comm = comm        # the user's, until shared_vote_comm makes a duplicate
        self.private = False    # comm is mpisign's own
        self.step = 0   # calls so far: the step mixed into 0/NaN coordinates when none is given
        self.kept: dict = {}   # kind -> what mpisign.vote built for it, oldest first
        # The GPU path the ranks agreed on at the first call (mpisign.backends.signs.gpu_level).
        self.gpu_agreed, self.gpu_level = False, None
        # Elastic calls (see mpisign.optim.recovery.recover_vote): how many have completed here,
        # the packed results of the last ones (call -> (plus, tie, counted)), those handed on
        # by a survivor furthest on for the calls this rank has yet to make, and the ranks of
        # the user's communicator lost so far.
        self.calls = 0
        self.recent: dict = {}
        self.backlog: dict = {}
        self.lost: list[int] = []
        self.members = list(range(comm.Get_size()))
        self.original = comm.Get_group()
        self.watch = rollcall.Watch()   # when a call looks for the others' roll call

    def keep(self, kind, build):
        """What ``build()`` made the first time this ``kind`` of call was seen (then reused);
        the oldest kind is dropped past :data:`KEPT`."""
        if kind not in self.kept:
            if len(self.kept) >= self.KEPT:
                del self.kept[next(iter(self.kept))]
            self.kept[kind] = build()
        return self.kept[kind]

    def remember(self, plus, tie, counted: list) -> None:
        """A completed elastic call's result, kept for the survivors behind, should a rank die:
        the last one as it is (the next call votes into the other set of buffers), or under a
        quorum (``counted`` names its voters; empty for a full vote) copies of the last
        ``max_lag + 1`` (a late rank may be up to ``max_lag`` calls behind). Then the call is
        counted."""
        keep = QuorumVote.max_lag + 1 if counted else 1
        if keep > 1:
            plus, tie = plus.copy(), None if tie is None else tie.copy()
        self.recent[self.calls] = (plus, tie, counted)
        for call in [c for c in self.recent if c <= self.calls - keep]:
            del self.recent[call]
        self.calls += 1

    def named(self, ranks) -> list[int]:
        """Ranks of the current communicator as ranks of the user's (an elastic call may have
        lost some)."""
        return [self.members[r] for r in ranks]

    def next_step(self) -> int:
        self.step += 1
        return self.step - 1

    def free(self) -> None:
        """With the user's communicator: the duplicate, if one was made."""
        if self.private:
            release(self.comm)


def vote_state(comm: MPI.Intracomm) -> _VoteState:
    """What ``majority_vote`` keeps on ``comm`` (local: made on first sight, without its
    duplicate, which :func:`shared_vote_comm` makes)."""
    return attached(comm, _VoteState)


def shared_vote_comm(comm: MPI.Intracomm, timeout: float | None = None) -> _VoteState:
    """``majority_vote``'s own duplicate of ``comm`` and its call counter (collective the first
    time on each communicator: every rank must call)."""
    state = vote_state(comm)
    if not state.private:
        state.comm = duplicate(comm, timeout, "majority_vote")
        state.private = True
    return state


def drain_votes(comm: MPI.Intracomm = MPI.COMM_WORLD) -> None:
    """Collective, after the last ``majority_vote(..., quorum=...)`` on ``comm``: the late
    messages delivered and the requests still standing completed, so none is pending at exit
    (see :meth:`mpisign.collectives.quorum.QuorumVote.drain`). Other votes have none."""
    own = vote_state(comm)
    for call in list(own.kept.values()):
        drain = getattr(call.voter, "drain", None)
        if drain is not None:
            drain()
