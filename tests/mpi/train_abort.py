"""python -m mpisign.train where rank 1 fails mid-run: the whole job must abort, not hang.

Rank 1 raises in its first evaluation while the other ranks wait for it in the evaluation's
allreduce; mpisign.train.cli.run must turn that into MPI_Abort. Run with plain ``python`` (not
``-m mpi4py``) so that the abort comes from mpisign.train itself.
"""

import sys

from mpi4py import MPI

import mpisign.train.loop as loop
from mpisign.train.cli import run

real_evaluate = loop.evaluate


def broken_evaluate(*args, **kwargs):
    if MPI.COMM_WORLD.Get_rank() == 1:
        raise RuntimeError("injected failure on rank 1")
    return real_evaluate(*args, **kwargs)


loop.evaluate = broken_evaluate
sys.exit(run(sys.argv[1:]))
