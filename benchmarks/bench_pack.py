"""Pack, tally, unpack and apply on a ResNet-50-sized gradient, beside a plain copy of it.

    python benchmarks/bench_pack.py [--n 25557032] [--ranks 4] [--repeat 7] [--json out.json]

Prints each operation's best time over ``--repeat`` runs and its ratio to copying the float32
gradient (``torch.Tensor.copy_``, i.e. memcpy bandwidth): the yardstick for "pack within 2x of a
copy". CPU figures, one thread per process as in a multi-rank run unless ``--threads`` says else.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from mpisign import packing


def best_of(fn, repeat: int) -> float:
    fn()  # warm up: page in buffers, build caches
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=25_557_032, help="coordinates (ResNet-50: 25.6M)")
    ap.add_argument("--ranks", type=int, default=4, help="packed vectors in the tally")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    n, m = args.n, args.ranks
    g = torch.randn(n)
    dst = torch.empty_like(g)
    words = np.empty(packing.n_words(n), dtype=np.uint64)
    scratch = torch.empty(n, dtype=torch.bool)
    votes = np.stack([packing.pack_signs(torch.randn(n)) for _ in range(m)])
    planes = packing.tally(votes)
    plus, tie = packing.majority(planes, m, n)
    apply_scratch: dict = {}
    v = packing.unpack_signs(plus, n, tie)

    rows = {
        "copy fp32 (yardstick)": best_of(lambda: dst.copy_(g), args.repeat),
        "pack_signs": best_of(lambda: packing.pack_signs(g, 0, out=words, scratch=scratch),
                              args.repeat),
        "pack_signs (zero_bit=1)": best_of(lambda: packing.pack_signs(g, 1, out=words,
                                                                      scratch=scratch),
                                           args.repeat),
        f"tally {m} votes": best_of(lambda: packing.tally(votes), args.repeat),
        "majority": best_of(lambda: packing.majority(planes, m, n), args.repeat),
        "unpack_signs to fp32": best_of(lambda: packing.unpack_signs(plus, n, tie), args.repeat),
        "apply_signs (fused, wd=0)": best_of(
            lambda: packing.apply_signs(dst, plus, tie, 1e-4, 0.0, apply_scratch), args.repeat),
        "apply_signs (fused, wd>0)": best_of(
            lambda: packing.apply_signs(dst, plus, tie, 1e-4, 1e-4, apply_scratch), args.repeat),
        "torch update p -= lr*v (v given)": best_of(lambda: dst.add_(v, alpha=-1e-4), args.repeat),
    }
    base = rows["copy fp32 (yardstick)"]
    print(f"n = {n:,} coordinates ({4 * n / 2**20:.0f} MiB fp32, {words.nbytes / 2**20:.1f} MiB "
          f"packed), {m} votes, {args.threads} thread(s)")
    print(f"{'operation':28s} {'ms':>9s} {'x copy':>8s}")
    for name, t in rows.items():
        print(f"{name:28s} {1e3 * t:9.2f} {t / base:8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"n": n, "ranks": m, "threads": args.threads,
                       "seconds": rows, "ratio_to_copy": {k: v / base for k, v in rows.items()}},
                      f, indent=2)


if __name__ == "__main__":
    main()
