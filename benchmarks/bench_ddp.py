"""DDP's communication hooks side by side: mpisign's vote as a hook (Signum over gloo with the
server, sharded and tree votes, over MPI with the server and the sharded vote; Lion over gloo)
against DDP's fp32 allreduce, its fp16 hook and PowerSGD (rank 1 and 4), and mpisign.Signum's
own step (over MPI, and over the gloo group), in one job, on the same model and data.

    sudo PATH=$PWD/.venv/bin:$PATH benchmarks/netns_cluster.sh run -n 4 -- \\
        bash -c '$NETNS_MPIRUN -n 4 python -m mpi4py benchmarks/bench_ddp.py'
    python -m mpisign.launch -n 4 -- python benchmarks/bench_ddp.py --steps 5   # locally

Every method gets its own copy of the model (ResNet-18, 10 classes, 32x32 inputs, ``--batch``
a rank), warmed up (PowerSGD's allreduce warm-up included), then the methods take turns for
``--rounds`` rounds of ``--steps`` steps each, so that drift on a shared machine falls on all of
them alike. A step is forward, backward (the hook's communication in it) and the optimizer's
step; its time is the slowest rank's wall time over the steps of a round, and the figure is the
median over the rounds. Ratios are against ``mpisign.Signum``'s own step with ``drain()`` after
each step (as the hook completes its sends after each vote), in the same job.

On the emulated cluster the process group's gloo runs over each namespace's ``mpi0`` link
(``GLOO_SOCKET_IFNAME``), to rank 0's address there, like MPI's own TCP.
"""

from __future__ import annotations

import argparse
import faulthandler
import fcntl
import json
import os
import socket
import struct
import time

import numpy as np
import torch
import torch.distributed as dist
import torchvision
from mpi4py import MPI
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel as DDP

import mpisign
import mpisign.ddp
import mpisign.mpi.comm

WORLD = MPI.COMM_WORLD
RANK, SIZE = WORLD.Get_rank(), WORLD.Get_size()


def interface_address(name: str) -> str | None:
    """The IPv4 address of interface ``name`` (the emulated cluster's ``mpi0``), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


def init_group() -> None:
    address, port = "127.0.0.1", None
    if interface_address("mpi0") is not None:
        os.environ["GLOO_SOCKET_IFNAME"] = "mpi0"
        address = interface_address("mpi0")
    if RANK == 0:
        with socket.socket() as s:
            s.bind((address, 0))
            port = s.getsockname()[1]
    address, port = WORLD.bcast((address, port))
    os.environ.update(MASTER_ADDR=address, MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=RANK, world_size=SIZE)


#: One bucket for the whole model, after DDP's rebuild: the hooks vote (or reduce) once a step,
#: as mpisign.Signum (overlap=False) does. With several buckets, PowerSGD's callbacks start their
#: allreduces from gloo's threads in an order that differs across ranks, and gloo aborts on the
#: mismatch ("Received data size doesn't match expected size").
BUCKET_MB = 100


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


def methods(lr: float, broadcast_buffers: bool = True) -> dict:
    """name -> (the module to call, the optimizer): each method with a model of its own;
    ``broadcast_buffers``: DDP's own option (rank 0's BatchNorm buffers at each forward)."""
    made = {}
    net = model()
    made["mpisign.Signum (own step)"] = (net, mpisign.Signum(net.parameters(), lr=lr,
                                                              comm=WORLD))
    net = model()
    made[DRAINED] = (net, mpisign.Signum(net.parameters(), lr=lr, comm=WORLD))
    net = model()
    made["mpisign.Signum over the gloo group"] = (
        net, mpisign.Signum(net.parameters(), lr=lr, comm=dist.group.WORLD))

    def ddp(name, hook=None, state=None):
        wrapped = DDP(model(), bucket_cap_mb=BUCKET_MB, broadcast_buffers=broadcast_buffers)
        if hook is not None:
            wrapped.register_comm_hook(state, hook)
        made[name] = (wrapped, torch.optim.SGD(wrapped.parameters(), lr=lr, momentum=0.0))
    ddp("DDP + mpisign hook, gloo", mpisign.ddp.signum_hook, mpisign.ddp.SignumState())
    for topology in ("sharded", "tree"):
        ddp(f"DDP + mpisign hook, gloo {topology}", mpisign.ddp.signum_hook,
            mpisign.ddp.SignumState(topology=topology))
    ddp("DDP + mpisign hook, MPI", mpisign.ddp.signum_hook, mpisign.ddp.SignumState(comm=WORLD))
    ddp("DDP + mpisign hook, MPI sharded", mpisign.ddp.signum_hook,
        mpisign.ddp.SignumState(comm=WORLD, topology="sharded"))
    ddp("DDP + mpisign Lion hook, gloo", mpisign.ddp.lion_hook, mpisign.ddp.LionState())
    ddp("DDP fp32 allreduce")
    ddp(NOOP, noop_hook, None)
    ddp("DDP + fp16 hook", default_hooks.fp16_compress_hook, None)
    for rank in (1, 4):
        ddp(f"DDP + PowerSGD rank {rank}", powerSGD_hook.powerSGD_hook,
            powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=rank,
                                        start_powerSGD_iter=2))
    return made


#: DDP's own cost with no communication at all: a hook that returns the bucket as it is (a
#: diagnosis: every rank keeps its own gradient, so the models drift apart).
NOOP = "DDP + no-op hook (no communication)"


def noop_hook(state, bucket):
    done = torch.futures.Future()
    done.set_result(bucket.buffer())
    return done


#: Signum whose root completes its results' sends at the end of each step (opt.drain()), as the
#: hook does over MPI: by default they are left in flight, and over TCP only the root's next MPI
#: call moves them on, after its next forward and backward.
DRAINED = "mpisign.Signum, drain() each step"


def step(module, opt, x, y, drain: bool = False) -> None:
    opt.zero_grad()
    torch.nn.functional.cross_entropy(module(x), y).backward()
    opt.step()
    if drain:
        opt.drain()


def settle(opt) -> None:
    """Before another method's gloo collectives: the Signum root's results left in flight
    completed (only its MPI calls move them; gloo's wait would not, and the workers would
    wait for them while the root waits in gloo for the workers)."""
    if isinstance(opt, mpisign.Signum):
        opt.drain()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16, help="per rank")
    parser.add_argument("--steps", type=int, default=5, help="timed steps a round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--json", default="")
    parser.add_argument("--only", default="",
                        help="run the methods whose names contain one of these "
                             "(comma-separated)")
    parser.add_argument("--no-broadcast-buffers", action="store_true",
                        help="DDP(broadcast_buffers=False), a diagnosis")
    parser.add_argument("--yield-seconds", type=float, default=None,
                        help="how long mpisign's MPI waits yield the core before they nap "
                             "(mpisign.mpi.comm.YIELD_SECONDS), a diagnosis")
    parser.add_argument("--dump-after", type=float, default=0.0,
                        help="print every thread's stack after this many seconds (diagnosis)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.yield_seconds is not None:
        mpisign.mpi.comm.YIELD_SECONDS = args.yield_seconds
    init_group()
    g = torch.Generator().manual_seed(RANK)
    x = torch.randn(args.batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    if args.dump_after:
        faulthandler.dump_traceback_later(args.dump_after)
    made = {name: m for name, m in methods(args.lr, not args.no_broadcast_buffers).items()
            if any(part in name for part in args.only.split(","))}
    for module, opt in made.values():
        for _ in range(args.warmup):
            step(module, opt, x, y)
        settle(opt)
    times: dict = {name: [] for name in made}
    for _ in range(args.rounds):
        for name, (module, opt) in made.items():
            WORLD.Barrier()
            start = time.perf_counter()
            for _ in range(args.steps):
                step(module, opt, x, y, drain=name == DRAINED)
            settle(opt)
            elapsed = (time.perf_counter() - start) / args.steps
            times[name].append(WORLD.allreduce(elapsed, op=MPI.MAX))
    if RANK == 0:
        # Against the drained Signum: the hook completes its sends after every vote too.
        base = float(np.median(times.get(DRAINED, [np.nan])))
        rows = {name: float(np.median(t)) for name, t in times.items()}
        print(f"ResNet-18, {SIZE} ranks, batch {args.batch} a rank, median of {args.rounds} "
              f"rounds of {args.steps} steps (slowest rank)")
        print(f"{'method':34} {'step ms':>9} {'vs drained':>10}")
        for name, t in rows.items():
            print(f"{name:34} {1000 * t:9.1f} {t / base:9.2f}x")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"ranks": SIZE, "batch": args.batch, "step_s": rows,
                           "rounds": times}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
