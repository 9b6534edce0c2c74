"""Accuracy after the same number of steps: Signum, fp32-allreduce SGD, and DDP + PowerSGD.

    python -m mpisign.launch -n 4 -- python benchmarks/bench_accuracy.py [--steps 600]

The main job's default model and data (the small CNN on Fashion-MNIST, or digits where
Fashion-MNIST is not installed), batch 64 per rank, every method from the same initial weights,
on the same shards in the same order, for ``--steps`` steps; then test accuracy on the whole
test set:

* Signum (momentum 0.9, lr 1e-3, ``--topology``, by default the server vote):
  ``mpisign.train``'s defaults (every topology gives the same bits, so the same accuracy);
* SGD (momentum 0.9, lr 0.05) on the fp32 allreduce mean: ``mpisign.train --optimizer sgd``;
* SGD (the same) under DDP (gloo) with ``powerSGD_hook`` at ``--powersgd-rank`` (4), error
  feedback on, compressing from the third step (torch's default waits 1000 steps), what a
  PyTorch user who wants less traffic picks.

Each also reports the bytes it sent per step (PowerSGD's from its own formula: a rank-r
P and Q per matrix, uncompressed vectors; gloo does not count them).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from mpi4py import MPI  # noqa: E402

import mpisign  # noqa: E402
from bench_train_step import init_gloo  # noqa: E402
from mpisign.train.baseline import AllreduceMean  # noqa: E402
from mpisign.train.data import eval_batches, load_data, train_batches  # noqa: E402
from mpisign.train.models import build_model  # noqa: E402

BATCH = 64


def batches(data, comm, steps: int):
    """This rank's first ``steps`` batches, epoch after epoch (the trainer's order)."""
    epoch = 0
    while True:
        for x, y in train_batches(data.train, rank=comm.rank, world=comm.Get_size(),
                                  batch_size=BATCH, seed=0, epoch=epoch):
            yield x, y
            steps -= 1
            if steps == 0:
                return
        epoch += 1


def accuracy(model, data, comm) -> float:
    model.eval()
    right = total = 0
    with torch.no_grad():
        for x, y in eval_batches(data.test, rank=comm.rank, world=comm.Get_size(),
                                 batch_size=1000):
            right += int((model(x).argmax(1) == y).sum())
            total += len(y)
    model.train()
    return comm.allreduce(right) / comm.allreduce(total)


def powersgd_bytes(model, rank: int, world: int) -> int:
    """Bytes a rank sends per step under PowerSGD (ring allreduce of P, Q and the vectors)."""
    floats = 0
    for p in model.parameters():
        if p.dim() > 1:
            n, m = p.shape[0], p[0].numel()
            floats += rank * (n + m) if rank * (n + m) < n * m else n * m
        else:
            floats += p.numel()
    return 2 * 4 * floats * (world - 1) // world


def train(method: str, data, comm, args, steps: int) -> dict:
    torch.manual_seed(0)
    model = build_model("cnn", data.in_channels, data.num_classes, data.image_size)
    net, step, sent = model, None, 0
    if method == "signum":
        opt = mpisign.Signum(model.parameters(), lr=1e-3, momentum=0.9, comm=comm,
                             topology=args.topology)
        step = opt.step
    elif method == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        mean = AllreduceMean(model.parameters(), comm)
        step = lambda: (mean(), opt.step())   # noqa: E731
        sent = mean.bytes_per_step
    else:
        import torch.distributed as dist
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd
        net = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=1024)
        state = powersgd.PowerSGDState(process_group=dist.group.WORLD,
                                       matrix_approximation_rank=args.powersgd_rank,
                                       start_powerSGD_iter=3)
        net.register_comm_hook(state, powersgd.powerSGD_hook)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        step = opt.step
        sent = powersgd_bytes(model, args.powersgd_rank, comm.Get_size())
    comm.Barrier()
    t = time.perf_counter()
    for x, y in batches(data, comm, steps):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        step()
    seconds = comm.allreduce(time.perf_counter() - t, op=MPI.MAX)
    if method == "signum":
        sent = opt.stats.bytes_sent // steps
    return dict(method=method, accuracy=accuracy(model, data, comm), seconds=seconds,
                sent=comm.allreduce(sent, op=MPI.MAX))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--topology", default="server", help="Signum's vote (mpisign.train's default)")
    ap.add_argument("--powersgd-rank", type=int, default=4)
    ap.add_argument("--dataset", default=None, help="default: the main job's")
    args = ap.parse_args()
    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    data = load_data(args.dataset)
    init_gloo(comm)
    train("sgd", data, comm, args, 50)   # warm-up, untimed: first touches, lazy inits
    rows = [train(m, data, comm, args, args.steps) for m in ("signum", "sgd", "powersgd")]
    if comm.rank == 0:
        print(f"\n## {data.name}, small CNN, {comm.Get_size()} ranks x batch {BATCH}, "
              f"{args.steps} steps, PowerSGD rank {args.powersgd_rank}")
        print(f"{'':28s}{'test accuracy':>14s}{'seconds':>9s}{'KB sent/step':>14s}")
        names = {"signum": f"Signum ({args.topology} vote)", "sgd": "SGD, fp32 allreduce",
                 "powersgd": f"SGD, DDP + PowerSGD r={args.powersgd_rank}"}
        for r in rows:
            print(f"{names[r['method']]:28s}{100 * r['accuracy']:13.2f}%{r['seconds']:9.1f}"
                  f"{r['sent'] / 1e3:14.1f}")
    os.environ.pop("GLOO_SOCKET_IFNAME", None)


if __name__ == "__main__":
    main()
