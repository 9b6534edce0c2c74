"""Signum over real ranks vs a single-process simulation of all workers.

Every rank trains the same small model on its own data; the reference, computed in every
process, replays all ranks' gradients on its own copy, keeps each worker's momentum, and
takes the vote with numpy on unpacked signs. Covers the given topologies (one after another,
in one launch), two param groups, a float64 parameter, a parameter whose .grad is None on some
ranks only, and a NaN on one rank.
Usage: optim_check.py TOPOLOGY[,TOPOLOGY...]
"""

import re
import sys

import numpy as np
import torch
from common import WORLD, case, expect_everywhere, progress

import mpisign

comm = WORLD
rank, size = comm.Get_rank(), comm.Get_size()
TOPOLOGIES = sys.argv[1].split(",")
STEPS, LR, BETA, WD = 12, 0.01, 0.9, 0.01


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1234)  # identical start on every rank
        self.body = torch.nn.Linear(11, 6)
        self.head = torch.nn.Linear(6, 3)
        self.scale = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
        self.odd_only = torch.nn.Parameter(torch.zeros(5))  # used by odd ranks only

    def forward(self, x, r):
        y = self.head(torch.tanh(self.body(x))) * self.scale.float()
        if r % 2:
            y = y + self.odd_only.sum()
        return y


def batch(r, step):
    g = torch.Generator().manual_seed(1000 * step + r)
    return torch.randn(4, 11, generator=g), torch.randn(4, 3, generator=g)


def gradients(model, r, step):
    """Rank r's gradient at ``step`` on ``model``'s current weights (None where unused)."""
    model.zero_grad(set_to_none=True)
    x, y = batch(r, step)
    torch.nn.functional.mse_loss(model(x, r), y).backward()
    grads = {name: None if p.grad is None else p.grad.detach().clone()
             for name, p in model.named_parameters()}
    if r == 0 and step == 3:
        grads["body.weight"][0, 0] = float("nan")  # one broken gradient entry on one rank
    return grads


def check(topology: str) -> None:
    """The run against its reference, the zero drift, and the errors, on one topology."""
    with case(f"{topology}: training, and its reference"):
        # The run under test.
        model = Net()
        opt = mpisign.Signum([{"params": [model.body.weight, model.body.bias, model.odd_only]},
                              {"params": [model.head.weight, model.head.bias, model.scale],
                               "lr": 2 * LR}],
                             lr=LR, momentum=BETA, weight_decay=WD, comm=comm, topology=topology,
                             check_every=1)
        for step in range(STEPS):
            grads = gradients(model, rank, step)
            for name, p in model.named_parameters():
                p.grad = grads[name]
            opt.step()
            progress(step)
        assert opt.stats.nonfinite == (1 if rank == 0 else 0)
        if topology == "auto" and size > 1:  # resolved once, the same on every rank
            assert opt.topology_used in mpisign.TOPOLOGIES
            assert len(set(comm.allgather(opt.topology_used))) == 1

        # The reference: all workers simulated here, vote by numpy on unpacked signs.
        ref = Net()
        names = [name for name, _ in ref.named_parameters()]
        params = list(ref.parameters())
        lrs = [2 * LR if name.startswith(("head", "scale")) else LR for name in names]
        mom = [[torch.zeros_like(p) for p in params] for _ in range(size)]
        with torch.no_grad():
            for step in range(STEPS):
                total = [np.zeros(p.numel(), dtype=np.int64) for p in params]
                everywhere = [np.ones(p.numel(), dtype=bool) for p in params]   # 0 on every rank
                with torch.enable_grad():
                    every = [gradients(ref, r, step) for r in range(size)]
                # A parameter with no gradient on any rank is left alone, momentum and all.
                anywhere = [any(every[r][name] is not None for r in range(size)) for name in names]
                for r in range(size):
                    grads = every[r]
                    for i, g in enumerate(grads[name] for name in names):
                        if not anywhere[i]:
                            continue
                        g = (torch.zeros_like(params[i]) if g is None
                             else torch.nan_to_num(g, 0.0, 0.0, 0.0))
                        mom[r][i] = BETA * mom[r][i] + (1 - BETA) * g
                        m = mom[r][i].reshape(-1).double().numpy()
                        total[i] += np.where(m > 0, 1, np.where(m < 0, -1, 1 if (r + step) % 2 else -1))
                        everywhere[i] &= m == 0
                for i, (p, lr) in enumerate(zip(params, lrs)):
                    if not anywhere[i]:
                        continue
                    total[i][everywhere[i]] = 0   # exactly 0 on every rank: no step
                    v = torch.from_numpy(np.sign(total[i]).astype(np.float64)).to(p.dtype).view_as(p)
                    p.copy_(p - lr * (v + WD * p))

        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            assert torch.isfinite(p).all(), name
            err = (p - q).abs().max().item()
            assert err < 1e-6, f"{topology}: {name} differs from the reference by {err}"
        # Every rank holds the same bits.
        digests = comm.allgather(opt.params_digest())
        assert len(set(digests)) == 1, "ranks diverged"
        assert opt.stats.bytes_sent > 0 or size == 1

    with case(f"{topology}: a zero gradient everywhere does not drift, over 1000 steps"):
        z = torch.nn.Parameter(torch.zeros(70))
        zopt = mpisign.Signum([z], lr=1e-3, momentum=0.9, comm=comm, topology=topology)
        for step in range(1000):
            z.grad = torch.zeros(70)
            zopt.step()
        assert z.abs().max().item() <= 2e-3, z.abs().max().item()
        progress("zero-drift")

    # Invalid arguments raise on every rank before any communication (no hang).
    with case(f"{topology}: lr=-1 is refused on every rank"):
        with expect_everywhere(ValueError, "lr"):
            mpisign.Signum(model.parameters(), lr=-1.0, comm=comm, topology=topology)

    # Ranks that disagree about the model all get LayoutMismatch, not a hang.
    if size > 1:
        with case(f"{topology}: a layout on rank {size - 1} alone: LayoutMismatch on every rank"):
            shape = 5 if rank == size - 1 else 4
            bad = torch.nn.Parameter(torch.zeros(shape))
            bopt = mpisign.Signum([bad], lr=0.1, comm=comm, topology=topology)
            bad.grad = torch.ones(shape)
            with expect_everywhere(mpisign.LayoutMismatch, re.escape(f"rank(s) [{size - 1}]")):
                bopt.step()


for topology in TOPOLOGIES:
    check(topology)
    progress(f"done {topology}")
    comm.Barrier()
    if rank == 0:
        print(f"optim_check {topology} OK on {size} ranks", flush=True)
