"""overlap=True (votes started from gradient hooks, several buckets) gives the same bits as the
blocking path, with a parameter whose .grad is None on some ranks.
Usage: overlap_check.py TOPOLOGY [NODE_SIZES], e.g. "hierarchical 1,3": ranks in nodes of 1 and
3 ranks, named by $MPISIGN_NODE on each rank.
"""

import sys

import torch
from common import WORLD, case, name_nodes, progress

import mpisign

comm = WORLD
rank, size = comm.Get_rank(), comm.Get_size()
topology = sys.argv[1]
name_nodes(sys.argv[2] if len(sys.argv) > 2 else None)


def make_model():
    torch.manual_seed(7)
    return torch.nn.ModuleDict({
        "a": torch.nn.Linear(20, 64), "b": torch.nn.Linear(64, 64), "c": torch.nn.Linear(64, 5),
        "unused_on_even": torch.nn.Linear(5, 5)})


def forward(m, x):
    y = m["c"](torch.relu(m["b"](torch.relu(m["a"](x)))))
    return m["unused_on_even"](y) if rank % 2 else y


def train(overlap: bool):
    model = make_model()
    # bucket_mb small enough that the model spans several buckets.
    opt = mpisign.Signum(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-3,
                         comm=comm, topology=topology, overlap=overlap, bucket_mb=0.001)
    for step in range(6):
        g = torch.Generator().manual_seed(100 * step + rank)
        x, y = torch.randn(8, 20, generator=g), torch.randn(8, 5, generator=g)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(forward(model, x), y).backward()
        opt.step()
        progress(f"{'overlap' if overlap else 'blocking'}-{step}")
    return model, opt


with case(f"{topology}: blocking"):
    blocking, bopt = train(False)
with case(f"{topology}: overlap, the blocking path's bits"):
    overlapped, oopt = train(True)
    assert len(oopt.engine.plan.layout.buckets) >= 3, len(oopt.engine.plan.layout.buckets)
    # The hooks really started votes during backward: from the second step on (the hooks are
    # installed with the layout, at the first step), in every bucket but the one holding the
    # parameter that even ranks never use, which step() starts.
    assert oopt.stats.overlapped >= 5 * (len(oopt.engine.plan.layout.buckets) - 1), oopt.stats.overlapped
    assert bopt.stats.overlapped == 0
    for (name, p), q in zip(blocking.named_parameters(), overlapped.parameters()):
        assert torch.equal(p, q), f"{topology}: {name} differs between blocking and overlap"
    assert len(set(comm.allgather(oopt.params_digest()))) == 1
comm.Barrier()
if rank == 0:
    print(f"overlap_check {topology} OK on {size} ranks, {len(oopt.engine.plan.layout.buckets)} buckets",
          flush=True)
