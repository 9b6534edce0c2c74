"""The GPU kernels (mpisign.cuda.kernels) timed beside cupy.packbits and plain torch, on
ResNet-sized vectors. Run on a GPU node with CuPy:

    python benchmarks/bench_gpu_kernels.py

Each figure is the median of 10 runs, timed by CUDA events, after a warm-up (and compile).
Moved here from tests/gpu/test_gpu.py (tests do not time things); the kernels' correctness on
the device is that file's.
"""

from __future__ import annotations

import statistics

import cupy as cp
import torch

from mpisign.cuda import kernels


def time_ms(fn, reps=10):
    fn()  # warm-up (and compile)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()  # SYNC: read the timing
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def torch_pack(x):
    bits = (x > 0).reshape(-1)
    bits = torch.nn.functional.pad(bits, (0, (-bits.numel()) % 64)).view(-1, 8).to(torch.uint8)
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=x.device)
    return (bits * weights).sum(1, dtype=torch.uint8)


def torch_tally(votes_bytes, m):
    shifts = torch.arange(8, dtype=torch.uint8, device=votes_bytes.device)
    count = ((votes_bytes.unsqueeze(-1) >> shifts) & 1).sum(0, dtype=torch.int16)
    return torch_pack((count > m // 2).reshape(-1).float())


def torch_unpack(plus, n):
    shifts = torch.arange(8, dtype=torch.uint8, device=plus.device)
    bits = ((plus.view(torch.uint8).unsqueeze(-1) >> shifts) & 1).reshape(-1)[:n]
    return bits.float() * 2 - 1


def main() -> None:
    nan = float("nan")
    rows = []  # (vector, op, mpisign ms, cupy ms, torch ms)
    for label, n in (("ResNet-18", 11_689_512), ("ResNet-50", 25_557_032)):
        x = torch.randn(n, device="cuda")
        xc = cp.from_dlpack(x)
        rows.append((label, "pack fp32", time_ms(lambda: kernels.pack(x)),
                     time_ms(lambda: cp.packbits(xc > 0, bitorder="little")),
                     time_ms(lambda: torch_pack(x))))
        xh = x.half()
        rows.append((label, "pack fp16", time_ms(lambda: kernels.pack(xh)), nan,
                     time_ms(lambda: torch_pack(xh))))
        m = 8
        votes = torch.stack([kernels.pack(torch.randn(n, device="cuda")) for _ in range(m)])
        plus, _ = kernels.tally(votes, n)
        rows.append((label, f"tally M={m}", time_ms(lambda: kernels.tally(votes, n)), nan,
                     time_ms(lambda: torch_tally(votes.view(torch.uint8), m))))
        rows.append((label, f"disagree M={m}",
                     time_ms(lambda: kernels.disagreement(votes, plus, None, n)), nan, nan))
        p = torch.randn(n, device="cuda")
        rows.append((label, "apply fp32", time_ms(lambda: kernels.apply(p, plus, None, 1e-9)),
                     nan, time_ms(lambda: p.sub_(1e-9 * torch_unpack(plus, n)))))
    print(f"{'vector':10s} {'op':16s} {'mpisign ms':>11s} {'cupy ms':>9s} {'torch ms':>9s}")
    for label, op, ours, cupy_ms, torch_ms in rows:
        print(f"{label:10s} {op:16s} {ours:11.3f} {cupy_ms:9.3f} {torch_ms:9.3f}")


if __name__ == "__main__":
    main()
