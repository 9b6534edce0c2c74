"""Pack, tally, unpack and apply on a ResNet-50-sized gradient, beside a plain copy of it.

    python benchmarks/bench_pack.py [--n 25557032] [--ranks 4] [--repeat 7] [--json out.json]
    python benchmarks/bench_pack.py --callgrind      # instructions per coordinate (valgrind)

Prints each operation's best time over ``--repeat`` runs and its ratio to copying the float32
gradient (``torch.Tensor.copy_``, i.e. memcpy bandwidth), for the compiled kernels
(:mod:`mpisign.backends.native`, what Signum and majority_vote run) beside the numpy reference
(:mod:`mpisign.backends.packing`), with issue #12's targets: pack <= 0.6x, apply <= 1.2x, unpack <= 1.0x
a copy. CPU figures, one thread per process as in a multi-rank run unless ``--threads`` says
else.

``--callgrind`` runs the kernels once each on ``--callgrind-n`` coordinates under
``valgrind --tool=callgrind`` and prints the instructions each executes per coordinate: a
figure that does not drift with the machine's load, so a change that slows a kernel shows up
(about two minutes: valgrind runs the torch import too). Tally is the numpy reference's
bitwise loops (``ULONG_bitwise_*``), counted the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from mpisign.backends import native, packing

#: Issue #12's targets, as ratios to a copy.
TARGETS = {"pack": 0.6, "apply": 1.2, "unpack": 1.0}


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
    ap.add_argument("--callgrind", action="store_true",
                    help="instructions per coordinate under valgrind instead of times")
    ap.add_argument("--callgrind-n", type=int, default=1 << 20)
    ap.add_argument("--callgrind-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.callgrind_worker:
        return callgrind_worker(args.callgrind_n, args.ranks)
    if args.callgrind:
        return callgrind(args.callgrind_n, args.ranks)
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
    if native.available():
        print(f"compiled kernels: {native.simd()}")
        rows.update({
            "compiled pack": best_of(lambda: native.pack(g, 0, words), args.repeat),
            "compiled unpack to fp32": best_of(lambda: native.unpack(plus, tie, v), args.repeat),
            "compiled apply (wd=0)": best_of(lambda: native.apply(dst, plus, tie, 1e-4, 0.0),
                                             args.repeat),
            "compiled apply (wd>0)": best_of(lambda: native.apply(dst, plus, tie, 1e-4, 1e-4),
                                             args.repeat),
        })
    base = rows["copy fp32 (yardstick)"]
    print(f"n = {n:,} coordinates ({4 * n / 2**20:.0f} MiB fp32, {words.nbytes / 2**20:.1f} MiB "
          f"packed), {m} votes, {args.threads} thread(s)")
    print(f"{'operation':28s} {'ms':>9s} {'x copy':>8s}")
    for name, t in rows.items():
        target = next((f"target <= {x}" for k, x in TARGETS.items()
                       if name.startswith(f"compiled {k}")), "")
        print(f"{name:28s} {1e3 * t:9.2f} {t / base:8.2f}  {target}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"n": n, "ranks": m, "threads": args.threads,
                       "seconds": rows, "ratio_to_copy": {k: v / base for k, v in rows.items()}},
                      f, indent=2)


#: Functions whose inclusive instruction counts callgrind reports: the compiled kernels' entry
#: points, and numpy's bitwise loops for the reference tally.
CALLGRIND_OPS = {"pack": "py_pack", "apply (wd>0)": "py_apply", "unpack": "py_unpack",
                 "tally+majority (ref.)": "ULONG_bitwise_"}


def callgrind_worker(n: int, m: int) -> None:
    """What runs under valgrind: each kernel once on ``n`` coordinates."""
    g = torch.randn(n)
    words = np.empty(packing.n_words(n), dtype=np.uint64)
    votes = np.stack([packing.pack_signs(torch.randn(n)) for _ in range(m)])
    native.pack(g, 0, words)
    plus, tie = packing.majority(packing.tally(votes), m, n)
    native.apply(g, plus, tie, 1e-4, 1e-4)
    native.unpack(plus, tie, torch.empty(n))


def callgrind(n: int, m: int) -> None:
    if not native.available():
        sys.exit("the compiled kernels are not built: nothing to count")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "callgrind.out")
        cmd = ["valgrind", "--tool=callgrind", "--collect-atstart=no",
               f"--callgrind-out-file={out}"]
        cmd += [f"--toggle-collect={f}*" for f in CALLGRIND_OPS.values()]
        cmd += [sys.executable, __file__, "--callgrind-worker", "--callgrind-n", str(n),
                "--ranks", str(m)]
        subprocess.run(cmd, check=True, capture_output=True)
        report = subprocess.run(["callgrind_annotate", "--inclusive=yes", out], check=True,
                                capture_output=True, text=True).stdout
    print(f"instructions per coordinate, n = {n:,}, {m} votes in the tally, "
          f"kernels: {native.simd()} (valgrind's CPU)")
    for op, fn in CALLGRIND_OPS.items():
        # Top-level entries only: a function's inclusive count already holds its callees'.
        counts = [int(c.replace(",", "")) for c, name in
                  re.findall(r"^\s*([\d,]+) \([^)]*\)\s+\S*?:(\S+)", report, re.M)
                  if name.startswith(fn)]
        total = max(counts) if not fn.startswith("ULONG") else sum(counts)
        print(f"  {op:20s} {total / n:8.3f}")


if __name__ == "__main__":
    main()
