"""An elastic optimizer's recovery: the survivors of a dead rank finish the step together.

A majority vote needs no particular voter: a dead rank only changes M. What it breaks is the
communicator, and the survivors' agreement on where they are. When a rank dies in the middle
of step s, each survivor is in one of three places:

* it has not had step s's result (its vote waited on the dead rank, or on one that did);
* it has had the result of some of step s's buckets (with ``overlap``, each bucket is a vote);
* it has finished step s and has begun step s+1: the dead rank's last vote reached a server,
  or an owner of a shard, that answered this survivor before the others. No survivor can be
  further ahead: step s+1's votes need every survivor's signs.

The recovery (:meth:`Recovery.recover`, on every survivor, after ULFM's revoke and shrink in
:mod:`mpisign.mpi.elastic`):

1. the survivors exchange their step and which buckets of it they have applied;
2. for each bucket of the earliest step that some survivor has applied and another has not, the
   lowest such survivor broadcasts the bucket's parameters, and the others take them. The
   result is not voted again: a survivor already stepped with it, and every survivor must hold
   what that one holds. A survivor's momentum is its own: it was updated when it packed;
3. every survivor's parameters are compared (a digest each): identical, or every survivor
   raises :class:`mpisign.ParameterDivergence`;
4. the optimizer moves to the survivors' communicator (``opt.comm``, a duplicate of it for its
   own votes, a collective of the same topology), and the step goes on: the buckets that no
   survivor has applied are voted again among the survivors, from the signs each one packed
   before the failure (its momentum is not updated twice).

A rank that dies during the recovery is survived the same way: the survivors shrink again.
Nothing of this runs while no rank fails: the step's calls run inside one ``try``.

**Under a quorum** (``quorum=``, :mod:`mpisign.optim.quorate`) no vote waits for every rank,
so a late survivor may be several steps behind (up to ``lag``), and a survivor ahead may have
applied votes of a step that a late one has not begun: the places above do not hold. Step 2
is then: every survivor takes the parameters, the step count and the applied buckets of the
survivor furthest on (the lowest of those level with it), whose results every survivor would
have applied in turn; the buckets it has not applied are voted again among all of them (if it
met the failure between steps, in ``check_consistency``, it has finished its step: one brought
forward ends the step it was in at that count, voting nothing). A survivor brought forward
keeps its own momentum and the signs it last packed (as a late rank's ``skip()`` leaves its
momentum alone), and they count in those votes. The votes then close on
:func:`mpisign.collectives.quorum.survivors_quorum` of the survivors: as many may be late as
before. A rank that is only slow is not dead to ULFM (Open MPI learns of a death from its
runtime; its heartbeat detector, which could suspect a rank that is silent for 10 s, is off by
default), so it is never shrunk away.

**The communicator the optimizer was given is revoked too** (``opt.comm`` before the
recovery; the optimizer votes on a duplicate of it). Under a quorum a survivor ahead of a late
one may be waiting, outside the optimizer, in a collective of its own on it (a training loop's
record, which a rank that died had already sent its part of): the revoke ends that wait at
once, where it would otherwise last until its timeout while the others wait for it in the
shrink. Once a rank is dead a collective of every rank cannot complete anyway; the survivors
go on over ``opt.comm``.
"""

from __future__ import annotations

import logging
import weakref

import numpy as np
import torch
from mpi4py import MPI

from ..mpi import exchanges
from ..mpi.comm import bounded
from ..mpi.elastic import is_failure, ranks_in, require_ulfm, revoke, shrink
from .header import ParameterDivergence
from ..mpi.isolation import duplicate
from ..mpi.report import Agreed

__all__ = ["Recovery", "TooFewRanks", "RanksLost", "Unrecovered", "recover_vote",
           "retry_on_failure", "words_like"]

log = logging.getLogger(__name__)


class TooFewRanks(Agreed, RuntimeError):
    """Fewer ranks survive than an elastic optimizer's ``min_ranks``."""


class RanksLost(Agreed, RuntimeError):
    """Ranks died under an optimizer that is not elastic (a launch with fault tolerance on):
    every survivor raises it, naming them."""


class Unrecovered:
    """What a failure does to an optimizer without ``elastic``: it ends the step. Under a launch
    with fault tolerance (ULFM), where MPI reports a dead rank instead of ending the job, the
    survivors revoke the optimizer's communicator (so that every one of them finds out), shrink
    it to learn who is left, and each raises :class:`RanksLost` naming the same dead ranks;
    without ULFM the launcher ends the job, or every survivor's bounded wait does."""

    def __init__(self, engine=None):
        self._engine = weakref.ref(engine) if engine is not None else lambda: None

    def run(self, fn, *args, redo: bool = True):
        try:
            return fn(*args)
        except MPI.Exception as error:
            self._name_the_dead(error)
            raise

    def attempt(self, fn, *args) -> None:
        self.run(fn, *args)

    def _name_the_dead(self, error: MPI.Exception) -> None:
        engine = self._engine()
        if engine is None or not hasattr(MPI.Comm, "Shrink"):
            return
        comm = engine.own_comm.get()
        if not is_failure(error, comm):
            return
        step = engine.books.param_groups[0]["step"]
        what = f"the step {step} on rank {engine.rank}, after a dead rank"
        group = comm.Get_group()
        try:
            survivors = shrink(comm, engine.timeout, what)
            alive = ranks_in(survivors, group)
            survivors.Free()
        finally:
            group.Free()
        dead = sorted(set(range(comm.Get_size())) - set(alive))
        raise RanksLost(
            f"rank(s) {dead} of the optimizer's {comm.Get_size()} died at step {step}, and "
            f"{type(engine.books).__name__} is not elastic: every survivor stops here. To "
            f"carry on without them, pass elastic=True (under `mpirun --with-ft ulfm` or "
            f"`python -m mpisign.launch --elastic`), and resume from the last checkpoint "
            f"now.") from error


class Recovery:
    """An elastic optimizer's guard: runs the step's communication, and on a dead rank
    recovers (see the module's docstring) and runs it again among the survivors."""

    def __init__(self, engine):
        require_ulfm()
        self._engine = weakref.ref(engine)
        self.original = engine.comm.Get_group()       # ranks are named by their place in it
        self.members = list(range(engine.comm.Get_size()))   # the current ranks, so named
        self.failure: MPI.Exception | None = None  # met in a gradient hook, raised at step()

    def run(self, fn, *args, redo: bool = True):
        """``fn(*args)``; after a failure, recover and (with ``redo``) call it again."""
        def attempt():
            if self.failure is not None:   # met in a gradient hook
                failure, self.failure = self.failure, None
                raise failure
            return fn(*args)

        def recovered():
            self.recover(voting=redo)
            return None if redo else (None,)
        return retry_on_failure(attempt, lambda: self._engine().own_comm.current(), recovered)

    def attempt(self, fn, *args) -> None:
        """``fn(*args)`` from a gradient hook: a failure there is remembered and revoked (so the
        others learn of it), and recovered from at ``step()``, outside autograd's thread."""
        try:
            fn(*args)
        except MPI.Exception as error:
            comm = self._engine().own_comm.current()
            if not is_failure(error, comm):
                raise
            self.failure = error
            revoke(comm)

    def recover(self, voting: bool = True) -> None:
        """Shrink to the survivors, bring every survivor to the same parameters, and move the
        optimizer onto the survivors' communicator (collective over the survivors).
        ``voting``: the failure was met in a step's vote (else between steps: in a check)."""
        engine = self._engine()
        step = engine.books.param_groups[0]["step"]
        what = f"recovering at step {step} on rank {engine.rank}"
        revoke(engine.comm)   # see the module docstring: a survivor may wait on it elsewhere

        def agree(new):
            members = ranks_in(new, self.original)
            if len(members) < engine.min_ranks:
                raise TooFewRanks(
                    f"at step {step}, {len(members)} rank(s) survive ({members}, ranks of "
                    f"the communicator the optimizer was given), fewer than min_ranks="
                    f"{engine.min_ranks}")
            handed, interrupted = self._catch_up(engine, new, what, voting)
            engine.move_to(duplicate(new, engine.timeout, what), new)
            return members, handed, interrupted
        members, handed, step = _among_survivors(engine.own_comm.current(), engine.timeout, what,
                                                 agree)
        lost = sorted(set(self.members) - set(members))
        self.members = members
        engine.stats.lost_ranks = sorted(set(engine.stats.lost_ranks) | set(lost))
        if engine.rank == 0:
            log.warning("rank(s) %s lost in step %d: carrying on with %d rank(s), topology %s%s",
                        lost, step, engine.world_size, engine.topology_used, handed)

    def _catch_up(self, engine, comm: MPI.Intracomm, what: str,
                  voting: bool) -> tuple[str, int]:
        """Steps 1-3 of the module's docstring, on the survivors' ``comm``; returns what was
        handed on (words for the log, or ""), and the step the failure interrupted (the
        earliest, or under a quorum the furthest survivor's)."""
        buckets = engine.plan.layout.buckets if engine.plan is not None else []
        n = comm.Get_size()
        mine = np.array([engine.books.param_groups[0]["step"], voting]
                        + [b.applied for b in buckets], dtype=np.int64)
        every = np.empty((n, mine.size), dtype=np.int64)
        bounded(comm.Iallgather(mine, every), f"{what}: where each survivor is", engine.timeout)
        steps = every[:, 0]
        if not engine.ranks.in_step:   # a quorum's late survivors may be steps behind
            handed = _to_the_furthest(engine, comm, buckets, every, what)
        elif steps.max() - steps.min() > 1:
            raise RuntimeError(f"{what}: survivors are more than one step apart "
                               f"({steps.tolist()}), which a vote cannot allow")
        else:
            handed = _hand_on_buckets(engine, comm, buckets, every, what)
        differ = exchanges.ranks_differing(comm, engine.params_digest(), engine.timeout,
                                           f"{what}: comparing the survivors' parameters")
        if differ:
            raise ParameterDivergence(
                f"{what}: survivor(s) {differ} hold parameters that differ from survivor 0's "
                f"after the recovery")
        # The step the failure interrupted: the earliest any survivor was in, or under a
        # quorum, the furthest survivor's (where the others were brought).
        return handed, int(steps.min() if engine.ranks.in_step else steps.max())


def _hand_on_buckets(engine, comm, buckets: list, every: np.ndarray, what: str) -> str:
    """Survivors at most one step apart: each bucket of the earliest step that some survivor
    has applied and another has not comes from the lowest survivor that has (step 2 of the
    module's docstring). Returns what was handed on, for the log."""
    steps, me = every[:, 0], comm.Get_rank()
    holds = (steps > steps.min())[:, None] | every[:, 2:].astype(bool)
    handed = 0
    for b, bucket in enumerate(buckets):
        holders = np.flatnonzero(holds[:, b])
        if 0 < holders.size < comm.Get_size():
            handed += 1
            params = [slot.param for slot in bucket.slots]
            _broadcast(comm, params, int(holders[0]), engine.timeout,
                       f"{what}: bucket {b}'s parameters from a survivor that applied it")
            if not holds[me, b]:
                bucket.pending, bucket.applied = None, True
    return (f"; {handed} bucket(s) of the step handed on by a survivor that had applied them"
            if handed else "")


def _to_the_furthest(engine, comm, buckets: list, every: np.ndarray, what: str) -> str:
    """Survivors of a quorum's votes, which may be steps apart: every survivor takes the
    parameters, the step and the applied buckets of the one furthest on (the lowest of those
    level with it), whose votes every survivor would have applied in turn; the buckets it has
    not applied are voted again among all of them. A survivor that was behind keeps its own
    momentum and the signs it last packed (a late rank's skip() leaves its momentum alone in
    the same way), and they count in the votes done again. Returns what was handed on, for
    the log."""
    done = every[:, 0] * (len(buckets) + 1) + every[:, 2:].sum(axis=1)   # buckets are applied
    furthest = int(np.argmax(done))                                       # in their order
    if (done == done[furthest]).all():
        return ""
    params = [p for group in engine.books.param_groups for p in group["params"]]
    _broadcast(comm, params, furthest, engine.timeout,
               f"{what}: the parameters of survivor {furthest}, the furthest on")
    me = comm.Get_rank()
    if done[me] < done[furthest]:
        step, voting = int(every[furthest, 0]), bool(every[furthest, 1])
        if not every[me, 1]:
            raise RuntimeError(f"{what}: a survivor met the failure between steps, behind "
                               f"survivor {furthest}, which a vote cannot allow")
        # A furthest survivor between steps (in a check) has finished its step: this one's
        # step is handed on whole, and ends at the same count (the step's end adds one).
        for group in engine.books.param_groups:
            group["step"] = step if voting else step - 1
        for b, bucket in enumerate(buckets):
            bucket.pending = None
            bucket.applied = bool(every[furthest, 2 + b]) if voting else True
    behind = [r for r in range(comm.Get_size()) if done[r] < done[furthest]]
    return (f"; survivor(s) {behind} (at step(s) {every[behind, 0].tolist()}) took the "
            f"parameters of survivor {furthest}, at step {int(every[furthest, 0])}")


def _broadcast(comm, params: list, root: int, timeout: float, what: str) -> None:
    """Every rank's ``params`` take ``root``'s values, bit for bit (through host memory)."""
    chunks = [p.detach().contiguous().reshape(-1).view(torch.uint8).cpu() for p in params]
    flat = torch.cat(chunks).numpy() if chunks else np.empty(0, dtype=np.uint8)
    bounded(comm.Ibcast(flat, root=root), what, timeout)
    if comm.Get_rank() == root:
        return
    offset = 0
    with torch.no_grad():
        for p, chunk in zip(params, chunks):
            size = chunk.numel()
            values = torch.from_numpy(flat[offset: offset + size]).view(p.dtype)
            p.copy_(values.view(p.shape).to(p.device))
            offset += size


def recover_vote(own, timeout: float) -> bool:
    """``majority_vote(elastic=True)``'s recovery, on every survivor of ``own`` (the state
    :func:`mpisign.vote.shared_vote_comm` keeps): shrink its communicator, then agree on
    the interrupted call. A survivor that already returned that call's result (it is in a
    later call now) hands it on, and the others take it: it goes in ``own.backlog``, and this
    returns True. Otherwise no survivor had it, and this returns False: the call is voted
    again among the survivors. ``own`` then votes over the survivors, and names the dead in
    ``own.lost``.

    Under a quorum a late survivor may be several calls behind (up to the quorum vote's
    ``max_lag``): the survivor furthest on (the lowest of those level with it) hands on the
    result of every call between the earliest survivor's and its own, and a survivor behind
    keeps those of its interrupted call and its next ones in ``own.backlog``: those calls
    return them without voting. Without a quorum no survivor can be more than one call
    ahead: the next call's vote needs every survivor's signs."""
    what = f"majority_vote recovering at call {own.calls} on rank {own.comm.Get_rank()}"

    def agree(new):
        calls = np.empty(new.Get_size(), dtype=np.int64)
        mine = np.array([own.calls], dtype=np.int64)   # a name: alive until MPI is done
        bounded(new.Iallgather(mine, calls), f"{what}: where each survivor is", timeout)
        first, last = int(calls.min()), int(calls.max())
        handed = {}
        if last > first:   # the furthest must hold them all (else every survivor raises)
            handed = _hand_on(new, int(np.argmax(calls)), own, range(first, last), timeout,
                              f"{what}: the results of calls {first} to {last - 1} "
                              f"(the survivors' calls: {calls.tolist()})")
        return new, ranks_in(new, own.original), calls, handed
    new, members, calls, handed = _among_survivors(own.comm, timeout, what, agree)
    for call in own.kept.values():   # their requests on the revoked communicator
        call.voter.abandon()
    lost = sorted(set(own.members) - set(members))
    own.comm, own.private, own.members, own.kept = new, True, members, {}
    own.lost = sorted(set(own.lost) | set(lost))
    if new.Get_rank() == 0:
        log.warning("majority_vote: rank(s) %s lost in call %d: carrying on with %d rank(s)%s",
                    lost, int(calls.min()), new.Get_size(),
                    f"; the results of calls {int(calls.min())} to {int(calls.max()) - 1} "
                    f"handed on by a survivor that had them" if handed else "")
    own.backlog.update({c: r for c, r in handed.items() if c >= own.calls})
    return own.calls in own.backlog


def retry_on_failure(attempt, comm, recover):
    """The one retry loop of a dead rank, for the optimizer and ``majority_vote``: the result
    of ``attempt()``; when it meets a dead rank of ``comm()`` (ULFM's failure, see
    :func:`mpisign.mpi.elastic.is_failure`), ``recover()``, which returns None to attempt
    again among the survivors, or ``(result,)`` to end with that result."""
    while True:
        try:
            return attempt()
        except MPI.Exception as error:
            if not is_failure(error, comm()):
                raise
            settled = recover()
            if settled is not None:
                return settled[0]


def _among_survivors(comm, timeout: float, what: str, agree):
    """Shrink ``comm`` to its survivors and return ``agree(new)``, collective over them. A
    rank that dies meanwhile is survived the same way: the survivors shrink again."""
    while True:
        new = shrink(comm, timeout, what)
        new.Set_errhandler(MPI.ERRORS_RETURN)
        try:
            return agree(new)
        except MPI.Exception as error:
            if not is_failure(error, new):
                raise
            comm = new


def _hand_on(comm, root: int, own, calls: range, timeout: float, what: str) -> dict:
    """Broadcast ``root``'s results of ``calls`` (``own.recent``) to every survivor, as
    ``{call: (plus, tie, counted)}`` in host memory (numpy uint64; ``tie`` None where no tie
    was possible; ``counted``: ranks of the user's communicator, empty for a full vote). First
    each call's sizes (a root that no longer holds one says so, and every survivor raises),
    then every call's words, plus and tie, in turn, and after them the ranks each counted."""
    sizes = np.zeros((len(calls), 3), dtype=np.int64)   # plus's words, tie's, ranks counted
    held = comm.Get_rank() == root and all(c in own.recent for c in calls)
    if held:
        for row, call in zip(sizes, calls):
            plus, tie, counted = own.recent[call]
            row[:] = plus.shape[0], 0 if tie is None else tie.shape[0], len(counted)
    elif comm.Get_rank() == root:
        sizes[:] = -1
    bounded(comm.Ibcast(sizes, root=root), f"{what}: their sizes", timeout)
    if (sizes < 0).any():
        raise RuntimeError(f"{what}: survivor {root}, the furthest on, no longer holds them all "
                           f"(it keeps the last one, or under a quorum the last "
                           f"max_lag + 1): a vote cannot leave a survivor that far behind")
    payload = np.empty(int(sizes.sum()), dtype=np.uint64)
    if held:
        parts = [_host(part) for call in calls for part in own.recent[call][:2]
                 if part is not None]
        parts += [np.asarray(own.recent[call][2], dtype=np.uint64) for call in calls]
        payload[:] = np.concatenate(parts)   # calls is not empty: a plus part each
    bounded(comm.Ibcast(payload, root=root), what, timeout)
    handed, at, ranks_at = {}, 0, int(sizes[:, :2].sum())
    for (w, t, k), call in zip(sizes.tolist(), calls):
        plus, tie = payload[at: at + w].copy(), payload[at + w: at + w + t].copy() if t else None
        handed[call] = (plus, tie, payload[ranks_at: ranks_at + k].astype(int).tolist())
        at, ranks_at = at + w + t, ranks_at + k
    return handed


def _host(words) -> np.ndarray:
    """Packed words as numpy uint64 in host memory."""
    if isinstance(words, torch.Tensor):
        return words.cpu().numpy().view(np.uint64)
    return words


def words_like(words, host: np.ndarray):
    """``host`` (numpy uint64) as words of ``words``' kind."""
    if isinstance(words, torch.Tensor):
        return torch.from_numpy(host.view(np.int64).copy()).to(words.device)
    return host.copy()
