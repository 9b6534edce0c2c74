"""Majority vote trains through blind adversaries; the fp32 mean does not.

Usage: adversary_check.py ATTACK K
The first K ranks apply mpisign.train.adversary's ATTACK to their gradients. A logistic regression
on separable synthetic data (each rank its own shard) must reach 90% test accuracy with Signum,
parameters finite and identical on every rank; the disagreement monitor must flag inverters.
For inf/nan the same run with a plain mean of gradients (the fp32 allreduce baseline) must
break, which is what the vote protects against.
"""

import sys

import numpy as np
import torch
from common import WORLD, case, progress
from mpi4py import MPI

import mpisign
from mpisign.train.adversary import attack_gradients, make_attack

comm = WORLD
rank, size = comm.Get_rank(), comm.Get_size()
attack_name, k = sys.argv[1], int(sys.argv[2])
STEPS = 150

g = torch.Generator().manual_seed(0)
w_true = torch.randn(20, generator=g)


def data(seed, n):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, generator=gen)
    return x, (x @ w_true > 0).long()


x_test, y_test = data(10_000, 2000)


def train(use_vote: bool):
    torch.manual_seed(1)
    model = torch.nn.Linear(20, 2)
    attack = make_attack(attack_name, generator=torch.Generator().manual_seed(rank))
    monitor = mpisign.DisagreementMonitor(threshold=0.5, window=20)
    if use_vote:
        opt = mpisign.Signum(model.parameters(), lr=0.01, momentum=0.9, comm=comm,
                             monitor=monitor)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(STEPS):
        x, y = data(1000 * rank + step, 32)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        if rank < k:
            attack_gradients(model.parameters(), attack)
        if not use_vote:  # the baseline: mean of fp32 gradients over ranks
            for p in model.parameters():
                comm.Allreduce(MPI.IN_PLACE, p.grad.numpy(), op=MPI.SUM)
                p.grad /= size
        opt.step()
        progress(f"{'vote' if use_vote else 'mean'}-{step}")
    with torch.no_grad():
        acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    return model, opt, acc


with case(f"{attack_name} x{k}/{size}: Signum trains through it"):
    model, opt, acc = train(True)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert len(set(comm.allgather(opt.params_digest()))) == 1, "ranks diverged"
    assert acc >= 0.90, f"{attack_name} x{k}/{size}: vote accuracy {acc:.3f}"
    if attack_name == "invert":
        assert opt.stats.suspects == list(range(k)), opt.stats.suspects
    if attack_name in ("inf", "nan"):
        assert opt.stats.nonfinite > 0 if rank < k else opt.stats.nonfinite == 0
        by_rank = opt.stats.nonfinite_by_rank   # every rank knows every rank's count
        assert [n > 0 for n in by_rank] == [r < k for r in range(size)], by_rank
if attack_name in ("inf", "nan"):
    with case(f"{attack_name} x{k}/{size}: the fp32 mean breaks"):
        mean_model, _, mean_acc = train(False)
        broken = not all(torch.isfinite(p).all() for p in mean_model.parameters())
        assert broken, f"the fp32 mean survived {attack_name} (accuracy {mean_acc:.3f})"
if rank == 0:
    print(f"adversary_check {attack_name} {k}/{size} OK: vote accuracy {acc:.3f}, "
          f"disagreement {np.round(opt.stats.disagreement_by_rank, 3).tolist()}", flush=True)
