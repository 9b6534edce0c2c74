"""How far the DDP hook with torch's SGD weight decay is from mpisign.Signum's weight decay: the
same small MLP and data on every rank, 20 steps each way; how many coordinates are identical.

    python -m mpisign.launch -n 3 -- python benchmarks/ddp_weight_decay.py
"""

import os
import socket

import torch
import torch.distributed as dist
from mpi4py import MPI
from torch.nn.parallel import DistributedDataParallel as DDP

import mpisign
import mpisign.ddp

WORLD = MPI.COMM_WORLD
RANK = WORLD.Get_rank()
WD, LR, STEPS = 0.01, 0.01, 20


def net():
    torch.manual_seed(7)
    return torch.nn.Sequential(torch.nn.Linear(13, 40), torch.nn.ReLU(), torch.nn.Linear(40, 3))


def data(step):
    g = torch.Generator().manual_seed(1000 * step + RANK)
    return torch.randn(8, 13, generator=g), torch.randn(8, 3, generator=g)


def main():
    port = None
    if RANK == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(WORLD.bcast(port)))
    dist.init_process_group("gloo", rank=RANK, world_size=WORLD.Get_size())
    a = net()
    signum = mpisign.Signum(a.parameters(), lr=LR, momentum=0.9, weight_decay=WD, comm=WORLD)
    b = net()
    ddp = DDP(b)
    ddp.register_comm_hook(mpisign.ddp.SignumState(momentum=0.9), mpisign.ddp.signum_hook)
    sgd = torch.optim.SGD(ddp.parameters(), lr=LR, momentum=0, weight_decay=WD)
    for step in range(STEPS):
        for model, opt in ((a, signum), (ddp, sgd)):
            opt.zero_grad()
            x, y = data(step)
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    same = sum(int((p == q).sum()) for p, q in zip(a.parameters(), b.parameters()))
    total = sum(p.numel() for p in a.parameters())
    if RANK == 0:
        print(f"weight_decay={WD}, {STEPS} steps on {WORLD.Get_size()} ranks: {same} of {total} "
              f"coordinates identical", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
