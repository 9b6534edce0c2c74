"""The disagreement monitor under a quorum, on real ranks: Signum(quorum=M-1) with a
DisagreementMonitor, an MLP on a fixed classification problem, rank M-1 slow at every step (it
abstains at most votes).

- ``slow``: no rank is named a suspect at any step. A rank the vote did not count has no
  figure: its signs disagree with a majority it took no part in more, by construction.
- ``zeros``: the same, with half the inputs always 0 (as digits' border pixels: their
  weights' gradients are exactly 0 on every rank). A rank's own exact zeros are left out of its
  figure: with an odd count of voters, the zero bit's rule gives such a coordinate the bit of
  the parity with more voters, against the others.
- ``invert``: as ``zeros``, with rank 1 sending its gradient's opposite: it is named, and only
  it. Not on 3 ranks: there most votes count two, which never disagree.

On 3 ranks (quorum 2) the slow rank is counted only when all three are, the votes whose
figures are the highest; the monitor leaves the votes of two out and levels the rest by each
step's median, or it would name the slow rank.

Usage: quorum_monitor_check.py slow,zeros,invert
"""

import sys
import time

import torch
from common import WORLD, case, progress

import mpisign

comm = WORLD
rank, size = comm.Get_rank(), comm.Get_size()
STEPS, SLEEP, INPUTS = 120, 0.05, 64


def run(inverter: int | None, dead: int) -> tuple[set, list]:
    """The ranks the monitor named at any step, and each rank's abstentions."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(INPUTS, 128), torch.nn.ReLU(),
                                torch.nn.Linear(128, 10))
    opt = mpisign.Signum(model.parameters(), lr=0.001, momentum=0.9, comm=comm,
                         quorum=size - 1, monitor=mpisign.DisagreementMonitor())
    w = torch.randn(INPUTS, 10, generator=torch.Generator().manual_seed(1))
    data = torch.Generator().manual_seed(100 + rank)
    named = set()
    for step in range(STEPS):
        progress(step)
        if opt.late():
            opt.skip()
            continue
        x = torch.randn(32, INPUTS, generator=data)
        x[:, :dead] = 0
        loss = torch.nn.functional.cross_entropy(model(x), (x @ w).argmax(1))
        opt.zero_grad()
        loss.backward()
        if rank == inverter:
            for p in model.parameters():
                p.grad.neg_()
        if rank == size - 1:
            time.sleep(SLEEP)
        opt.step()
        named |= set(opt.stats.suspects)
    opt.drain()
    return named, list(opt.stats.abstentions)


for mode in sys.argv[1].split(","):
    with case(mode):
        suspects, abstentions = run(1 if mode == "invert" else None,
                                    0 if mode == "slow" else 32)
        if rank == 0:
            assert abstentions[-1] > STEPS // 2, f"the slow rank was not late: {abstentions}"
            expected = {1} if mode == "invert" else set()
            assert suspects == expected, f"{mode}: named {suspects}, expected {expected}"
print(f"quorum_monitor_check OK on {size} ranks: {sys.argv[1]}", flush=True)
