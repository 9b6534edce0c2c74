"""Communicators of mpisign's own, so that its messages never meet anyone else's.

MPI libraries that communicate on a user's communicator duplicate it first. mpisign does the
same: a vote in flight that was never answered (an error caught mid-step, a rank that gave up)
must not be matched by the user's next receive, nor by the vote of a new optimizer that uses
the same tags on the same communicator.

* :class:`OwnComm`: an optimizer's duplicate, made at its first vote with ``MPI_Comm_idup``
  (bounded: a rank that never joins raises ``VoteTimeout`` instead of hanging) and freed when
  the optimizer goes away. Construction stays local, so building or copying an optimizer on one
  rank never waits for the others.
* :func:`attached`: what a layer above keeps per user communicator (``majority_vote``'s
  duplicate, step counter and collectives), as an MPI attribute, so that it lives exactly as
  long as the communicator does.
"""

from __future__ import annotations

import weakref

from mpi4py import MPI

from .comm import bounded

__all__ = ["OwnComm", "attached", "duplicate", "release"]


def duplicate(comm: MPI.Intracomm, timeout: float | None, what: str) -> MPI.Intracomm:
    dup, request = comm.Idup()
    # Wait on MPI: duplicating is collective; a rank that never joins must not hang the others.
    bounded(request, f"{what}: duplicating the communicator on rank {comm.Get_rank()} "
                     f"(every rank must take part)", timeout)
    return dup


def release(comm: MPI.Comm) -> None:
    """Free one of mpisign's own communicators, unless MPI is already finalized."""
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
                weakref.finalize(owner, release, self._dup)
        return self._dup

    def made(self) -> MPI.Intracomm | None:
        """The duplicate, or None if it was never made (local)."""
        return self._dup

    def current(self) -> MPI.Intracomm:
        """The duplicate if it was made, else the user's communicator (local: never makes one)."""
        return self.user if self._dup is None else self._dup

    def adopt(self, user: MPI.Intracomm, dup: MPI.Intracomm) -> None:
        """Move to ``user`` with ``dup`` as its own, already made (after a shrink)."""
        self.user, self._dup = user, dup
        owner = self._owner()
        if owner is not None:
            weakref.finalize(owner, release, dup)


def _delete(comm, keyval, value) -> None:
    free = getattr(value, "free", None)
    if free is not None:
        free()


_KEYVALS: dict = {}   # what a layer keeps on communicators -> its MPI attribute key


def attached(comm: MPI.Intracomm, make):
    """What ``make(comm)`` made the first time it was asked for on ``comm`` (local), kept as an
    MPI attribute of ``comm`` so that it lives exactly as long as the communicator does; its
    ``free()``, if it has one, runs when ``comm`` is freed."""
    key = f"{make.__module__}.{make.__qualname__}"
    if key not in _KEYVALS:
        _KEYVALS[key] = MPI.Comm.Create_keyval(delete_fn=_delete)
    state = comm.Get_attr(_KEYVALS[key])
    if state is None:
        state = make(comm)
        comm.Set_attr(_KEYVALS[key], state)
    return state
