"""A bounded exit for a process that has seen a rank die: ``MPI_Finalize`` cannot hold it forever.

After a dead rank, Open MPI's ``MPI_Finalize`` on a survivor has been seen never to return (about
1 run in 9 elastic kills, and a non-elastic tree vote's survivors in one loaded test run): every
survivor had finished its work, and ``mpirun`` held the allocation until Slurm's time limit.
mpi4py calls ``MPI_Finalize`` from ``Py_AtExit``, when no Python code can run any more, so it
cannot be bounded there.

:func:`arm` (called by :func:`mpisign.mpi.elastic.shrink`, the one step every survivor of a dead
rank takes) registers an ``atexit`` handler, which runs before mpi4py's: it flushes stdout and
stderr, then finalizes MPI itself on the main thread while a watchdog thread waits (through
ctypes, which lets go of the GIL for the call: mpi4py's ``MPI.Finalize`` holds it); if
``MPI_Finalize`` has not returned after ``$MPISIGN_EXIT_TIMEOUT`` seconds (default 30), the
watchdog says so on stderr and ends the process with the status it was exiting with (1 after an
uncaught exception, else 0), as ``os._exit`` does: its work is done and written, and only MPI's
shutdown is skipped.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import sys
import threading

from mpi4py import MPI

__all__ = ["arm", "exit_timeout", "finalize_within"]

_armed = threading.Event()


def exit_timeout() -> float:
    """Seconds a survivor's ``MPI_Finalize`` may take: ``$MPISIGN_EXIT_TIMEOUT``, default 30."""
    try:
        seconds = float(os.environ.get("MPISIGN_EXIT_TIMEOUT", "30"))
    except ValueError:
        seconds = 30.0
    return seconds if seconds > 0 else 30.0


def arm() -> None:
    """From now on this process's exit is bounded (see the module docstring). Idempotent."""
    if not _armed.is_set():
        _armed.set()
        atexit.register(_bounded_finalize)


def _exit_status() -> int:
    return 1 if getattr(sys, "last_value", None) is not None else 0   # set by an uncaught error


def _library_finalize():
    """The MPI library's own ``MPI_Finalize``, called through ctypes (the GIL let go), from the
    libmpi this process has loaded; mpi4py's, which holds the GIL, where none is found. mpi4py's
    own exit handler then finds MPI finalized and does nothing."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/libmpi" in line and ".so" in line}
    except OSError:
        paths = set()
    for path in sorted(paths):
        try:
            return ctypes.CDLL(path).MPI_Finalize
        except (OSError, AttributeError):
            continue
    return MPI.Finalize


def finalize_within(seconds: float, finalize=None, status=None) -> bool:
    """Call ``finalize`` (default: the library's ``MPI_Finalize``) on this thread; if it has not
    returned after ``seconds``, end the process with ``status()`` (default: the status it was
    exiting with) from a watchdog thread. True if it returned."""
    finalize = _library_finalize() if finalize is None else finalize
    status = _exit_status if status is None else status
    done = threading.Event()

    def watchdog():
        if not done.wait(seconds):
            code = status()
            os.write(2, (f"mpisign: MPI_Finalize did not return within {seconds:g} s after a "
                         f"rank died; exiting with status {code} without it (its work is done; "
                         f"set MPISIGN_EXIT_TIMEOUT to wait longer)\n").encode())
            os._exit(code)
    threading.Thread(target=watchdog, name="mpisign-exit-watchdog", daemon=True).start()
    finalize()
    done.set()
    return True


def _bounded_finalize() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    if MPI.Is_initialized() and not MPI.Is_finalized():
        finalize_within(exit_timeout())
