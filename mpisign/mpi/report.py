"""One report of an error that every rank raises alike.

mpisign raises some errors on every rank at once, by design: a rank's mistake is found by all of
them before anything moves (the step header's :class:`~mpisign.LayoutMismatch`,
:class:`~mpisign.StepMismatch`, :class:`~mpisign.HyperparameterMismatch`, a
:class:`~mpisign.ParameterDivergence`). Printed by every rank, one such error is N interleaved
tracebacks of the same text. Marked :class:`Agreed`, it is printed in full once, by rank 0, and as
one line by the others; then the job ends as before (``python -m mpi4py``, which
``mpisign.launch`` uses, aborts it with a non-zero status). An error that only some ranks raise
(a vote timeout, a bug, an exception in the user's code) keeps its full traceback on every rank
that raises it.

:func:`install` wraps ``sys.excepthook`` for the uncaught case (a user's script); the training
command reports through :func:`describe` itself. ``MPISIGN_EXCEPTHOOK=0`` leaves the hook alone.
"""

from __future__ import annotations

import os
import sys
import time
import traceback

__all__ = ["Agreed", "agreed", "describe", "install", "LEAD_TIME"]

#: Seconds a rank other than 0 waits, after its one line, before its exit aborts the job: an
#: abort from any rank kills the others, and rank 0's full report must be out by then.
LEAD_TIME = 2.0


class Agreed:
    """Mixin of an exception that every rank raises alike (see the module docstring)."""


def agreed(error: BaseException) -> bool:
    """Whether ``error`` (or an exception it was raised from) is :class:`Agreed`."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, Agreed):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def _world() -> tuple[int, int]:
    from mpi4py import MPI

    if not MPI.Is_initialized() or MPI.Is_finalized():
        return 0, 1
    return MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()


def describe(error: BaseException, rank: int, size: int, heading: str = "") -> str:
    """What ``rank`` prints for ``error``: the full traceback (after ``heading``), or, for an
    :class:`Agreed` error on a rank other than 0, one line naming it."""
    if size > 1 and rank != 0 and agreed(error):
        first = (str(error).splitlines() or [""])[0]
        first = first if len(first) <= 100 else first[:100].rstrip() + "..."
        return (f"[rank {rank}] {type(error).__name__}: {first} (raised alike on all {size} "
                f"ranks; rank 0 prints it in full)\n")
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    return f"{heading}{text}"


def install() -> None:
    """Wrap ``sys.excepthook`` (once): an uncaught :class:`Agreed` error is printed in full by
    rank 0 only; every other uncaught exception as before."""
    if os.environ.get("MPISIGN_EXCEPTHOOK", "1") == "0" or getattr(sys.excepthook, "_mpisign",
                                                                       False):
        return
    previous = sys.excepthook

    def hook(kind, error, tb):
        rank, size = _world() if agreed(error) else (0, 1)
        if size == 1 or (rank == 0 and previous is not sys.__excepthook__):
            previous(kind, error, tb)   # not agreed, or a hook of the user's own on rank 0
            return
        if rank != 0:
            time.sleep(LEAD_TIME / 4)   # after rank 0's report, not in the middle of it
        # One write, so that the launcher's forwarding keeps the report in one piece.
        sys.stderr.write(describe(error, rank, size, f"[rank {rank}] " if rank == 0 else ""))
        sys.stderr.flush()
        # Before this rank's exit aborts the job: rank 0's report, and the others' lines.
        time.sleep(LEAD_TIME if rank != 0 else LEAD_TIME / 2)

    hook._mpisign = True
    sys.excepthook = hook
