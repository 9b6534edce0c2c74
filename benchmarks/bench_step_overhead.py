"""Per-step overhead of Signum against torch's own optimizers, and what the step header costs.

A small MLP (3 layers, 512 hidden, 1 thread), the same gradients every step, side by side in one
process: the median of ``--steps`` timed ``step()`` calls each, after a warm-up.

    python benchmarks/bench_step_overhead.py                       # 1 rank: Signum vs SGD, Adam
    python -m mpisign.launch -n 4 -- python benchmarks/bench_step_overhead.py   # + the header

On several ranks it also times the step header's exchange alone (one 72-byte allgather, as ``Signum.step`` posts it beside
the vote) on the optimizer's own communicator,
so its share of the step is measured, not guessed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from mpi4py import MPI

import mpisign
from mpisign.optim.header import StepHeader, exchange


def timed(step, steps: int, comm) -> float:
    samples = []
    for _ in range(steps):
        comm.Barrier()
        t0 = time.perf_counter()
        step()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--hidden", type=int, default=512)
    args = p.parse_args()
    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(784, args.hidden), torch.nn.ReLU(),
                                torch.nn.Linear(args.hidden, args.hidden), torch.nn.ReLU(),
                                torch.nn.Linear(args.hidden, 10))
    model(torch.randn(32, 784)).square().sum().backward()
    optimizers = {
        "torch SGD(momentum=0.9)": torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9),
        "torch Adam": torch.optim.Adam(model.parameters(), lr=1e-6),
        f"mpisign Signum ({comm.Get_size()} ranks)":
            mpisign.Signum(model.parameters(), lr=1e-6, momentum=0.9, comm=comm),
    }
    results = {}
    for name, opt in optimizers.items():
        timed(opt.step, 20, comm)   # warm-up: state, layout, first-step checks
        results[name] = timed(opt.step, args.steps, comm)
    signum = optimizers[f"mpisign Signum ({comm.Get_size()} ranks)"]
    if comm.Get_size() > 1:
        own = signum.engine.own_comm.get()
        header = StepHeader(0, 1, 2, 0, 1e-6, 0.9, 0.0, 0)

        def header_alone():
            exchange(own, header, 60.0)
        timed(header_alone, 20, comm)
        results[f"step header alone (allgather {header.pack().nbytes} B)"] = timed(
            header_alone, args.steps, comm)
    if comm.Get_rank() == 0:
        sgd = results["torch SGD(momentum=0.9)"]
        coords = sum(p.numel() for p in model.parameters())
        print(f"{coords} parameters, median of {args.steps} steps, 1 thread per rank")
        for name, t in results.items():
            print(f"  {name:42s} {1e3 * t:7.3f} ms   x{t / sgd:5.2f} of SGD")


if __name__ == "__main__":
    main()
