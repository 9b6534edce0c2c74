"""End-to-end training step time: Signum with each vote topology against fp32-allreduce SGD.

    python -m mpisign.launch -n 4 -- python benchmarks/bench_train_step.py [--batch 16]
        [--steps 5] [--json out.json]
    # on the emulated 1 Gbit/s cluster (root):
    benchmarks/netns_cluster.sh run -n 4 -- bash -c \\
        '$NETNS_MPIRUN -n 4 python -m mpi4py benchmarks/bench_train_step.py --label "netns 1gbit"'

torchvision's ResNet-18 (10 classes, 11.2M parameters) on CIFAR-shaped synthetic batches
(3x32x32, fixed per rank), beside what a PyTorch user would pick instead to send less: DDP
(gloo) with torch's own communication hooks, ``fp16_compress_hook`` and ``powerSGD_hook`` at
ranks 1 and 4 (``--no-ddp`` leaves them out; DDP's ranks meet through a FileStore in /tmp, which
the emulated cluster's namespaces share, and gloo talks over the interface MPI uses). Each step
is split, on every rank, into

* compute: forward and backward (with ``overlap=True`` this includes the packing and the start
  of the votes that the gradient hooks do);
* comm: the time spent in the collective: ``MPI_Allreduce`` of the fused fp32 gradient for SGD,
  the vote's ``start`` + ``finish`` (send, wait, tally) for Signum;
* other: the rest of ``step()``: copying gradients in and out and the SGD update, or Signum's
  momentum, packing and the fused apply of the vote.

DDP runs its allreduce (and its hook's compression) inside the backward pass, so for DDP rows
compute holds all of it and comm is 0: compare the step column.

Figures are the slowest rank's, median over ``--steps`` steps after ``--warmup`` steps. On this
2-core machine the ranks share the cores, so compute is M/2 times slower than on one core each;
read the comm column against the same column of the fp32 baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402
from mpi4py import MPI  # noqa: E402

from mpisign import Signum  # noqa: E402
from mpisign.collectives import costmodel
from mpisign.collectives import TOPOLOGIES  # noqa: E402
import ompi_tool  # noqa: E402


class FusedAllreduceSGD:
    """The fp32 baseline: gradients fused into one buffer, ``Allreduce`` (sum) / M, torch SGD
    (or the torch optimizer ``make(params)`` builds)."""

    def __init__(self, model, comm, lr=0.01, momentum=0.9, make=None):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.comm, self.m = comm, comm.Get_size()
        self.flat = torch.zeros(sum(p.numel() for p in self.params))
        self.buf = self.flat.numpy()
        self.sgd = (make(self.params) if make is not None
                    else torch.optim.SGD(self.params, lr=lr, momentum=momentum))
        self.comm_s = 0.0
        self.bytes_sent = 0

    @torch.no_grad()
    def step(self):
        off = 0
        for p in self.params:
            self.flat[off: off + p.numel()].copy_(p.grad.reshape(-1))
            off += p.numel()
        t = time.perf_counter()
        # Wait on MPI: blocking allreduce, every rank needs the sum before its update.
        self.comm.Allreduce(MPI.IN_PLACE, self.buf, op=MPI.SUM)
        self.comm_s += time.perf_counter() - t
        self.flat.div_(self.m)
        off = 0
        for p in self.params:
            p.grad.copy_(self.flat[off: off + p.numel()].view_as(p))
            off += p.numel()
        self.sgd.step()


class TimedVoter:
    """Wraps a vote collective's ``start``/``finish`` to add up the seconds spent in each."""

    def __init__(self, voter):
        self.start_s = self.finish_s = 0.0
        self._start, self._finish = voter.start, voter.finish
        voter.start, voter.finish = self.start, self.finish

    def start(self, *a, **k):
        t = time.perf_counter()
        try:
            return self._start(*a, **k)
        finally:
            self.start_s += time.perf_counter() - t

    def finish(self, *a, **k):
        t = time.perf_counter()
        try:
            return self._finish(*a, **k)
        finally:
            self.finish_s += time.perf_counter() - t


class DDPStep:
    """DDP over gloo with one of torch's communication hooks, then torch SGD (or the torch
    optimizer ``make(params)`` builds): the model to call is ``net`` (the DDP wrapper), whose
    backward pass does the communication."""

    def __init__(self, model, hook: str, make=None):
        import torch.distributed as dist
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd
        # PowerSGD's hook chains collectives in gloo's callback threads; with several buckets
        # their order can differ between ranks (seen here: "Received data size doesn't match
        # expected size"), so its models travel as one bucket.
        cap = 1024 if hook.startswith("powersgd") else 25
        self.net = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=cap)
        if hook == "fp16":
            self.net.register_comm_hook(None, default_hooks.fp16_compress_hook)
        elif hook.startswith("powersgd"):
            # Compress from the second step on (torch's default waits 1000 steps).
            state = powersgd.PowerSGDState(process_group=dist.group.WORLD,
                                           matrix_approximation_rank=int(hook[len("powersgd"):]),
                                           start_powerSGD_iter=2)
            self.net.register_comm_hook(state, powersgd.powerSGD_hook)
        self.sgd = (make(model.parameters()) if make is not None
                    else torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))

    def step(self):
        self.sgd.step()


def init_gloo(comm) -> None:
    """torch.distributed over gloo for the DDP rows: ranks from MPI, a FileStore in /tmp, and
    gloo on the interface the ranks reach each other by (the emulated cluster's ``mpi0``)."""
    import socket
    import tempfile

    import torch.distributed as dist
    path = comm.bcast(tempfile.mktemp(prefix="mpisign-gloo-") if comm.rank == 0 else None)
    names = {name for _, name in socket.if_nameindex()}
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "mpi0" if "mpi0" in names else "lo")
    dist.init_process_group("gloo", store=dist.FileStore(path, comm.Get_size()),
                            rank=comm.rank, world_size=comm.Get_size())


def run_config(comm, name, make_opt, args, batch):
    """Median over steps of the slowest rank's (step, compute, comm, other) seconds."""
    torch.manual_seed(0)  # the same initial model on every rank
    model = torchvision.models.resnet18(num_classes=10)
    opt = make_opt(model)
    signum = isinstance(opt, Signum)
    x, y = batch
    timer, rows, bytes0 = None, [], 0

    def comm_clock():
        """(vote starts, everything in the collective) so far, in seconds."""
        if timer is not None:
            return timer.start_s, timer.start_s + timer.finish_s
        return 0.0, getattr(opt, "comm_s", 0.0)

    for step in range(args.warmup + args.steps):
        if step == args.warmup and signum and opt.engine.plan is not None:
            timer = TimedVoter(opt.engine.plan.voter)  # made at the first step
            bytes0 = opt.stats.bytes_sent
        comm.Barrier()
        t0 = time.perf_counter()
        model.zero_grad(set_to_none=False)
        loss = F.cross_entropy(getattr(opt, "net", model)(x), y)
        loss.backward()
        t1 = time.perf_counter()
        before_step = comm_clock()[1]  # overlap: votes the hooks started count as compute
        opt.step()
        t2 = time.perf_counter()
        comm_s = comm_clock()[1] - before_step
        if step >= args.warmup:
            compute, total = t1 - t0, t2 - t0
            mine = np.array([total, compute, comm_s, total - compute - comm_s])
            slowest = np.empty_like(mine)
            comm.Allreduce(mine, slowest, op=MPI.MAX)
            rows.append(slowest)
    med = np.median(np.array(rows), axis=0)
    if signum:
        if comm.Get_size() > 1:
            opt.check_consistency()  # every rank holds the same parameters
        sent = (opt.stats.bytes_sent - bytes0) / args.steps
        n_params = opt.stats.coordinates
    elif isinstance(opt, DDPStep):
        n_params = sum(p.numel() for p in model.parameters())
        sent = float("nan")   # gloo does not count its bytes
    else:
        n_params = opt.flat.numel()
        sent = costmodel.traffic("ring_allreduce", n_params, comm.Get_size())[0][0]
    sent = comm.allreduce(sent, op=MPI.MAX)
    return dict(name=name, step_s=med[0], compute_s=med[1], comm_s=med[2], other_s=med[3],
                comm_share=med[2] / med[0], bytes_sent_per_step=sent, params=n_params,
                loss=float(loss.detach()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=16, help="images per rank per step (default 16)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed first steps (default 2)")
    ap.add_argument("--topologies", default=",".join(sorted(TOPOLOGIES)),
                    help="comma-separated Signum topologies (default all)")
    ap.add_argument("--no-overlap", action="store_true", help="leave out the overlap=True runs")
    ap.add_argument("--no-ddp", action="store_true", help="leave out DDP and its hooks")
    ap.add_argument("--label", default=os.environ.get("BENCH_LABEL", ""))
    ap.add_argument("--json", help="write the figures here (rank 0)")
    args = ap.parse_args()
    if args.steps < 1 or args.warmup < 1 or args.batch < 1:
        ap.error("--steps, --warmup and --batch must be >= 1")
    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    m = comm.Get_size()
    gen = torch.Generator().manual_seed(100 + comm.rank)
    batch = (torch.randn(args.batch, 3, 32, 32, generator=gen),
             torch.randint(0, 10, (args.batch,), generator=gen))

    configs = [("SGD fp32 allreduce (MPI default)", lambda mdl: FusedAllreduceSGD(mdl, comm))]
    ring = ompi_tool.forced_allreduce_comm(comm, ompi_tool.ALLREDUCE_RING)
    if ring is not None:
        configs.append(("SGD fp32 allreduce (Open MPI ring)",
                        lambda mdl: FusedAllreduceSGD(mdl, ring)))
    for topology in args.topologies.split(","):
        configs.append((f"Signum {topology}", lambda mdl, t=topology: Signum(
            mdl.parameters(), lr=1e-4, momentum=0.9, comm=comm, topology=t)))
    if not args.no_overlap:
        for topology in ("sharded",):
            configs.append((f"Signum {topology} overlap", lambda mdl, t=topology: Signum(
                mdl.parameters(), lr=1e-4, momentum=0.9, comm=comm, topology=t, overlap=True,
                bucket_mb=8)))

    if not args.no_ddp:
        init_gloo(comm)
        for hook in ("fp32", "fp16", "powersgd1", "powersgd4"):
            configs.append((f"DDP gloo {hook}", lambda mdl, h=hook: DDPStep(mdl, h)))

    results = [run_config(comm, name, make, args, batch) for name, make in configs]
    if comm.rank == 0:
        print(f"\n## Training step, ResNet-18 ({results[0]['params']:,} parameters), batch "
              f"{args.batch} per rank, M = {m}, {args.label or 'local'}")
        print(f"{'':36s}{'step ms':>9s}{'compute':>9s}{'comm':>9s}{'other':>9s}{'comm %':>8s}"
              f"{'sent MB':>9s}")
        for r in results:
            print(f"{r['name']:36s}{1e3 * r['step_s']:9.1f}{1e3 * r['compute_s']:9.1f}"
                  f"{1e3 * r['comm_s']:9.1f}{1e3 * r['other_s']:9.1f}{100 * r['comm_share']:7.1f}%"
                  f"{r['bytes_sent_per_step'] / 1e6:9.2f}")
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(dict(
                ranks=m, label=args.label, batch=args.batch, steps=args.steps,
                results=results), indent=1))


if __name__ == "__main__":
    main()
