"""A plain DistributedDataParallel script, Fashion-MNIST and a small CNN, with mpisign's vote as
its communication hook: the two lines marked ``# mpisign`` are all that changes in a DDP script.

    torchrun --nproc-per-node 3 examples/ddp_signum.py                 # gloo, no MPI at all
    python -m torch.distributed.run --nproc-per-node 3 examples/ddp_signum.py
    python -m mpisign.launch -n 3 -- python examples/ddp_signum.py --transport mpi
    torchrun --nproc-per-node 3 examples/ddp_signum.py --max-steps 50 --test-limit 1000

Each rank takes its part of the training set (torch's DistributedSampler: a DDP job has a
process group), the hook votes the signs of each rank's momentum, and torch's own SGD steps by
the vote. Under ``mpisign.launch`` the process group is made from MPI's ranks and the vote goes
over MPI (``--transport mpi``), or over the group (``--transport group``, the default).
"""

import argparse
import gc
import os
import socket

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler

import mpisign.ddp  # mpisign
from mnist_signum import FashionMNIST, Net   # the model and data of the MPI example


def init_process_group(transport: str):
    """torchrun's environment, or, under an MPI launcher, one made from MPI's ranks."""
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
        return None
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    port = None
    if comm.Get_rank() == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(comm.bcast(port))
    dist.init_process_group("gloo", rank=comm.Get_rank(), world_size=comm.Get_size())
    return comm if transport == "mpi" else None


def main():
    parser = argparse.ArgumentParser(description="DDP + mpisign's vote hook on Fashion-MNIST")
    parser.add_argument("--batch-size", type=int, default=64, help="per rank")
    parser.add_argument("--lr", type=float, default=1e-3, help="the step itself (sign method)")
    parser.add_argument("--momentum", type=float, default=0.9, help="Signum's beta")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--test-limit", type=int, default=2000)
    parser.add_argument("--transport", choices=("group", "mpi"), default="group")
    parser.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    args = parser.parse_args()

    comm = init_process_group(args.transport)
    rank, size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(1)
    train_set = FashionMNIST(args.data_dir, train=True)
    test_set = Subset(FashionMNIST(args.data_dir, train=False), range(args.test_limit))
    loader = DataLoader(train_set, batch_size=args.batch_size,
                        sampler=DistributedSampler(train_set, seed=1))
    model = DDP(Net())
    model.register_comm_hook(mpisign.ddp.SignumState(momentum=args.momentum, comm=comm),  # mpisign
                             mpisign.ddp.signum_hook)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0,   # mpisign: lr, momentum 0
                          weight_decay=args.weight_decay)
    step, epoch = 0, 0
    while step < args.max_steps:
        loader.sampler.set_epoch(epoch)
        for x, y in loader:
            opt.zero_grad()
            loss = F.nll_loss(model(x), y)
            loss.backward()
            opt.step()
            step += 1
            if rank == 0 and step % 50 == 0:
                print(f"step {step}: loss {loss.item():.4f}", flush=True)
            if step == args.max_steps:
                break
        epoch += 1
    model.eval()
    correct = torch.zeros(1)
    with torch.no_grad():
        for i in range(rank, len(test_set), size):
            x, y = test_set[i]
            correct += int(model.module(x.unsqueeze(0)).argmax(1).item() == y)
    dist.all_reduce(correct)
    if rank == 0:
        print(f"test accuracy after {step} steps on {size} ranks ({args.transport}): "
              f"{100 * correct.item() / len(test_set):.1f}% of {len(test_set)}", flush=True)
    # DDP's reducer holds the process group (through the parameters' gradient hooks, which the
    # optimizer keeps alive): let both go first, so that destroying the group joins gloo's
    # threads now. A group still alive when Python exits lets a gloo thread release a tensor
    # while the interpreter is finalizing, and that aborts the process.
    del model, opt
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
