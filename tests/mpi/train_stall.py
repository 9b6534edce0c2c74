"""python -m mpisign.train where rank 1 stalls (alive, silent) at its first evaluation: the other
ranks must give up after the timeout with a message saying what they waited for, and the job
must abort, not hang. Run with plain ``python``, as train_abort.py.
"""

import sys
import time

from mpi4py import MPI

import mpisign.train.loop as loop
from mpisign.train.cli import run

real_evaluate = loop.evaluate


def stalled_evaluate(*args, **kwargs):
    if MPI.COMM_WORLD.Get_rank() == 1:
        print("[rank 1] stalling in evaluation", flush=True)
        time.sleep(3600)
    return real_evaluate(*args, **kwargs)


loop.evaluate = stalled_evaluate
sys.exit(run(sys.argv[1:]))
