"""Signum over torchrun's process group, no MPI launcher: each rank's parameters after the steps
against a plain-torch Signum that recomputes every rank's gradients and votes them itself
(common.reference_vote: numpy's majority, with the zero rule).

Usage: torchrun --nproc-per-node M tests/mpi/torchrun_optim.py
"""

import numpy as np
import torch
import torch.distributed as dist
from common import reference_vote

import mpisign

STEPS, LR, BETA = 8, 0.01, 0.9
dist.init_process_group("gloo")
rank, size = dist.get_rank(), dist.get_world_size()


def data(step: int, r: int):
    g = torch.Generator().manual_seed(100 * step + r)
    x = torch.randn(8, 20, generator=g)
    x[:, 4] = 0.0   # exactly 0 on every rank: no vote, on an odd number of ranks no move
    return x, torch.randn(8, 3, generator=g)


def net():
    torch.manual_seed(0)
    return torch.nn.Linear(20, 3)


def grads(model, step: int, r: int) -> list:
    model.zero_grad()
    x, y = data(step, r)
    torch.nn.functional.mse_loss(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters()]


model = net()
opt = mpisign.Signum(model.parameters(), lr=LR, momentum=BETA, comm=dist.group.WORLD)
for step in range(STEPS):
    opt.zero_grad()
    x, y = data(step, rank)
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()
opt.check_consistency()

# The reference: every rank's momentum, their signs voted in numpy, p -= lr * vote.
ref = net()
momenta = [[torch.zeros_like(p) for p in ref.parameters()] for _ in range(size)]
for step in range(STEPS):
    every = [grads(ref, step, r) for r in range(size)]
    with torch.no_grad():
        for i, p in enumerate(ref.parameters()):
            for r in range(size):
                momenta[r][i].mul_(BETA).add_(every[r][i], alpha=1 - BETA)
            vote = reference_vote([momenta[r][i] for r in range(size)], step)
            if size % 2:   # the exact-zero rule: 0 on every rank does not move
                vote[np.all([momenta[r][i].reshape(-1).numpy() == 0 for r in range(size)],
                            axis=0)] = 0
            p.sub_(LR * torch.from_numpy(vote).to(p.dtype).view_as(p))
for i, (a, b) in enumerate(zip(model.parameters(), ref.parameters())):
    assert torch.allclose(a, b, rtol=0, atol=1e-6), (i, (a - b).abs().max().item())
print(f"torchrun_optim OK on rank {rank} of {size}", flush=True)
dist.destroy_process_group()
