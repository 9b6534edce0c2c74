"""The transformer's training step: Lion with a majority vote against AdamW on fp32 allreduce,
DDP with torch's PowerSGD hook, and forward + backward alone.

    python -m mpisign.launch -n 4 -- python benchmarks/bench_lm_step.py
    # on the emulated 1 Gbit/s cluster (root):
    benchmarks/netns_cluster.sh run -n 4 -- bash -c \\
        '$NETNS_MPIRUN -n 4 python -m mpi4py benchmarks/bench_lm_step.py --label "netns 1gbit"'

The model is ``python -m mpisign.train --model gpt``'s (:class:`mpisign.train.gpt.GPT`, its
default size unless ``--width``/``--layers`` say otherwise) on fixed random byte windows, one
batch per rank. The contenders, each on its own copy of the same initial model:

* ``forward+backward``: the step without any update or communication: the floor;
* ``Lion-MaVo <topology>``: ``mpisign.Lion(...).step()``, 1 bit a coordinate each way; with
  ``overlap`` the votes start from gradient hooks during the backward pass;
* ``AdamW fp32 allreduce``: the gradients fused, ``MPI_Allreduce``, ``torch.optim.AdamW``: what
  a transformer user runs today (``--optimizer adamw`` of the main job);
* ``DDP gloo PowerSGD r``: torch's ``powerSGD_hook`` at rank r (one bucket: with DDP's default
  buckets it aborts on gloo here, see benchmarks/README.md), then AdamW; DDP's communication
  runs in the backward pass;
* ``DDP gloo fp32``: DDP's own allreduce, then AdamW.

Each round runs one step of every contender, in an order shuffled each round (the same on every
rank), so a drift of the machine's speed hits all alike; a step's time is the slowest rank's,
and each figure the median over ``--rounds`` rounds after ``--warmup``. Printed: step, forward
+ backward, the rest, bytes this rank sent per step, and each step's ratio to the floor.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path
import time

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from mpi4py import MPI  # noqa: E402

import mpisign  # noqa: E402
from bench_train_step import DDPStep, FusedAllreduceSGD, init_gloo  # noqa: E402
from mpisign.collectives import costmodel  # noqa: E402
from mpisign.train.gpt import GPT  # noqa: E402


class Floor:
    """No update and no communication: forward + backward alone."""

    def step(self):
        pass


def contenders(comm, args) -> dict:
    """Name -> a function of a model giving something with ``step()`` (and ``net``, for DDP)."""
    adamw = lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1)  # noqa: E731
    lion = dict(lr=1e-4, weight_decay=1.0, comm=comm)
    out = {"forward+backward": lambda model: Floor()}
    for topology in args.topologies.split(","):
        out[f"Lion-MaVo {topology}"] = lambda model, t=topology: mpisign.Lion(
            model.parameters(), topology=t, **lion)
    out["Lion-MaVo sharded overlap"] = lambda model: mpisign.Lion(
        model.parameters(), topology="sharded", overlap=True, bucket_mb=1, **lion)
    out["AdamW fp32 allreduce"] = lambda model: FusedAllreduceSGD(model, comm, make=adamw)
    if not args.no_ddp:
        init_gloo(comm)
        for hook in ("fp32", "powersgd1", "powersgd4"):
            out[f"DDP gloo {hook}"] = lambda model, h=hook: DDPStep(model, h, make=adamw)
    return out


def sent_per_step(runner, comm, n_params: int) -> float:
    if isinstance(runner, mpisign.Lion):
        return runner.stats.bytes_sent / max(1, runner.stats.steps)
    if isinstance(runner, FusedAllreduceSGD):
        return costmodel.traffic("ring_allreduce", n_params, comm.Get_size())[0][0]
    return 0.0 if isinstance(runner, Floor) else float("nan")   # gloo does not count


def one_step(comm, model, runner, batch) -> np.ndarray:
    """(step, forward + backward) seconds of the slowest rank."""
    x, y = batch
    comm.Barrier()
    t0 = time.perf_counter()
    model.zero_grad(set_to_none=False)
    logits = getattr(runner, "net", model)(x)
    F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).backward()
    t1 = time.perf_counter()
    runner.step()
    t2 = time.perf_counter()
    mine = np.array([t2 - t0, t1 - t0])
    slowest = np.empty_like(mine)
    comm.Allreduce(mine, slowest, op=MPI.MAX)
    return slowest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=16, help="windows per rank per step")
    ap.add_argument("--width", type=int, default=None, help="model width (default: the main "
                    "job's)")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--topologies", default="server,sharded")
    ap.add_argument("--no-ddp", action="store_true", help="leave out DDP and its hooks")
    ap.add_argument("--label", default=os.environ.get("BENCH_LABEL", "shared memory"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    size = {k: v for k, v in (("width", args.width), ("layers", args.layers)) if v}

    def model():
        torch.manual_seed(0)   # the same initial model on every rank
        return GPT(**size)

    made = {}
    for name, make in contenders(comm, args).items():
        m = model()
        made[name] = (m, make(m))
    context = made["forward+backward"][0].context
    gen = torch.Generator().manual_seed(100 + comm.Get_rank())
    data = torch.randint(0, 256, (args.batch, context + 1), generator=gen)
    batch = (data[:, :-1], data[:, 1:])
    rows = {name: [] for name in made}
    order = list(made)
    for r in range(args.warmup + args.rounds):
        random.Random(r).shuffle(order)
        for name in order:
            row = one_step(comm, *made[name], batch)
            if r >= args.warmup:
                rows[name].append(row)
    for _, runner in made.values():
        if isinstance(runner, mpisign.Lion) and comm.Get_size() > 1:
            runner.check_consistency()   # every rank holds the same parameters
    n = sum(p.numel() for p in made["forward+backward"][0].parameters())
    sent = {name: comm.allreduce(sent_per_step(runner, comm, n), op=MPI.MAX)
            for name, (_, runner) in made.items()}
    if comm.Get_rank() == 0:
        report(rows, sent, n, comm.Get_size(), args)


def report(rows: dict, sent: dict, n: int, m: int, args) -> None:
    med = {name: np.median(np.array(r), axis=0) for name, r in rows.items()}
    floor = med["forward+backward"][0]
    print(f"\n## The transformer's step ({n:,} parameters), batch {args.batch} per rank, M = {m}, "
          f"{args.label}, median of {args.rounds} shuffled rounds, slowest rank")
    print(f"{'':28s}{'step ms':>9s}{'fwd+bwd':>9s}{'rest':>9s}{'sent MB':>9s}"
          f"{'x fwd+bwd':>11s}")
    for name, (step, compute) in med.items():
        print(f"{name:28s}{1e3 * step:9.1f}{1e3 * compute:9.1f}{1e3 * (step - compute):9.1f}"
              f"{sent[name] / 1e6:9.3f}{step / floor:11.2f}")


if __name__ == "__main__":
    main()
