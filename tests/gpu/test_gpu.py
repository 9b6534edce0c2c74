"""The GPU kernels on a real device, against the CPU reference. Run on a GPU node:

    pytest tests/gpu

Skipped where there is no CUDA device or no CuPy. Their timings beside cupy.packbits and plain
torch are benchmarks/bench_gpu_kernels.py's.
"""

import os

import numpy as np
import pytest
import torch
from specials import special_floats

from mpisign.backends import packing

try:
    import cupy as cp
except ImportError as exc:  # not installed, or installed without its CUDA libraries
    pytest.skip(f"CuPy is not importable: {exc}", allow_module_level=True)
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

from mpisign.cuda import aware, kernels  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def words_on_gpu(votes: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(votes.view(np.int64)).cuda()


def test_self_check_passes():
    assert kernels.self_check()
    assert kernels.available()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", (1, 4099, 1_000_003))
def test_pack(dtype, n):
    x = special_floats(n, n).to(dtype)
    for zero_bit in (0, 1):
        got = kernels.pack(x.cuda(), zero_bit)
        assert got.dtype == torch.uint64 and got.is_cuda
        assert np.array_equal(got.cpu().numpy(), packing.pack_signs(x, zero_bit))


def test_pack_into_given_buffer_zero_copy():
    x = torch.randn(1000, device="cuda")
    out = torch.full((packing.n_words(1000) + 3,), -1, dtype=torch.int64, device="cuda")
    ptr = out.data_ptr()
    got = kernels.pack(x, 0, out=out)
    assert got.data_ptr() == ptr and out.data_ptr() == ptr
    assert np.array_equal(out[: got.numel()].cpu().numpy().view(np.uint64), packing.pack_signs(x.cpu()))
    assert (out[got.numel():] == -1).all()


def test_kernels_follow_the_current_stream():
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        x = torch.randn(2_000_000, device="cuda") * 3 - 1  # produced on the side stream
        words = kernels.pack(x, 1)
    side.synchronize()
    assert np.array_equal(words.cpu().numpy(), packing.pack_signs(x.cpu(), 1))


@pytest.mark.parametrize("m", list(range(1, 10)) + [64, 1024])
def test_tally_and_disagreement(m):
    n = 10_007 if m > 64 else 300_001
    votes = np.stack([packing.pack_signs(special_floats(n, 1000 * m + r), r % 2) for r in range(m)])
    plus, tie = kernels.tally(words_on_gpu(votes), n)
    want_plus, want_tie = packing.majority(packing.tally(votes), m, n)
    assert np.array_equal(plus.cpu().numpy(), want_plus)
    assert (tie is None) == (want_tie is None)
    if tie is not None:
        assert np.array_equal(tie.cpu().numpy(), want_tie)
    counts = kernels.disagreement(words_on_gpu(votes), plus, tie, n).cpu().tolist()
    assert counts == [packing.disagreement(v, want_plus, want_tie) for v in votes]


@pytest.mark.parametrize("dtype", DTYPES)
def test_apply(dtype):
    n, m = 1_000_003, 4
    votes = np.stack([packing.pack_signs(special_floats(n, 7 + r), r % 2) for r in range(m)])
    plus, tie = packing.majority(packing.tally(votes), m, n)
    p = special_floats(n, 99).to(dtype)
    v = packing.unpack_signs(plus, n).numpy()
    v[packing.unpack_signs(tie, n).numpy() > 0] = 0.0  # +0.0 at a tie, as the kernel has it
    x = p.float().numpy()
    with np.errstate(all="ignore"):
        want = torch.from_numpy(x - np.float32(0.01) * (v + np.float32(0.1) * x)).to(dtype)
    packing.canonicalize_nan_(want)   # the one NaN rule: every NaN written is the canonical one
    got = kernels.apply(p.cuda(), words_on_gpu(plus), words_on_gpu(tie), 0.01, 0.1).cpu()
    ints = {4: torch.int32, 2: torch.int16}[p.element_size()]
    same = got.view(ints) == want.view(ints)
    assert bool(same.all()), int((~same).sum())


def test_the_real_paths_self_check():
    """Grid-stride loops at the real block cap, offsets, a side stream, wd = 0 and > 0, unpack."""
    assert kernels.compare_real_paths() == []


def test_device_words_cross_mpi_and_come_back_intact():
    """The start-up proof of the resident path, on one rank (a send to itself) where this MPI is
    CUDA-aware; the ranks' agreement is test_gpu_path_over_real_ranks's."""
    from mpi4py import MPI

    from mpisign.cuda import startup
    from mpisign.cuda.bridge import ResidentSigns
    is_aware, why = aware.detect_cuda_aware(MPI)
    if not is_aware:
        pytest.skip(f"this MPI is not known to be CUDA-aware: {why}")
    assert startup.ring_transfer(MPI.COMM_SELF, ResidentSigns("cuda:0").words, timeout=30)


def test_pinned_staging_round_trip():
    st = aware.Staging(pin_memory=True)
    words = kernels.pack(torch.randn(100_000, device="cuda"))
    host = st.to_host(words)
    assert np.array_equal(host, words.cpu().numpy())
    back = torch.empty_like(words)
    st.to_device("send", back)
    st.host("send", words.numel())  # waits for the copy before the CPU may touch the buffer
    assert torch.equal(back.view(torch.int64), words.view(torch.int64))
    assert st.allocations == 1 and st.bytes_to_host == st.bytes_to_device == words.numel() * 8


# ---- other libraries' packing, as references ------------------------------------------------

def _torch_pack(x):
    bits = (x > 0).reshape(-1)
    bits = torch.nn.functional.pad(bits, (0, (-bits.numel()) % 64)).view(-1, 8).to(torch.uint8)
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=x.device)
    return (bits * weights).sum(1, dtype=torch.uint8)


@pytest.mark.parametrize("aware_setting", ["1", "0"])
def test_signum_on_the_gpu_matches_the_cpu_bit_for_bit(monkeypatch, aware_setting):
    """Both GPU paths (device-resident words as for a CUDA-aware MPI, and staged words) give the
    CPU path's parameters, bit for bit, on one rank; and majority_vote of a CUDA tensor too."""
    import mpisign
    from mpisign.cuda import bridge
    monkeypatch.setenv(aware.OVERRIDE_ENV, aware_setting)
    monkeypatch.setattr(bridge, "_paths", {})

    def train(device):
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(shape, generator=gen).to(dtype).to(device).requires_grad_()
                  for shape, dtype in (((300, 200), torch.float32), ((200,), torch.bfloat16),
                                       ((4099,), torch.float16))]
        # momentum 0 and the same gradients on both: the signs are the gradients' own, so any
        # difference comes from the update, whose rounding the CPU path shares with the kernel.
        opt = mpisign.SignSGD(params, lr=1e-3, weight_decay=1e-2)
        for _ in range(5):
            for p in params:
                g = special_floats(p.numel(), int(torch.randint(1 << 30, (1,), generator=gen)))
                p.grad = g.reshape(p.shape).to(p.dtype).to(device)
            opt.step()
        return [p.detach().cpu() for p in params], opt

    on_cpu, _ = train("cpu")
    on_gpu, opt = train("cuda")
    assert isinstance(opt.engine.plan.layout.packed, torch.Tensor) == (aware_setting == "1")
    for a, b in zip(on_cpu, on_gpu):
        assert torch.equal(a.view(torch.int16 if a.element_size() == 2 else torch.int32),
                           b.view(torch.int16 if b.element_size() == 2 else torch.int32))
    x = special_floats(10_001, 3).cuda()
    # One rank holds no vote: majority_vote is the sign (0 for 0 and NaN), on the device.
    # The packed GPU path of majority_vote is test_gpu_path_over_real_ranks's.
    want = torch.nan_to_num(x.cpu(), nan=0.0).sign()
    got = mpisign.majority_vote(x, step=0)
    assert got.is_cuda and torch.equal(got.cpu(), want)


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("aware_setting", ["0", "1"])
def test_gpu_path_over_real_ranks(n, aware_setting):
    """tests/mpi/gpu_check.py on n ranks (sharing the node's GPUs): every topology, staged
    words and, where this MPI is CUDA-aware, device-resident words moved by MPI itself."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import mpirun
    from mpi4py import MPI
    env = {k: v for k, v in os.environ.items() if k != aware.OVERRIDE_ENV}
    is_aware, why = aware.detect_cuda_aware(MPI, env)
    if aware_setting == "1" and not is_aware:
        pytest.skip(f"this MPI is not known to be CUDA-aware: {why}")
    out = mpirun.run(n, "gpu_check.py", timeout=600, env={aware.OVERRIDE_ENV: aware_setting})
    assert f"gpu_check OK on {n} ranks (resident words: {aware_setting == '1'})" in out


def test_pack_matches_torch_and_cupy_on_resnet_sized_vectors():
    for n in (11_689_512, 25_557_032):   # ResNet-18's and ResNet-50's parameters
        x = torch.randn(n, device="cuda")
        ours = kernels.pack(x)
        assert torch.equal(_torch_pack(x), ours.view(torch.uint8))  # both padded to 64 bits
        cupy_bytes = cp.asnumpy(cp.packbits(cp.from_dlpack(x) > 0, bitorder="little"))
        assert np.array_equal(cupy_bytes, ours.cpu().numpy().view(np.uint8)[: cupy_bytes.size])
