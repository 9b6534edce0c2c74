"""Stalls on purpose, for the no-hang tests.

Usage: stall_check.py MODE TOPOLOGY
  skip: the last rank stops calling the vote after step 2 (as a dead or stuck rank would);
        the others must end with VoteTimeout naming who did not arrive.
  hang: every rank blocks forever after step 1; the launcher must kill the job and say where.
"""

import sys
import time

import torch
from common import WORLD, case, progress

import mpisign

mode, topology = sys.argv[1], sys.argv[2]
rank, size = WORLD.Get_rank(), WORLD.Get_size()
with case(f"{mode} {topology}"):
    for step in range(5):
        if mode == "skip" and rank == size - 1 and step == 2:
            time.sleep(120)
        if mode == "hang" and step == 2:
            time.sleep(3600)
        mpisign.majority_vote(torch.randn(1000), WORLD, topology, step=step)
        progress(step)
