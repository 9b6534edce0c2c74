"""Communicators of mpisign's own, so that its messages never meet anyone else's.

MPI libraries that communicate on a user's communicator duplicate it first. mpisign does the
same: a vote in flight that was never answered (an error caught mid-step, a rank that gave up)
must not be matched by the user's next receive, nor by the vote of a new optimizer that uses
the same tags on the same communicator.

* :class:`OwnComm`: an optimizer's duplicate, made at its first vote with ``MPI_Comm_idup``
  (bounded: a rank that never joins raises ``VoteTimeout`` instead of hanging) and freed when
  the optimizer goes away. Construction stays local, so building or copying an optimizer on one
  rank never waits for the others.
* :func:`shared_vote_comm`: ``majority_vote``'s duplicate and step counter, cached on the
  user's communicator as an MPI attribute, so that both live exactly as long as it does.
"""

from __future__ import annotations

import weakref

from mpi4py import MPI

from .comm import bounded

__all__ = ["OwnComm", "duplicate", "shared_vote_comm", "vote_state"]


def duplicate(comm: MPI.Intracomm, timeout: float | None, what: str) -> MPI.Intracomm:
    dup, request = comm.Idup()
    # Wait on MPI: duplicating is collective; a rank that never joins must not hang the others.
    bounded(request, f"{what}: duplicating the communicator on rank {comm.Get_rank()} "
                     f"(every rank must take part)", timeout)
    return dup


def _free(comm: MPI.Comm) -> None:
    if not MPI.Is_finalized() and comm != MPI.COMM_NULL:
        comm.Free()


class OwnComm:
    """A private duplicate of ``comm``, made on first :meth:`get`, freed with its owner."""

    def __init__(self, comm: MPI.Intracomm, owner, timeout: float | None = None,
                 what: str = "Signum"):
        self.user = comm
        self.timeout, self.what = timeout, what
        self._dup: MPI.Intracomm | None = None
        self._owner = weakref.ref(owner)

    def get(self) -> MPI.Intracomm:
        if self._dup is None:
            self._dup = duplicate(self.user, self.timeout, self.what)
            owner = self._owner()
            if owner is not None:
                weakref.finalize(owner, _free, self._dup)
        return self._dup

    def current(self) -> MPI.Intracomm:
        """The duplicate if it was made, else the user's communicator (local: never makes one)."""
        return self.user if self._dup is None else self._dup

    def adopt(self, user: MPI.Intracomm, dup: MPI.Intracomm) -> None:
        """Move to ``user`` with ``dup`` as its own, already made (after a shrink)."""
        self.user, self._dup = user, dup
        owner = self._owner()
        if owner is not None:
            weakref.finalize(owner, _free, dup)


class _VoteComm:
    """What ``majority_vote`` keeps per user communicator: its duplicate, its call count, and
    the collectives and word buffers of its recent calls (reused by calls of the same kind)."""

    #: Kinds of call (topology, size, device, dtype, timeout) whose collective is kept.
    KEPT = 8

    def __init__(self, comm: MPI.Intracomm):
        self.comm = comm        # the user's, until shared_vote_comm makes a duplicate
        self.private = False    # comm is mpisign's own
        self.step = 0   # calls so far: the step mixed into 0/NaN coordinates when none is given
        self.kept: dict = {}   # kind -> what mpisign.vote built for it, oldest first
        # The GPU path the ranks agreed on at the first call (mpisign.signs.gpu_level).
        self.gpu_agreed, self.gpu_level = False, None
        # Elastic calls (see mpisign.recovery.recover_vote): how many have completed here, the
        # last one's packed result, and the ranks of the user's communicator lost so far.
        self.calls = 0
        self.last = None
        self.lost: list[int] = []
        self.members = list(range(comm.Get_size()))
        self.original = comm.Get_group()

    def keep(self, kind, build):
        """What ``build()`` made the first time this ``kind`` of call was seen (then reused);
        the oldest kind is dropped past :data:`KEPT`."""
        if kind not in self.kept:
            if len(self.kept) >= self.KEPT:
                del self.kept[next(iter(self.kept))]
            self.kept[kind] = build()
        return self.kept[kind]

    def next_step(self) -> int:
        self.step += 1
        return self.step - 1


def _delete(comm, keyval, value) -> None:
    if value.private:
        _free(value.comm)


_KEYVAL: int | None = None


def vote_state(comm: MPI.Intracomm) -> _VoteComm:
    """What ``majority_vote`` keeps on ``comm`` (local: made on first sight, without its
    duplicate, which :func:`shared_vote_comm` makes)."""
    global _KEYVAL
    if _KEYVAL is None:
        _KEYVAL = MPI.Comm.Create_keyval(delete_fn=_delete)
    state = comm.Get_attr(_KEYVAL)
    if state is None:
        state = _VoteComm(comm)
        comm.Set_attr(_KEYVAL, state)
    return state


def shared_vote_comm(comm: MPI.Intracomm, timeout: float | None = None) -> _VoteComm:
    """``majority_vote``'s own duplicate of ``comm`` and its call counter (collective the first
    time on each communicator: every rank must call)."""
    state = vote_state(comm)
    if not state.private:
        state.comm = duplicate(comm, timeout, "majority_vote")
        state.private = True
    return state
