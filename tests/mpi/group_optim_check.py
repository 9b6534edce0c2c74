"""mpisign.Signum / SignSGD / Lion with ``comm=`` a torch.distributed process group (gloo, made
beside MPI), on real ranks: parameters after N steps against the same optimizer over MPI on the
same data, bit for bit (gradients missing on some ranks, exact zeros on every rank, weight
decay); the step header's errors on every rank; check_consistency; what a group refuses.

Usage: group_optim_check.py TOPOLOGY
"""

import sys

import torch
import torch.distributed as dist
from common import WORLD, case, expect_everywhere, init_gloo, progress

import mpisign
from mpisign.optim.header import HyperparameterMismatch, LayoutMismatch

topology = sys.argv[1]
rank, size = WORLD.Get_rank(), WORLD.Get_size()
init_gloo()
GROUP = dist.group.WORLD
STEPS = 5


def model():
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(11, 30), torch.nn.ReLU(), torch.nn.Linear(30, 4),
                               torch.nn.Linear(4, 4))


def train(make, comm, missing: bool) -> list:
    """``STEPS`` steps of ``make(params, comm)``; with ``missing``, the last layer has no
    gradient on rank 1 at odd steps, and on no rank at step 3."""
    net = model()
    opt = make(net.parameters(), comm)
    for step in range(STEPS):
        g = torch.Generator().manual_seed(1000 * step + rank)
        x, y = torch.randn(6, 11, generator=g), torch.randn(6, 4, generator=g)
        x[:, 2] = 0.0   # the weights of input 2: a gradient exactly 0 on every rank
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        if missing and (step == 3 or (rank == 1 and step % 2)):
            net[3].weight.grad = net[3].bias.grad = None
        opt.step()
        progress(step)
    opt.check_consistency()
    return [p.detach().clone() for p in net.parameters()], opt


OPTIMIZERS = {
    "Signum": lambda params, comm: mpisign.Signum(params, lr=0.01, momentum=0.9,
                                                  weight_decay=0.01, comm=comm,
                                                  topology=topology),
    "SignSGD": lambda params, comm: mpisign.SignSGD(params, lr=0.01, comm=comm,
                                                    topology=topology),
    "Lion": lambda params, comm: mpisign.Lion(params, lr=0.003, betas=(0.9, 0.99),
                                              weight_decay=0.1, comm=comm, topology=topology),
}

for name, make in OPTIMIZERS.items():
    for missing in (False, True):
        with case(f"{topology} {name}{' with missing gradients' if missing else ''}: "
                  f"over the group as over MPI, bit for bit"):
            over_group, opt = train(make, GROUP, missing)
            over_mpi, _ = train(make, WORLD, missing)
            for i, (a, b) in enumerate(zip(over_group, over_mpi)):
                assert torch.equal(a, b), (name, i, (a - b).abs().max().item())
            assert opt.topology_used == topology and opt.world_size == size
            assert type(opt.engine.ranks).__name__ == "Grouped" and opt.comm is GROUP
            assert opt.stats.bytes_sent > 0 and opt.stats.steps == STEPS

with case(f"{topology}: a learning rate that differs on rank 1 is raised on every rank"):
    net = model()
    opt = mpisign.Signum(net.parameters(), lr=0.02 if rank == 1 else 0.01, comm=GROUP,
                         topology=topology)
    sum(p.sum() for p in net.parameters()).backward()
    with expect_everywhere(HyperparameterMismatch, r"rank\(s\) \[1\]"):
        opt.step()

with case(f"{topology}: a layout that differs on rank 2 is raised on every rank"):
    net = model() if rank != 2 else torch.nn.Linear(3, 3)
    opt = mpisign.Signum(net.parameters(), lr=0.01, comm=GROUP, topology=topology)
    sum(p.sum() for p in net.parameters()).backward()
    with expect_everywhere(LayoutMismatch, r"rank\(s\) \[2\]"):
        opt.step()

with case(f"{topology}: what a process group cannot carry is refused"):
    params = list(model().parameters())
    for options, match in (({"topology": "hierarchical"}, "topology must be one of"),
                           ({"quorum": size - 1}, "quorum= needs"),
                           ({"elastic": True}, "elastic=True needs MPI's ULFM"),
                           ({"overlap": True}, "overlap=True starts votes")):
        with expect_everywhere(ValueError, match):
            mpisign.Signum(params, lr=0.01, comm=GROUP, **{"topology": topology, **options})
    opt = mpisign.Signum(params, lr=0.01, comm=GROUP, topology=topology)
    with expect_everywhere(ValueError, "not supported there yet"):
        mpisign.gather_state_dict(opt)

dist.destroy_process_group()
print(f"group_optim_check OK on {size} ranks: {topology}", flush=True)
