"""A stalled rank is named on every rank (#31): rank STALLED stops itself (SIGSTOP) before step 3
of a Signum job, and a child process wakes it (SIGCONT) WAKE seconds later, after the others'
timeout and roll call. Every rank prints the error it ended with, and the test reads them:
the others must all name rank STALLED as missing, and the stalled rank must raise on waking,
naming itself, without applying step 3.

Usage: rollcall_check.py TOPOLOGY STALLED WAKE [vote]
  vote: the same with majority_vote calls in place of Signum's steps.
"""

import os
import signal
import subprocess
import sys

import torch
from common import WORLD, case, progress

import mpisign

topology, stalled, wake = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
use_vote = sys.argv[4:] == ["vote"]
rank, size = WORLD.Get_rank(), WORLD.Get_size()
timeout = float(os.environ["MPISIGN_TIMEOUT"])
with case(f"stall of rank {stalled}, {topology}{', majority_vote' if use_vote else ''}"):
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 8)
    opt = mpisign.Signum(model.parameters(), lr=0.01, momentum=0.9, comm=WORLD,
                         topology=topology, timeout=timeout)
    data = torch.Generator().manual_seed(rank)
    applied = 0
    try:
        for step in range(6):
            if rank == stalled and step == 3:
                subprocess.Popen(["sh", "-c", f"sleep {wake}; kill -CONT {os.getpid()}"])
                os.kill(os.getpid(), signal.SIGSTOP)
            if use_vote:
                mpisign.majority_vote(torch.randn(1000, generator=data), WORLD, topology,
                                      timeout=timeout)
            else:
                opt.zero_grad()
                model(torch.randn(16, 64, generator=data)).square().mean().backward()
                opt.step()
            applied += 1
            progress(step)
        print(f"@rollcall rank={rank} finished", flush=True)
    except mpisign.VoteTimeout as e:
        # one line, for the test to read
        print(f"@rollcall rank={rank} steps={applied} VoteTimeout: {' '.join(str(e).split())}",
              flush=True)
