"""mpisign.ddp's hook on real ranks, in a real DDP over a real gloo process group: its parameters
after N steps against mpisign.Signum's on the same data, bit for bit.

The process group is made beside MPI (rank 0 picks a free port and tells the others), so one
launch runs both transports: the hook over the group (``comm=None``) and over MPI.

Usage: ddp_check.py group|mpi [TOPOLOGY | mismatch]
"""

import copy
import os
import socket
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from common import WORLD, case, expect_everywhere, progress
from torch.nn.parallel import DistributedDataParallel as DDP

import mpisign
import mpisign.ddp

transport = sys.argv[1]
topology = sys.argv[2] if len(sys.argv) > 2 else "server"
rank, size = WORLD.Get_rank(), WORLD.Get_size()

if rank == 0:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
else:
    port = None
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(WORLD.bcast(port)))
dist.init_process_group("gloo", rank=rank, world_size=size, timeout=timedelta(seconds=120))

STEPS, LR, BETA = 6, 0.01, 0.9


class Net(torch.nn.Module):
    def __init__(self, unused: bool = False):
        super().__init__()
        torch.manual_seed(7)
        self.body = torch.nn.Linear(13, 40)
        self.head = torch.nn.Linear(40, 3)
        self.spare = torch.nn.Linear(3, 3) if unused else None   # never in the graph

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def batch(step: int, micro: int = 0):
    g = torch.Generator().manual_seed(10_000 * step + 100 * rank + micro)
    x = torch.randn(8, 13, generator=g)
    x[:, 0] = 0.0   # a coordinate of body.weight whose gradient is exactly 0 on every rank
    return x, torch.randn(8, 3, generator=g)


def loss_of(model, step, micro=0):
    x, y = batch(step, micro)
    return torch.nn.functional.mse_loss(model(x), y)


def reference(accumulate: int, unused: bool = False):
    """mpisign.Signum over MPI on the same data: the gradients of each step summed over the
    micro-batches, as DDP's no_sync accumulates them."""
    model = Net(unused)
    opt = mpisign.Signum(model.parameters(), lr=LR, momentum=BETA, comm=WORLD)
    for step in range(STEPS):
        opt.zero_grad()
        for micro in range(accumulate):
            loss_of(model, step, micro).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def with_hook(accumulate: int, unused: bool = False, bucket_cap_mb: float = 25.0,
              resume_at: int | None = None, **options):
    """The hook in a DDP of the same model; ``resume_at``: a new DDP, hook state and SGD at
    that step, loaded from the old ones' state_dicts (a checkpoint and a restart)."""
    model = Net(unused)
    comm = None if transport == "group" else WORLD

    def make(saved=None):
        ddp = DDP(model, find_unused_parameters=unused, bucket_cap_mb=bucket_cap_mb, **options)
        state = mpisign.ddp.SignumState(momentum=BETA, comm=comm, topology=topology)
        opt = torch.optim.SGD(ddp.parameters(), lr=LR, momentum=0.0)
        if saved is not None:
            state.load_state_dict(saved[0])
            opt.load_state_dict(saved[1])
        ddp.register_comm_hook(state, mpisign.ddp.signum_hook)
        return ddp, state, opt
    ddp, state, opt = make()
    for step in range(STEPS):
        if step == resume_at:
            saved = copy.deepcopy((state.state_dict(), opt.state_dict()))
            del ddp, state, opt
            ddp, state, opt = make(saved)
        opt.zero_grad()
        for micro in range(accumulate - 1):
            with ddp.no_sync():
                loss_of(ddp, step, micro).backward()
        loss_of(ddp, step, accumulate - 1).backward()
        opt.step()
        progress(step)
    return [p.detach().clone() for p in model.parameters()]


def same(a, b, what):
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), (what, i, (x - y).abs().max().item())


if topology == "mismatch":   # rank 1 restarts from another step's state: raised everywhere
    with case(f"{transport}: a hook state of another step on rank 1"):
        ddp = DDP(Net())
        state = mpisign.ddp.SignumState(comm=None if transport == "group" else WORLD)
        if rank == 1:
            state.load_state_dict(dict(state.state_dict(), step=5))
        ddp.register_comm_hook(state, mpisign.ddp.signum_hook)
        with expect_everywhere(ValueError, r"rank\(s\) \[1\] have another layout"):
            loss_of(ddp, 0).backward()
    dist.destroy_process_group()
    print(f"ddp_check OK on {size} ranks: {transport} {topology}", flush=True)
    sys.exit(0)

with case(f"{transport} {topology}: one bucket"):
    same(with_hook(1), reference(1), "one bucket")
with case(f"{transport} {topology}: small buckets, rebuilt after the first step"):
    # 0.0005 MB: each parameter its own bucket, whose order DDP rebuilds after step 0.
    same(with_hook(1, bucket_cap_mb=0.0005), reference(1), "small buckets")
with case(f"{transport} {topology}: no_sync accumulation"):
    same(with_hook(3), reference(3), "accumulation")
with case(f"{transport} {topology}: find_unused_parameters"):
    same(with_hook(1, unused=True), reference(1, unused=True), "unused")
with case(f"{transport} {topology}: a checkpoint of the hook's state, and a restart"):
    same(with_hook(1, resume_at=3), reference(1), "resume")
with case(f"{transport} {topology}: gradient_as_bucket_view, static_graph"):
    same(with_hook(1, gradient_as_bucket_view=True, static_graph=True), reference(1), "views")
dist.destroy_process_group()
print(f"ddp_check OK on {size} ranks: {transport} {topology}", flush=True)
