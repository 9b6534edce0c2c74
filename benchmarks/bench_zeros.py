"""What the exact-zero rule costs: Signum.step() on several ranks with the rule (coordinates
exactly 0 on every rank found by two ANDs beside the vote, on an odd number of ranks) and
without it (the zero bit alone), side by side in one run, on two models:

* the small CNN of ``mpisign.train`` (random data: no coordinate is 0 on every rank), and
* an embedding with a padding row, 0 on every rank at every step, and rows no rank sees in
  a step, in front of a small MLP.

Per model and rule: the median step time over rounds, the vote's bytes per step
(``stats.bytes_sent``) and the AND's bytes in the last step (two flags a word, plus the masks
of the words that every rank flagged but not all whole), how far the padding row moved at
most, and what a full abstention rule (zeros on some ranks only, not built) would send more.

    python -m mpisign.launch -n 3 -- python benchmarks/bench_zeros.py [--steps 30 --rounds 5]

On an even number of ranks the rule needs no exchange (the zero bits tie): both columns are
the same code.

``--quorum K``: what the monitor's zero mask costs under a quorum. There the move keeps the
zero bit's rule (no AND), but with a ``DisagreementMonitor`` each rank keeps its own zero mask
(written by the fused packing kernel in the same pass) and leaves its own zeros out of its
figure (:meth:`mpisign.optim.quorate.Quorate.judged`). Both columns run
``Signum(quorum=K, monitor=DisagreementMonitor())``; the other has the mask switched off.

    python -m mpisign.launch -n 4 -- python benchmarks/bench_zeros.py --quorum 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from mpi4py import MPI

import mpisign
from mpisign.mpi import exchanges
from mpisign.mpi.exchanges import zero_flags
from mpisign.optim import quorate, ranks
from mpisign.train.models import build_model

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()


class PaddedEmbedding(torch.nn.Module):
    def __init__(self, vocab=20000, width=64):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, width, padding_idx=0)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 256), torch.nn.ReLU(),
                                       torch.nn.Linear(256, 10))

    def forward(self, tokens):
        return self.mlp(self.emb(tokens).mean(1))


def batches(model_name: str, steps: int):
    gen = torch.Generator().manual_seed(100 + rank)
    for _ in range(steps):
        if model_name == "cnn":
            yield torch.randn(32, 1, 28, 28, generator=gen), torch.randint(10, (32,),
                                                                          generator=gen)
        else:
            tokens = torch.randint(1, 2000, (32, 24), generator=gen)
            tokens[:, 16:] = 0   # padding
            yield tokens, torch.randint(10, (32,), generator=gen)


def model_of(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("cnn", 1, 10, 28) if name == "cnn" else PaddedEmbedding()


def full_rule_bytes(opt) -> float:
    """What a rank would send more a step (last step, not timed) under the full abstention
    rule, which is not built: a flag a word (a zero here), and its zero mask for every word
    where it has a zero, except the words whole on every rank (a tie already). The mean over
    the ranks. None without masks (an even number of ranks makes none)."""
    zeros = opt.engine.plan.zeros
    if zeros is None:
        return float("nan")
    whole_everywhere = comm.allreduce((zeros == exchanges.FULL).astype(np.uint8), op=MPI.BAND)
    mine = int(((zeros != 0) & ~whole_everywhere.astype(bool)).sum())
    return (zeros.size + 7) // 8 + 8 * comm.allreduce(mine) / size


def and_bytes(opt) -> float:
    """The bytes one rank sends in the ANDs of the last step (not timed): two flags a word,
    plus the masks of the words that every rank flagged but not every rank has whole; 0
    without a mask."""
    zeros = opt.engine.plan.zeros
    if zeros is None:
        return 0.0
    flags = comm.allreduce(zero_flags(zeros), op=MPI.BAND)
    w = zeros.size
    shared = flags[:w].astype(bool) & ~flags[w:].astype(bool)
    return (2 * w + 7) // 8 + 8 * int(shared.sum())


def run(model_name: str, exact: bool, steps: int, quorum: int | None = None) -> dict:
    policy = ranks.Ensemble if quorum is None else quorate.Quorate
    saved = policy.zero_words
    if not exact:   # the rule before: no mask on several ranks, the zero bit alone
        policy.zero_words = lambda self, backend, words: None
    try:
        model = model_of(model_name)
        watch = {} if quorum is None else dict(quorum=quorum,
                                               monitor=mpisign.DisagreementMonitor())
        opt = mpisign.Signum(model.parameters(), lr=1e-3, comm=comm, **watch)
        pad = model.emb.weight[0].detach().clone() if model_name != "cnn" else None
        times, moved = [], float("nan")
        for x, y in batches(model_name, steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            comm.Barrier()
            t0 = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t0)
            if pad is not None:   # at every step: the zero bit's moves come and go
                now = float((model.emb.weight[0].detach() - pad).abs().max())
                moved = now if moved != moved else max(moved, now)
        if quorum is not None:
            opt.drain()
        return dict(ms=1e3 * statistics.median(times[2:]),
                    vote=opt.stats.bytes_sent / opt.stats.steps,
                    extra=0.0 if quorum else and_bytes(opt),
                    full=float("nan") if quorum else full_rule_bytes(opt), moved=moved)
    finally:
        policy.zero_words = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quorum", type=int, default=None, metavar="K",
                    help="Signum(quorum=K) with a DisagreementMonitor: the monitor's zero "
                         "mask against none")
    args = ap.parse_args()
    names = ({True: "exact zeros", False: "zero bit only"} if args.quorum is None
             else {True: "monitor's mask", False: "no mask"})
    for model_name in ("cnn", "embedding"):
        rows = {True: [], False: []}
        for _ in range(args.rounds):
            for exact in (False, True):   # alternated: drift hits both alike
                rows[exact].append(run(model_name, exact, args.steps, args.quorum))
        if rank == 0:
            base = statistics.median(r["ms"] for r in rows[False])
            for exact in (False, True):
                r = rows[exact]
                ms = statistics.median(x["ms"] for x in r)
                print(f"{model_name:9s} {names[exact]:14s} "
                      f"step {ms:7.2f} ms  x{ms / base:5.2f}   vote {r[0]['vote']:9.0f} B/step"
                      f"   AND {r[0]['extra']:7.0f} B/step   padding row moved "
                      f"{max(x['moved'] for x in r):.4g}"
                      + (f"   (a full abstention rule: +{r[0]['full']:.0f} B/step a rank)"
                         if exact and args.quorum is None else ""), flush=True)
    if rank == 0:
        print(f"({size} ranks, Signum.step() median of {args.rounds} rounds x {args.steps} "
              f"steps, first 2 of each round left out"
              + (f"; quorum {args.quorum} with a monitor" if args.quorum else "") + ")",
              flush=True)


if __name__ == "__main__":
    main()
