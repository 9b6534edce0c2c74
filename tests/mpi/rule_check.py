"""A new rule through the engine's recipe alone (mpisign.optim.rules.Rule), on real ranks,
against a one-process reference that replays every rank's gradient and votes with numpy.

The toy rule: every rank sends the sign of its raw gradient, and a parameter steps by 2 lr
times the vote. Covered for each topology, with and without overlap: two param groups, a
parameter whose .grad is None on some ranks only (the presence OR), a float64 parameter.
Usage: rule_check.py TOPOLOGY...
"""

import sys

import numpy as np
import torch
from common import WORLD, case, progress

from mpisign.optim.books import SignOptimizer
from mpisign.optim.rules import Rule, number

comm = WORLD
rank, size = comm.Get_rank(), comm.Get_size()
STEPS, LR = 6, 2.0**-7   # a power of two: 2 lr v is exact, so the reference is bit for bit


# -- the recipe, followed to the letter --------------------------------------------------------
class DoubleStepRule(Rule):
    """Send sign(g); step p -= 2 lr v. No state, no weight decay."""

    hparams = ("lr",)

    def check(self, group, where=""):
        if not (number(group["lr"]) or 0) > 0:
            raise ValueError(f"{where}lr must be > 0, got {group['lr']!r}")

    def send(self, params, grads, state, group, scale):
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)], None

    def move(self, backend, p, plus, tie, group):
        backend.apply(p, plus, tie, 2 * number(group["lr"]), 0.0)


class DoubleStep(SignOptimizer):
    def __init__(self, params, lr=1e-3, comm=None, topology="server", **options):
        super().__init__(params, dict(lr=lr), DoubleStepRule(), comm, topology, **options)
# ---------------------------------------------------------------------------------------------


def model():
    torch.manual_seed(7)
    return [torch.nn.Parameter(torch.randn(70)), torch.nn.Parameter(torch.randn(3, 5)),
            torch.nn.Parameter(torch.randn(9, dtype=torch.float64)),
            torch.nn.Parameter(torch.randn(4))]   # the last: a gradient on odd ranks only


def gradient(r, step, i, p):
    if i == 3 and r % 2 == 0:
        return None
    g = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + 10 * r + i),
                    dtype=p.dtype)
    g[g.abs() < 0.05] = 0.0   # some exact zeros: the zero rule's bit
    return g


def reference():
    """Every rank's gradients replayed here; the vote by numpy on unpacked signs."""
    params = [p.detach().clone() for p in model()]
    lrs = [LR, LR, 2 * LR, 2 * LR]
    for step in range(STEPS):
        for i, p in enumerate(params):
            grads = [gradient(r, step, i, p) for r in range(size)]
            if all(g is None for g in grads):
                continue
            total = np.zeros(p.numel(), dtype=np.int64)
            everywhere = np.ones(p.numel(), dtype=bool)
            for r, g in enumerate(grads):
                a = np.zeros(p.numel()) if g is None else g.double().numpy().reshape(-1)
                total += np.where(a > 0, 1, np.where(a < 0, -1, 1 if (r + step) % 2 else -1))
                everywhere &= a == 0
            total[everywhere] = 0   # exactly 0 on every rank: no step
            v = torch.from_numpy(np.sign(total)).to(p.dtype).view_as(p)
            p -= 2 * lrs[i] * v
    return params


want = reference()
for topology in sys.argv[1:]:
    for overlap in (False, True):
        with case(f"{topology} overlap={overlap}"):
            params = model()
            opt = DoubleStep([{"params": params[:2]}, {"params": params[2:], "lr": 2 * LR}],
                             lr=LR, comm=comm, topology=topology, overlap=overlap,
                             bucket_mb=2**-12, check_every=2)
            for step in range(STEPS):
                loss = sum((p * gradient(rank, step, i, p).to(p.dtype)).sum()
                           for i, p in enumerate(params)
                           if gradient(rank, step, i, p) is not None)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                progress(step)
            assert opt.engine.plan.fused is None   # Signum's kernel never stands in for it
            for i, (p, q) in enumerate(zip(params, want)):
                assert torch.equal(p.detach(), q), \
                    f"parameter {i}: off by {(p.detach() - q).abs().max().item()}"
            assert len(set(comm.allgather(opt.params_digest()))) == 1
comm.Barrier()
if rank == 0:
    print(f"rule_check OK on {size} ranks: {' '.join(sys.argv[1:])}", flush=True)
