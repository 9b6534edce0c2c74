"""What elastic=True costs, and how fast the survivors carry on when a rank dies.

    python -m mpisign.launch -n 4 --elastic -- python benchmarks/bench_elastic.py
    python -m mpisign.launch -n 4 --elastic -- python benchmarks/bench_elastic.py --coords 25.6M
    python -m mpisign.launch -n 4 -- python benchmarks/bench_elastic.py   # part 1, plain only

Under ``mpirun --with-ft ulfm`` (what ``--elastic`` adds), on every rank:

1. **Nothing fails.** Two optimizers over the same parameters' copies, ``elastic=False`` and
   ``elastic=True``, step in turn (each first on every other step) on the same gradients,
   ``--steps`` times each; the median ``Signum.step()`` of each, and their ratio. In a launch
   without fault tolerance, the plain one alone: compare it with the same figure of an
   elastic launch (which also moves local messages over TCP: see ``mpisign.launch``).
2. **A rank dies.** The last rank kills itself (SIGKILL) at the start of step ``--steps``; the
   survivors go on for ``--steps`` more. Printed: the time from its death to the end of the
   survivors' first completed step (the recovery and that step's vote among the survivors),
   and the median step before and after.

The model is the main job's small CNN (421,642 parameters) unless ``--coords`` gives one
flat parameter of that many coordinates. Run it on one launch, side by side: wall times drift
on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from mpi4py import MPI

import mpisign
from mpisign.mpi.elastic import FT_VARIABLE
from mpisign.train.models import build_model


def count(text: str) -> int:
    scale = {"K": 1e3, "M": 1e6}.get(text[-1:].upper(), 1)
    return int(float(text.rstrip("KkMm")) * scale)


def parameters(coords: int | None) -> list:
    torch.manual_seed(0)
    if coords:
        return [torch.nn.Parameter(torch.zeros(coords))]
    return list(build_model("cnn", 1, 10, 28).parameters())


def gradients(params: list, rank: int, step: int) -> list:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return [torch.randn(p.shape, generator=g) for p in params]


def timed_step(opt, params, grads) -> float:
    for p, g in zip(params, grads):
        p.grad = g
    t0 = time.perf_counter()
    opt.step()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--coords", type=count, default=None)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--topology", default="sharded")
    args = ap.parse_args()
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    say = print if rank == 0 else (lambda *a, **k: None)
    what = f"{args.coords} coordinates" if args.coords else "the small CNN (421,642 parameters)"
    say(f"{size} ranks, {args.topology}, {what}, {args.steps} steps each")

    # 1. Nothing fails: plain and elastic, in turn, on the same gradients.
    plain_p, elastic_p = parameters(args.coords), parameters(args.coords)
    ulfm = os.environ.get(FT_VARIABLE) == "1"
    runs = [("plain", mpisign.Signum(plain_p, lr=1e-3, comm=comm, topology=args.topology),
             plain_p)]
    if ulfm:
        runs.append(("elastic", mpisign.Signum(elastic_p, lr=1e-3, comm=comm,
                                               topology=args.topology, elastic=True), elastic_p))
    times = {name: [] for name, _, _ in runs}
    for step in range(args.steps + 5):
        grads = gradients(plain_p, rank, step)
        for name, opt, params in (runs if step % 2 else runs[::-1]):
            t = timed_step(opt, params, grads)
            if step >= 5:
                times[name].append(t)
    med = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
    every = comm.gather(med, root=0)
    if rank == 0:
        worst = {k: max(m[k] for m in every) for k in med}
        say("nothing fails: Signum.step() median, slowest rank: " + ", ".join(
            f"{k} {v:.3f} ms" for k, v in worst.items()) + (
            f", ratio {worst['elastic'] / worst['plain']:.3f}" if ulfm else
            " (a launch without fault tolerance: no elastic run)"))
    if not ulfm:
        return
    elastic = runs[1][1]
    assert all(torch.equal(a, b) for a, b in zip(plain_p, elastic_p))

    # 2. The last rank dies at the start of step --steps.
    stamp = Path(tempfile.gettempdir()) / f"bench_elastic.{os.getppid()}.died"
    if rank == 0:
        stamp.unlink(missing_ok=True)
    comm.Barrier()
    before, after, done_at = [], [], []
    for step in range(2 * args.steps):
        grads = gradients(elastic_p, rank, step)
        if step == args.steps and rank == size - 1:
            stamp.write_text(repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)
        t = timed_step(elastic, elastic_p, grads)
        (before if step < args.steps else after).append(t)
        if step == args.steps:
            done_at.append(time.time())
    died = float(stamp.read_text())
    figures = (done_at[0] - died, 1e3 * float(np.median(before)),
               1e3 * float(np.median(after[1:])))
    every = elastic.comm.gather(figures, root=0)
    if elastic.comm.Get_rank() == 0:
        recover = max(f[0] for f in every)
        say_ = print
        say_(f"rank {size - 1} killed: lost_ranks {elastic.stats.lost_ranks}, "
             f"{elastic.comm.Get_size()} survivors; from its death to the end of the "
             f"survivors' first completed step: {1e3 * recover:.1f} ms (slowest survivor); "
             f"step median before {max(f[1] for f in every):.3f} ms, after "
             f"{max(f[2] for f in every):.3f} ms")
        stamp.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
