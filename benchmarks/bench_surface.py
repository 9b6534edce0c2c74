"""What a user's code calls, timed beside the baseline it replaces, in one process or one mpirun.

    python benchmarks/bench_surface.py step              # Signum.step() vs SGD, one rank
    python benchmarks/bench_surface.py lion-step [--model gpt]   # Lion.step() vs lion-pytorch's
    python -m mpisign.launch -n 4 -- python benchmarks/bench_surface.py vote
    python -m mpisign.launch -n 4 -- python benchmarks/bench_surface.py train-step
    # on the emulated 1 Gbit/s cluster (root):
    benchmarks/netns_cluster.sh run -n 4 -- bash -c \\
        '$NETNS_MPIRUN -n 4 python -m mpi4py benchmarks/bench_surface.py vote --label "netns 1gbit"'

``step``: ``Signum(momentum=0.9).step()`` on one ``--n``-coordinate parameter (ResNet-50's
25.6M by default) on ``COMM_SELF``, beside ``torch.optim.SGD(momentum=0.9).step()`` on the same,
and Signum on the numpy reference kernels (``MPISIGN_KERNELS=reference`` when it is built):
the same memory traffic is the target (SGD reads the gradient, momentum and parameter and writes
momentum and parameter; so does Signum, plus one bit a coordinate).

``lion-step``: ``mpisign.Lion(weight_decay=0.1).step()`` on ``COMM_SELF`` beside the published
PyTorch Lion's step (PyPI's ``lion-pytorch``; timm's ``Lion`` too where timm is installed) and
``torch.optim.AdamW`` (what a Lion user replaces), on one ``--n``-coordinate parameter, or with
``--model gpt`` on the parameters of ``mpisign.train``'s transformer (many small tensors: the
per-tensor cost counts).

``vote``: ``mpisign.majority_vote(x, topology=...)`` on a float32 tensor, plain (the last
result held during the call, as in a loop ``y = majority_vote(x)``) and with ``out=``, beside
``comm.Allreduce`` of the same fp32 tensor (what the vote replaces), on every rank of
``COMM_WORLD``. Times are the slowest rank's.

``train-step``: the main job's optimizer step on its default model (the small CNN, 421,642
parameters) as ``mpisign.train`` runs it: ``Signum(topology=..., monitor=DisagreementMonitor())
.step()`` beside the fp32 baseline of ``--optimizer sgd`` (``AllreduceMean`` of the fused
gradient, then ``SGD(momentum=0.9).step()``), on fixed random gradients; forward and backward
are the same for both and left out.

Each contender runs ``--rounds`` times, interleaved in an order shuffled each round, and the
median of each is printed with its ratio to the baseline, so that a drift of the machine's speed
hits all alike.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import numpy as np
import torch
from mpi4py import MPI

import mpisign
from mpisign.backends import native


def interleaved(contenders: dict, rounds: int, comm=None) -> dict:
    """Median seconds of each contender, run ``rounds`` times in an order shuffled each round
    (after one warm-up each); with ``comm``, each time is the slowest rank's.

    Shuffled, because the contender that runs right after another kind of step runs slower
    (measured on 4 oversubscribed ranks: the same Signum step took 2.6 ms right after the
    fp32 baseline and 2.3 ms right after another Signum step), and a fixed order gives that
    cost to the same contender every round. The seed is fixed, so every rank runs the same
    order."""
    for fn in contenders.values():
        fn()
    samples = {name: [] for name in contenders}
    order, shuffle = list(contenders), random.Random(0).shuffle
    for _ in range(rounds):
        shuffle(order)
        for name in order:
            if comm is not None:
                comm.Barrier()
            t = time.perf_counter()
            contenders[name]()
            dt = time.perf_counter() - t
            samples[name].append(dt if comm is None else comm.allreduce(dt, op=MPI.MAX))
    return {name: statistics.median(s) for name, s in samples.items()}


def report(title: str, times: dict, baseline: str) -> None:
    print(title)
    for name, t in times.items():
        print(f"  {name:44s} {1e3 * t:9.2f} ms   x {t / times[baseline]:.2f} of {baseline}")


def step_mode(args) -> None:
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)

    def param():
        p = torch.nn.Parameter(torch.randn(args.n, generator=gen))
        p.grad = torch.randn(args.n, generator=gen)
        return p

    sgd = torch.optim.SGD([param()], lr=1e-4, momentum=0.9)
    signum = mpisign.Signum([param()], lr=1e-4, momentum=0.9, comm=MPI.COMM_SELF)
    contenders = {"torch SGD(momentum=0.9).step()": sgd.step,
                  "mpisign Signum(momentum=0.9).step()": signum.step}
    if native.available():   # the same step on the reference kernels, chosen at its first step
        reference = mpisign.Signum([param()], lr=1e-4, momentum=0.9, comm=MPI.COMM_SELF)
        os.environ["MPISIGN_KERNELS"] = "reference"
        reference.step()
        del os.environ["MPISIGN_KERNELS"]
        contenders["mpisign Signum, numpy reference kernels"] = reference.step
    times = interleaved(contenders, args.rounds)
    report(f"one parameter of {args.n:,} coordinates, 1 rank, {args.threads} thread(s), "
           f"kernels: {native.simd() if native.available() else 'reference'}, median of "
           f"{args.rounds}", times, "torch SGD(momentum=0.9).step()")


def lion_step_mode(args) -> None:
    import lion_pytorch

    torch.set_num_threads(args.threads)

    def params():
        gen = torch.Generator().manual_seed(0)
        if args.model == "gpt":
            from mpisign.train.gpt import GPT
            torch.manual_seed(0)
            ps = list(GPT().parameters())
        else:
            ps = [torch.nn.Parameter(torch.randn(args.n, generator=gen))]
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen)
        return ps

    hp = dict(lr=1e-4, weight_decay=0.1)
    contenders = {"lion-pytorch Lion.step()": lion_pytorch.Lion(params(), **hp).step,
                  "mpisign Lion.step(), 1 rank": mpisign.Lion(params(), comm=MPI.COMM_SELF,
                                                              **hp).step,
                  "torch AdamW.step()": torch.optim.AdamW(params(), **hp).step}
    try:
        from timm.optim import Lion as TimmLion
        contenders["timm Lion.step()"] = TimmLion(params(), **hp).step
    except ImportError:
        pass
    ps = params()
    what = (f"the transformer's {len(ps)} tensors, {sum(p.numel() for p in ps):,} coordinates"
            if args.model == "gpt" else f"one parameter of {args.n:,} coordinates")
    times = interleaved(contenders, args.rounds)
    report(f"{what}, 1 rank, {args.threads} thread(s), kernels: "
           f"{native.simd() if native.available() else 'reference'}, median of {args.rounds}",
           times, "lion-pytorch Lion.step()")


def vote_mode(args) -> None:
    comm = MPI.COMM_WORLD
    torch.set_num_threads(args.threads)
    x = torch.randn(args.n, generator=torch.Generator().manual_seed(comm.Get_rank()))
    out = torch.empty_like(x)
    total = np.empty(args.n, dtype=np.float32)
    contenders = {"comm.Allreduce fp32": lambda: comm.Allreduce(x.numpy(), total, op=MPI.SUM)}
    last = {}   # as a loop `y = majority_vote(x)` does, the last result is held during a call
    for topology in (args.topologies or "sharded").split(","):
        contenders[f"majority_vote {topology}"] = \
            lambda t=topology: last.__setitem__(t, mpisign.majority_vote(x, comm, t))
        contenders[f"majority_vote {topology}, out="] = \
            lambda t=topology: mpisign.majority_vote(x, comm, t, out=out)
    times = interleaved(contenders, args.rounds, comm)
    if comm.Get_rank() == 0:
        report(f"{args.n:,} float32 coordinates, {comm.Get_size()} ranks, {args.label}, "
               f"median of {args.rounds}, slowest rank", times, "comm.Allreduce fp32")


def train_step_mode(args) -> None:
    from mpisign.train.baseline import AllreduceMean
    from mpisign.train.models import build_model

    comm = MPI.COMM_WORLD
    torch.set_num_threads(args.threads)

    def model_with_grads():
        torch.manual_seed(0)
        model = build_model("cnn", 1, 10, 28)   # Fashion-MNIST: 1 x 28 x 28, 10 classes
        gen = torch.Generator().manual_seed(comm.Get_rank())
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        return model

    sgd_model, signum_model = model_with_grads(), model_with_grads()
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=0.01, momentum=0.9)
    mean = AllreduceMean(sgd_model.parameters(), comm)
    signum = mpisign.Signum(signum_model.parameters(), lr=1e-3, momentum=0.9, comm=comm,
                            topology=(args.topologies or "server").split(",")[0],
                            monitor=mpisign.DisagreementMonitor())
    contenders = {"fp32 allreduce + SGD(momentum=0.9).step()": lambda: (mean(), sgd.step()),
                  f"Signum({signum.topology}, monitor).step()": signum.step}
    times = interleaved(contenders, args.rounds, comm)
    if comm.Get_rank() == 0:
        n = sum(p.numel() for p in signum_model.parameters())
        report(f"small CNN ({n:,} parameters), {comm.Get_size()} ranks, {args.label}, median "
               f"of {args.rounds}, slowest rank", times,
               "fp32 allreduce + SGD(momentum=0.9).step()")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=["step", "lion-step", "vote", "train-step"])
    ap.add_argument("--n", type=int, default=25_557_032, help="coordinates (ResNet-50: 25.6M)")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--topologies", default=None,
                    help="comma-separated, for vote (default sharded); the first one for "
                         "train-step (default server, as the main job votes)")
    ap.add_argument("--label", default="shared memory")
    ap.add_argument("--model", choices=["gpt"], default=None,
                    help="lion-step: the transformer's parameters instead of one of --n")
    args = ap.parse_args()
    {"step": step_mode, "lion-step": lion_step_mode, "vote": vote_mode,
     "train-step": train_step_mode}[args.mode](args)


if __name__ == "__main__":
    main()
