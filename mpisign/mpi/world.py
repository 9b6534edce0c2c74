"""Is ``COMM_WORLD`` the world the launcher started? Refuse silent singletons.

A launcher whose process-management interface the MPI library does not speak (``srun`` without
``--mpi=pmix`` for Open MPI 5, MPICH's ``mpiexec`` for an Open MPI build of mpi4py, ...) still
starts N processes, but each one initialises MPI alone and sees a ``COMM_WORLD`` of size 1. They
then train N separate models into one output directory, and the job ends "COMPLETED".

The launcher says how many tasks it started in the environment:

==========================  ==========================================================
``OMPI_COMM_WORLD_SIZE``    Open MPI's ``mpirun`` / ``prterun``
``PMI_SIZE``                MPICH/Intel MPI's Hydra ``mpiexec``; ``srun --mpi=pmi2``
``SLURM_STEP_NUM_TASKS``    ``srun`` (any ``--mpi``), in the tasks of a job step
==========================  ==========================================================

The MPI launcher's own figure wins over Slurm's: ``mpirun`` inside an allocation starts its
daemons with ``srun``, so its ranks inherit a step of one task per node. Only the size-1 case
is refused; a world of size > 1 came out of a working launch.

A deliberate one-process run under such a launcher (a test, a debugging session) sets
``MPISIGN_ALLOW_SINGLETON=1``.
"""

from __future__ import annotations

import os

from mpi4py import MPI

__all__ = ["ALLOW_SINGLETON", "LAUNCHER_SIZE_VARS", "SingletonWorld", "launched_tasks",
           "check_world"]

#: Set to 1 to run one process on purpose where a launcher announced more.
ALLOW_SINGLETON = "MPISIGN_ALLOW_SINGLETON"

#: Where launchers write the number of tasks they started, most specific first.
LAUNCHER_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS")


class SingletonWorld(RuntimeError):
    """The launcher started several tasks, but MPI put each one in a world of its own."""


def launched_tasks(environ=None) -> tuple[int, str] | None:
    """``(N, variable)``: how many tasks the launcher says it started, and where it says so;
    None when no launcher variable is set (a plain ``python`` run) or none parses."""
    environ = os.environ if environ is None else environ
    for name in LAUNCHER_SIZE_VARS:
        try:
            return int(environ[name]), name
        except (KeyError, ValueError):
            continue
    return None


def check_world(comm=None, environ=None) -> None:
    """Raise :class:`SingletonWorld` when ``comm`` is a size-1 ``COMM_WORLD`` but the launcher
    started more than one task. Other communicators (``COMM_SELF``, a split) pass: a size-1
    sub-communicator is a user's choice. Local: no communication, the same verdict on every
    task, before anything writes output."""
    comm = MPI.COMM_WORLD if comm is None else comm
    if comm != MPI.COMM_WORLD or comm.Get_size() != 1:
        return
    environ = os.environ if environ is None else environ
    if environ.get(ALLOW_SINGLETON, "") not in ("", "0"):
        return
    launched = launched_tasks(environ)
    if launched is None or launched[0] <= 1:
        return
    n, name = launched
    raise SingletonWorld(
        f"the launcher started {n} tasks ({name}={n}), but MPI gave this one a COMM_WORLD of "
        f"size 1: the tasks cannot see each other and would each run alone. The launcher and "
        f"the MPI library do not speak the same process-management interface. Under Slurm, "
        f"launch with `srun --mpi=pmix` (Open MPI 4/5; `srun --mpi=list` shows what the site "
        f"offers); with mpirun/mpiexec, use the one of the MPI that mpi4py was built against "
        f"({_library()}); or rebuild mpi4py against the site's MPI "
        f"(`pip install --no-binary mpi4py mpi4py`). To run one process on purpose, set "
        f"{ALLOW_SINGLETON}=1.")


def _library() -> str:
    return MPI.Get_library_version().replace("\x00", "").strip().split("\n")[0]
