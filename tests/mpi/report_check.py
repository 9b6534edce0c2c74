"""How an uncaught error is reported (mpisign.mpi.report): run with a mode.

- ``divergence``: a user's script that forgot broadcast_parameters; every rank raises
  ParameterDivergence at the first step.
- ``own``: only rank 1 raises (a ValueError of the user's own).
- ``train``: python -m mpisign.train's own report, an agreed error on every rank at the end.
"""

import sys

import torch
from mpi4py import MPI

import mpisign

mode = sys.argv[1]
rank = MPI.COMM_WORLD.Get_rank()
if mode == "divergence":
    torch.manual_seed(rank)   # the mistake: each rank its own initial weights
    model = torch.nn.Linear(10, 2)
    opt = mpisign.Signum(model.parameters(), lr=1e-3)
    model(torch.randn(4, 10)).sum().backward()
    opt.step()
elif mode == "own":
    MPI.COMM_WORLD.Barrier()
    if rank == 1:
        raise ValueError("a mistake of rank 1 alone")
    MPI.COMM_WORLD.Barrier()   # the others wait here until the abort ends them
elif mode == "train":
    import mpisign.train.loop as loop
    from mpisign.train.cli import run

    def finish(r):
        raise mpisign.StepMismatch("injected on every rank alike")
    loop.finish = finish
    sys.exit(run(sys.argv[2:]))
