"""The CUDA kernels' logic, run on the CPU through the host shim (mpisign.cuda.emulate).

Every result is compared with mpisign.backends.packing and with a plain numpy reference on unpacked signs
(counted coordinate by coordinate), on random inputs with ragged lengths, zeros, NaN and inf;
floats bit for bit, NaN included (apply writes one canonical NaN: test_apply_nan_rule).
Lion's kernels are compared with their formulas in float32, each op rounded once (the FMA form
through an exact float64 emulation), and, through mpisign.cuda.torch_check and the GPU
backends, with torch's own ops (here torch's CPU ones; tests/gpu has the device's).
"""

import logging
import subprocess

import numpy as np
import pytest
import torch

from mpisign.backends import native, packing, signs
from mpisign.cuda import bridge, emulate, kernels, torch_check

pytestmark = pytest.mark.skipif(emulate.compiler() is None, reason="no C++ compiler (g++)")

LENGTHS = (0, 1, 31, 32, 33, 63, 64, 65, 1000, 4099)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LAUNCHES = ((32, 1), (64, None), (128, 2), (256, 7))  # (threads, blocks): grid-stride or not


# ---- numpy reference on unpacked signs --------------------------------------------------------

def pack_bits(bits: np.ndarray) -> np.ndarray:
    """uint64 words with bit i % 64 of word i // 64 set where bits[i]: one coordinate at a time."""
    words = np.zeros(packing.n_words(bits.size), dtype=np.uint64)
    idx = np.flatnonzero(bits)
    np.bitwise_or.at(words, idx // 64, np.left_shift(np.uint64(1), (idx % 64).astype(np.uint64)))
    return words


def unpack_bits(words: np.ndarray, n: int) -> np.ndarray:
    i = np.arange(n)
    return ((words[i // 64] >> (i % 64).astype(np.uint64)) & np.uint64(1)).astype(np.int64)


def sign_bits(x: torch.Tensor, zero_bit: int) -> np.ndarray:
    v = x.double().numpy()
    return np.where(v > 0, 1, np.where(v < 0, 0, zero_bit))


def special_floats(n: int, rng: np.random.Generator) -> torch.Tensor:
    x = rng.standard_normal(n).astype(np.float32)
    specials = np.array([0.0, -0.0, np.nan, -np.nan, np.inf, -np.inf, 1e-40, -1e-40, 1e-6, -1e-6],
                        dtype=np.float32)
    hit = rng.random(n) < 0.3
    x[hit] = rng.choice(specials, hit.sum())
    return torch.from_numpy(x)


def votes_for(m: int, n: int, rng) -> np.ndarray:
    """M packed vectors: random signs, with a block of coordinates that are 0 on every worker."""
    rows = []
    for r in range(m):
        x = special_floats(n, rng)
        x[: n // 5] = 0.0
        rows.append(pack_bits(sign_bits(x, r % 2)))
    return np.stack(rows)


def majority_reference(votes: np.ndarray, n: int):
    m = votes.shape[0]
    count = sum(unpack_bits(v, n) for v in votes)
    plus = pack_bits(count >= m // 2 + 1)
    tie = pack_bits(2 * count == m) if m % 2 == 0 else None
    return plus, tie


# ---- pack -------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_pack_matches_reference(n, dtype):
    rng = np.random.default_rng(n)
    x = special_floats(n, rng).to(dtype)
    for zero_bit in (0, 1):
        want = pack_bits(sign_bits(x, zero_bit))
        assert np.array_equal(packing.pack_signs(x, zero_bit), want)
        for threads, blocks in LAUNCHES:
            got = emulate.pack(x, zero_bit, threads=threads, blocks=blocks)
            assert got.dtype == np.uint64 and got.shape == want.shape
            assert np.array_equal(got, want), (dtype, n, zero_bit, threads, blocks)


def test_pack_numpy_input_and_edge_values():
    x = np.array([np.nan, -np.nan, 0.0, -0.0, np.inf, -np.inf, np.finfo(np.float32).tiny / 4,
                  -np.finfo(np.float32).tiny / 4, 1.0, -1.0] * 7, dtype=np.float32)
    for arr in (x, x.astype(np.float16)):
        for zero_bit in (0, 1):
            want = pack_bits(sign_bits(torch.from_numpy(arr), zero_bit))
            assert np.array_equal(emulate.pack(arr, zero_bit), want)


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError):
        emulate.pack(np.zeros(3, dtype=np.float64))
    with pytest.raises(ValueError):
        emulate.pack(np.zeros(3, dtype=np.float32), zero_bit=2)
    with pytest.raises(ValueError):
        emulate.pack(np.zeros(3, dtype=np.float32), threads=48)


# ---- tally and disagreement ------------------------------------------------------------------

@pytest.mark.parametrize("m", range(1, 10))
def test_tally_and_disagreement_every_m(m):
    rng = np.random.default_rng(100 + m)
    for n in LENGTHS:
        votes = votes_for(m, n, rng).reshape(m, packing.n_words(n))
        want_plus, want_tie = majority_reference(votes, n)
        ref_plus, ref_tie = packing.majority(packing.tally(votes), m, n)
        assert np.array_equal(ref_plus, want_plus)
        threads, blocks = LAUNCHES[(m + n) % len(LAUNCHES)]
        plus, tie = emulate.tally(votes, n, threads=threads, blocks=blocks)
        assert np.array_equal(plus, want_plus), (m, n)
        assert (tie is None) == (m % 2 == 1)
        if tie is not None:
            assert np.array_equal(tie, want_tie) and np.array_equal(ref_tie, want_tie), (m, n)
        # Disagreement: coordinates where a worker's bit differs from the vote, ties excluded.
        p_bits, t_bits = unpack_bits(want_plus, n), unpack_bits(want_tie, n) if tie is not None else 0
        want_counts = [int(((unpack_bits(v, n) != p_bits) & (t_bits == 0)).sum()) for v in votes]
        got = emulate.disagreement(votes, plus, tie, n, threads=threads, blocks=blocks, rows=1 + m % 3)
        assert list(got) == want_counts, (m, n)
        assert want_counts == [packing.disagreement(v, plus, tie) for v in votes]


@pytest.mark.parametrize("m", (1023, 1024))
def test_tally_many_workers(m):
    rng = np.random.default_rng(m)
    n = 130
    # Biased coins, so that counts near m/2 (ties for even m) actually occur.
    bits = rng.random((m, n)) < rng.uniform(0.45, 0.55, n)
    bits[:, :3] = [True, False, True]  # all +, all -, all +: counts m, 0, m
    bits[:, 3] = np.arange(m) < m // 2  # exactly m // 2 votes for "+"
    votes = np.stack([pack_bits(b) for b in bits])
    want_plus, want_tie = majority_reference(votes, n)
    plus, tie = emulate.tally(votes, n, threads=32, blocks=1)
    assert np.array_equal(plus, want_plus)
    if m % 2 == 0:
        assert np.array_equal(tie, want_tie) and unpack_bits(tie, n)[3] == 1
    counts = emulate.disagreement(votes, plus, tie, n)
    assert list(counts) == [packing.disagreement(v, plus, tie) for v in votes]


def test_tally_masks_garbage_past_n():
    rng = np.random.default_rng(7)
    m, n = 4, 70
    votes = rng.integers(0, 2**64, size=(m, 2), dtype=np.uint64)  # random bits past n too
    plus, tie = emulate.tally(votes, n)
    clean = votes.copy()
    clean[:, -1] &= np.uint64((1 << (n % 64)) - 1)
    want_plus, want_tie = majority_reference(clean, n)
    assert np.array_equal(plus, want_plus) and np.array_equal(tie, want_tie)
    assert list(emulate.disagreement(votes, plus, tie, n)) == list(emulate.disagreement(clean, plus, tie, n))


def test_tally_rejects_bad_input():
    with pytest.raises(ValueError):
        emulate.tally(np.zeros((0, 1), np.uint64), 10)
    with pytest.raises(ValueError):
        emulate.tally(np.zeros((2, 1), np.uint64), 65)  # 65 bits need 2 words
    with pytest.raises(ValueError):
        emulate.tally(np.zeros((65536, 1), np.uint64), 10)  # more workers than counter planes
    with pytest.raises(ValueError):
        emulate.tally(np.zeros((2, 1), np.float64), 10)


# ---- apply ------------------------------------------------------------------------------------

#: The one NaN apply writes, as the bits of each dtype: sign 0, exponent and mantissa all ones.
CANONICAL_NAN = {torch.float32: 0x7FFF_FFFF, torch.float64: 0x7FFF_FFFF_FFFF_FFFF,
                 torch.float16: 0x7FFF, torch.bfloat16: 0x7FFF}
INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def int_bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(INT[t.element_size()])


def apply_reference(p: torch.Tensor, plus, tie, lr, wd) -> torch.Tensor:
    n = p.numel()
    v = unpack_bits(plus, n).astype(np.float32) * 2 - 1
    if tie is not None:
        v[unpack_bits(tie, n) == 1] = 0
    x = p.float().numpy()
    with np.errstate(all="ignore"):
        new = x - np.float32(lr) * (v.astype(np.float32) + np.float32(wd) * x if wd else v)
    out = torch.from_numpy(new).to(p.dtype)
    int_bits(out)[torch.from_numpy(np.isnan(new))] = CANONICAL_NAN[p.dtype]
    return out


def same_floats(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit, NaN and -0 included."""
    return a.dtype == b.dtype and torch.equal(int_bits(a), int_bits(b))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", (3, 4))
def test_apply_matches_reference(dtype, m):
    rng = np.random.default_rng(m)
    for n in LENGTHS:
        votes = votes_for(m, n, rng).reshape(m, packing.n_words(n))
        plus, tie = emulate.tally(votes, n)
        for lr, wd in ((0.01, 0.0), (0.1, 0.01), (3.0, 0.5)):
            p0 = special_floats(n, rng).to(dtype)
            want = apply_reference(p0, plus, tie, lr, wd)
            # p sits inside a larger buffer: the elements around it must not change.
            buf = special_floats(n + 8, rng).to(dtype)
            buf[4: 4 + n] = p0
            before = buf.clone()
            threads, blocks = LAUNCHES[n % len(LAUNCHES)]
            emulate.apply(buf[4: 4 + n], plus, tie, lr, wd, threads=threads, blocks=blocks)
            assert same_floats(buf[4: 4 + n], want), (dtype, n, lr, wd)
            assert same_floats(buf[:4], before[:4]) and same_floats(buf[4 + n:], before[4 + n:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", (3, 4))
def test_cpu_apply_rounds_like_the_kernel(dtype, m):
    """packing.apply_signs (the CPU path) gives the apply kernel's bits, zeros, -0, NaN, inf,
    subnormals and ties included: ranks on CPUs and on GPUs stay bit-identical."""
    rng = np.random.default_rng(10 + m)
    for n in (1, 65, 1000, packing.APPLY_CHUNK + 77):
        votes = votes_for(m, n, rng).reshape(m, packing.n_words(n))
        plus, tie = emulate.tally(votes, n)
        for lr, wd in ((0.01, 0.0), (0.1, 0.01), (3.0, 0.5), (1e-3, 1e-4)):
            p0 = special_floats(n, rng).to(dtype)
            on_cpu, in_kernel = p0.clone(), p0.clone()
            packing.apply_signs(on_cpu, plus, tie, lr, wd)
            emulate.apply(in_kernel, plus, tie, lr, wd, threads=256, blocks=8)
            assert same_floats(on_cpu, in_kernel), (dtype, m, n, lr, wd)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_apply_every_half_precision_value(dtype):
    """All 65536 bit patterns: the kernel's own fp16/bf16 <-> fp32 conversions against torch's."""
    p0 = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    n = p0.numel()
    rng = np.random.default_rng(1)
    plus = pack_bits(rng.random(n) < 0.5)
    tie = pack_bits(rng.random(n) < 0.2)
    for lr, wd in ((0.0, 0.0), (1e-3, 0.1), (0.7, 0.0), (300.0, 2.0)):
        p = p0.clone()
        emulate.apply(p, plus, tie, lr, wd, threads=256, blocks=16)
        assert same_floats(p, apply_reference(p0, plus, tie, lr, wd)), (lr, wd)


#: NaN inputs of each dtype, as unsigned bits: quiet and signalling, both signs, small and large
#: payloads, numpy's NaN (0x7fc00000 in float32) and x86's default NaN (0xffc00000).
NAN_INPUTS = {
    torch.float32: [0x7FC0_0000, 0xFFC0_0000, 0x7FFF_FFFF, 0xFFFF_FFFF, 0x7FC1_2345,
                    0xFFF0_0001, 0x7F80_0001, 0xFF80_0001, 0x7FBF_FFFF, 0x7FA0_0000],
    torch.float64: [0x7FF8 << 48, 0xFFF8 << 48, 2**63 - 1, 2**64 - 1, (0x7FF8 << 48) | 0x12345,
                    (0xFFF0 << 48) | 1, (0x7FF0 << 48) | 1, (0x7FF0 << 48) | (2**51 - 1),
                    0x7FF4 << 48, (0xFFF4 << 48) | 77],
    torch.float16: [0x7E00, 0xFE00, 0x7FFF, 0xFFFF, 0x7E55, 0xFE01, 0x7C01, 0xFC01, 0x7DFF,
                    0x7D00],
    torch.bfloat16: [0x7FC0, 0xFFC0, 0x7FFF, 0xFFFF, 0x7FC5, 0xFFD1, 0x7F81, 0xFF81, 0x7FBF,
                     0x7FA0],
}


def nan_inputs(dtype, n: int) -> torch.Tensor:
    """``n`` parameters: :data:`NAN_INPUTS`, +-inf and a few finite values, repeated."""
    size = torch.empty(0, dtype=dtype).element_size()
    unsigned = {2: np.uint16, 4: np.uint32, 8: np.uint64}[size]
    nans = torch.from_numpy(np.array(NAN_INPUTS[dtype], dtype=unsigned).view(f"i{size}"))
    others = torch.tensor([float("inf"), -float("inf"), 1.5, -2.0, 0.0, -0.0], dtype=dtype)
    pattern = torch.cat([nans.view(dtype), others])
    return pattern.repeat(-(-n // pattern.numel()))[:n].clone()


@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,))
def test_apply_nan_rule(dtype):
    """The rule: every NaN that apply writes is the canonical NaN (0x7fffffff, 0x7ff...f, 0x7fff),
    whatever NaN came in (sign, payload, quiet or signalling) or arose (inf - inf under weight
    decay, 0 * inf at lr = 0): on the emulated GPU kernel, the CPU reference (contiguous or not),
    the compiled CPU kernel (this CPU's body; test_native runs the portable one) and the backend
    Signum calls, all bit for bit the same. float64 has no GPU kernel: CPU paths only."""
    n = 3 * 64 + 5   # whole words for the SIMD bodies, a ragged tail for the scalar one
    p0 = nan_inputs(dtype, n)
    rng = np.random.default_rng(17)
    plus, tie = pack_bits(rng.random(n) < 0.5), pack_bits(rng.random(n) < 0.25)
    canonical = torch.tensor(CANONICAL_NAN[dtype], dtype=INT[p0.element_size()])
    for lr, wd in ((0.01, 0.0), (0.01, 0.5), (0.0, 0.5), (3.0, 1e-3)):
        want_nan = torch.isnan(p0) | (torch.isinf(p0) & (wd != 0))
        got = {}
        got["cpu reference"] = p0.clone()
        packing.apply_signs(got["cpu reference"], plus, tie, lr, wd)
        strided = torch.empty(n, 2, dtype=dtype)[:, 0]   # not contiguous: through a copy
        strided.copy_(p0)
        signs.HostSigns().apply(strided, plus, tie, lr, wd)
        got["host backend, strided"] = strided
        got["backend"] = p0.clone()
        signs.signs_for([got["backend"]]).apply(got["backend"], plus, tie, lr, wd)
        if dtype in native.APPLY_DTYPES and native.why_not() is None:
            got["compiled"] = p0.clone()
            native.apply(got["compiled"], plus, tie, lr, wd)
        if dtype in DTYPES:
            got["emulated GPU"] = p0.clone()
            emulate.apply(got["emulated GPU"], plus, tie, lr, wd, threads=64, blocks=2)
        for path, p in got.items():
            assert torch.equal(torch.isnan(p), want_nan), (path, lr, wd)
            assert (int_bits(p)[want_nan] == canonical).all(), (path, lr, wd)
            assert same_floats(p, got["cpu reference"]), (path, lr, wd)


def test_apply_numpy_in_place_and_rejects_copies():
    p = np.linspace(-1, 1, 100, dtype=np.float32)
    plus = pack_bits(np.arange(100) % 2 == 0)
    want = apply_reference(torch.from_numpy(p.copy()), plus, None, 0.5, 0.0)
    emulate.apply(p, plus, None, 0.5)
    assert same_floats(torch.from_numpy(p), want)
    with pytest.raises(ValueError):
        emulate.apply(np.zeros((10, 10), np.float32)[:, 0], plus, None, 0.1)  # not contiguous
    with pytest.raises(ValueError):
        emulate.apply(np.zeros(100, np.float64), plus, None, 0.1)
    with pytest.raises(ValueError):
        emulate.apply(np.zeros(200, np.float32), plus, None, 0.1)  # 200 coordinates need 4 words


# ---- the shim itself: warp primitives and a divergent ballot ---------------------------------

PROBE = r"""
#include "host_shim.h"
__global__ void probe(unsigned* out, int skip_lane) {
    const unsigned lane = threadIdx.x & 31u, t = blockIdx.x * blockDim.x + threadIdx.x;
    unsigned b = 0;
    if ((int)lane != skip_lane) b = __ballot_sync(0xffffffffu, (t % 3u) == 0u);
    unsigned long long d = __shfl_down_sync(0xffffffffu, 10ull * t, 5);
    unsigned x = __shfl_xor_sync(0xffffffffu, t, 3);
    out[3 * t] = b; out[3 * t + 1] = (unsigned)d; out[3 * t + 2] = x;
}
extern "C" int run_probe(unsigned g, unsigned b, unsigned* out, int skip) {
    return shim::launch(dim3{g, 1, 1}, dim3{b, 1, 1}, [=] { probe(out, skip); });
}
extern "C" const char* last_error() { return shim::last_error; }
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    import ctypes
    d = tmp_path_factory.mktemp("probe")
    (d / "probe.cpp").write_text(PROBE)
    subprocess.run([emulate.compiler(), *emulate.FLAGS, "-I", str(emulate.HERE), str(d / "probe.cpp"),
                    "-o", str(d / "probe.so")], check=True)
    lib = ctypes.CDLL(str(d / "probe.so"))
    lib.run_probe.argtypes = [ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_int]
    lib.last_error.restype = ctypes.c_char_p
    return lib


def test_shim_warp_primitives(probe):
    grid, block = 2, 64
    total = grid * block
    out = np.zeros(3 * total, dtype=np.uint32)
    assert probe.run_probe(grid, block, out.ctypes.data, -1) == 0
    out = out.reshape(total, 3)
    for t in range(total):
        warp0 = t - t % 32
        ballot = sum(1 << (u - warp0) for u in range(warp0, warp0 + 32) if u % 3 == 0)
        down = 10 * (t + 5) if t % 32 + 5 < 32 else 10 * t  # past the warp: own value
        assert list(out[t]) == [ballot, down, warp0 + ((t % 32) ^ 3)], t


def test_shim_reports_a_skipped_ballot(probe):
    out = np.zeros(3 * 32, dtype=np.uint32)
    assert probe.run_probe(1, 32, out.ctypes.data, 7) == -1
    assert b"deadlock" in probe.last_error()


# ---- the start-up self-check, run on the emulated kernels ------------------------------------

def test_self_check_passes_on_emulated_kernels():
    assert kernels.compare_with_reference(emulate, "cpu") == []
    assert kernels.self_check("cpu", backend=emulate)


class _FlipOneBit:
    """The emulated kernels with one wrong tally bit, for even M only."""
    pack = staticmethod(emulate.pack)
    apply = staticmethod(emulate.apply)
    disagreement = staticmethod(emulate.disagreement)

    @staticmethod
    def tally(votes, n):
        plus, tie = emulate.tally(votes, n)
        if tie is not None and n > 40:
            plus = plus.copy()
            plus[0] ^= np.uint64(1 << 40)
        return plus, tie


def test_self_check_fails_loudly_on_a_wrong_bit(caplog):
    with caplog.at_level(logging.ERROR, logger="mpisign.cuda.kernels"):
        assert not kernels.self_check("cpu", backend=_FlipOneBit)
    assert any(r.levelno == logging.ERROR and "tally m=2" in r.getMessage() for r in caplog.records)


# ---- kernels.py's glue, with a stand-in for CuPy that launches the emulated kernels -----------

def test_self_check_covers_what_training_runs(monkeypatch):
    """The start-up check through mpisign.cuda.kernels itself (launches run by the host shim):
    every kernel on a 3-block grid (grid-stride loops), a pack and an apply one grid past the
    block cap, words and parameters at offsets of larger buffers, wd = 0 and > 0, the unpack;
    and it catches a kernel that ignores a slice's offset."""
    monkeypatch.setattr(kernels, "_MAX_BLOCKS", 5)   # the full-grid case at a size the shim runs
    with emulate.kernels_on_cpu():
        assert kernels.compare_real_paths("cpu") == []
        assert kernels.self_check("cpu", backend=kernels)
        honest = kernels._view

        def offset_lost(cp, t, dtype):   # a DLPack exchange that drops the storage offset
            base = t.view(-1)
            if t.storage_offset():
                base = torch.as_strided(t, t.shape, t.stride(), 0)
            return honest(cp, base, dtype)

        monkeypatch.setattr(kernels, "_view", offset_lost)
        bad = kernels.compare_real_paths("cpu")
    assert any("offset" in b for b in bad), bad


def test_kernels_glue_on_emulated_kernels():
    with emulate.kernels_on_cpu():
        assert kernels.compare_with_reference(kernels, "cpu") == []
        with pytest.raises(ValueError):
            kernels.pack(torch.zeros(4, 4)[:, 0])  # not contiguous
        with pytest.raises(ValueError):
            kernels.tally(torch.zeros((3, 1), dtype=torch.int32), 10)  # not 64-bit words


# ---- Lion: lion_update_pack and apply_decayed --------------------------------------------------

F32 = np.float32
LION_HPARAMS = ((0.9, 0.1, 0.99, 0.01), (0.9, 0.1 / 2.7, 0.99, 0.01 / 2.7),   # GradScaler 1/2.7
                (0.5, 0.75, 0.0, 1.0))


def f32(x: float) -> torch.Tensor:
    """A float32 scalar tensor: torch ops with it round in float32, as the kernels' arguments."""
    return torch.tensor(x, dtype=torch.float32)


def fma_f32(a: float, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """fmaf(a, x, y) element by element, rounded once, computed another way than the kernel's
    (the C library's fmaf): a * x is exact in float64 (24 + 24 bits); the sum is rounded to odd
    in float64 (TwoSum gives its error; an inexact sum with an even last bit moves one ulp
    toward the exact value), which then rounds to nearest float32 as the exact value would
    (53 >= 24 + 2 bits; Boldo & Melquiond 2008). Plain float64 would round twice."""
    prod, y = x.double() * float(F32(a)), y.double()
    s = prod + y
    b = s - y
    err = (prod - b) + (y - (s - b))
    odd = (s.view(torch.int64) & 1) == 1
    toward = torch.where(err > 0, torch.tensor(float("inf")), torch.tensor(-float("inf")))
    return torch.where((err != 0) & ~odd, torch.nextafter(s, toward), s).float()


def lion_reference(g: torch.Tensor, m: torch.Tensor, hp: tuple, fused: bool):
    """(c, new m, non-finite count) of Lion's step in float32, each op rounded once: the adds
    as one FMA (:func:`fma_f32`) or as a product and a sum (torch's float32 ops)."""
    b1, a1, b2, a2 = hp
    finite = torch.isfinite(g)
    g = torch.where(finite, g, torch.zeros(()))
    mb1, mb2 = m * f32(b1), m * f32(b2)
    if fused:
        c, m_new = fma_f32(a1, g, mb1), fma_f32(a2, g, mb2)
    else:
        c, m_new = mb1 + g * f32(a1), mb2 + g * f32(a2)
    return c, m_new, int((~finite).sum())


def lion_inputs(n: int, rng) -> tuple[torch.Tensor, torch.Tensor]:
    """A gradient with NaN, inf, zeros, subnormals; a momentum with subnormals and zeros where
    the gradient is 0 or not finite (c is an exact 0 there: zero_bit)."""
    g = special_floats(n, rng)
    m = torch.from_numpy(rng.standard_normal(n).astype(F32))
    m[::7] *= 1e-39
    m[~torch.isfinite(g) | (g == 0)] = 0.0
    return g, m


def test_fma_reference_rounds_once():
    """The case where float64 rounds twice: 1 + 2^-24 + 2^-60 is just past the float32
    midpoint 1 + 2^-24, which float64 rounds onto (and then to even, 1.0)."""
    a = 2.0 ** -24 * (1 + 2.0 ** -12)
    x = torch.tensor([1 - 2.0 ** -12 + 2.0 ** -24], dtype=torch.float32)
    assert float(x.double() * a + 1.0) == 1 + 2.0 ** -24   # float64: on the midpoint
    assert float(fma_f32(a, x, torch.ones(1))) == 1 + 2.0 ** -23
    assert float(torch.ones(1) + x * f32(a)) == 1.0         # two roundings


@pytest.mark.parametrize("fused", (True, False), ids=("fused", "separate"))
@pytest.mark.parametrize("n", (1, 31, 33, 65, 127, 1000, 4099))
def test_lion_update_pack_matches_the_reference(n, fused):
    rng = np.random.default_rng(n)
    for k, hp in enumerate(LION_HPARAMS):
        g, m0 = lion_inputs(n, rng)
        c, want_m, want_bad = lion_reference(g, m0, hp, fused)
        for zero_bit in (0, 1):
            m = m0.clone()
            threads, blocks = LAUNCHES[(n + k + zero_bit) % len(LAUNCHES)]
            words, bad = emulate.lion_update_pack(g, m, *hp, zero_bit, fused, threads=threads,
                                                  blocks=blocks)
            assert np.array_equal(words, pack_bits(sign_bits(c, zero_bit))), (n, hp, zero_bit)
            assert same_floats(m, want_m) and bad == want_bad, (n, hp, zero_bit)


def test_lion_forms_differ_where_the_rounding_does():
    """Inputs where one FMA and two roundings part: the momentum (1 + 2^-23 or 1) and the sign
    (c = 2^-60 > 0, or an exact 0 sent as zero_bit)."""
    a = 2.0 ** -24 * (1 + 2.0 ** -12)
    hp = (0.5, a, 0.5, a)
    g = torch.tensor([1 - 2.0 ** -12 + 2.0 ** -24] * 2, dtype=torch.float32)
    m0 = torch.tensor([2.0, -2.0 ** -23], dtype=torch.float32)
    for fused, want_m, want_c in ((True, [1 + 2.0 ** -23, 2.0 ** -60], [1 + 2.0 ** -23, 2.0 ** -60]),
                                  (False, [1.0, 0.0], [1.0, 0.0])):
        c, ref_m, _ = lion_reference(g, m0, hp, fused)
        assert c.tolist() == want_c and ref_m.tolist() == want_m
        m = m0.clone()
        words, bad = emulate.lion_update_pack(g, m, *hp, 0, fused)
        assert m.tolist() == want_m and bad == 0
        assert unpack_bits(words, 2).tolist() == [1, int(fused)]


def test_lion_update_pack_rejects_bad_input():
    g, m = torch.zeros(10), torch.zeros(10)
    for bad in ((g.half(), m), (g, m.double()), (g, torch.zeros(11)), (g, torch.zeros(20)[::2])):
        with pytest.raises(ValueError):
            emulate.lion_update_pack(*bad, 0.9, 0.1, 0.99, 0.01, 0, True)
    with pytest.raises(ValueError):
        emulate.lion_update_pack(g, m, 0.9, 0.1, 0.99, 0.01, 2, True)


def apply_decayed_reference(p: torch.Tensor, plus, tie, lr: float, decay: float) -> torch.Tensor:
    """``p * decay - lr * v`` as torch's CUDA ops round it: each op in float32 (decay, -lr
    rounded to float32), the product stored in p's dtype before the add; canonical NaN."""
    v = packing.unpack_signs(plus, p.numel(), tie)   # +0.0 at a tie
    x = (p.float() * f32(decay)).to(p.dtype).float()
    out = (x + f32(-lr) * v).to(p.dtype)
    int_bits(out)[torch.isnan(out)] = CANONICAL_NAN[p.dtype]
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", (3, 4))
def test_apply_decayed_matches_the_reference(dtype, m):
    rng = np.random.default_rng(20 + m)
    for n in LENGTHS:
        votes = votes_for(m, n, rng).reshape(m, packing.n_words(n))
        plus, tie = emulate.tally(votes, n)
        for lr, decay in ((0.01, 1 - 0.01 * 0.1), (3.0, 0.5), (1e-4, 1.0), (0.5, 0.0)):
            p0 = torch.cat([nan_inputs(dtype, 20), special_floats(n, rng).to(dtype)])[:n]
            want = apply_decayed_reference(p0, plus, tie, lr, decay)
            buf = special_floats(n + 8, rng).to(dtype)   # p inside a larger buffer
            buf[4: 4 + n] = p0
            before = buf.clone()
            threads, blocks = LAUNCHES[n % len(LAUNCHES)]
            emulate.apply_decayed(buf[4: 4 + n], plus, tie, lr, decay, threads=threads,
                                  blocks=blocks)
            assert same_floats(buf[4: 4 + n], want), (dtype, n, lr, decay)
            assert same_floats(buf[:4], before[:4]) and same_floats(buf[4 + n:], before[4 + n:])
            if dtype == torch.float32:   # torch's own two ops, canonical NaN after
                ops = p0.clone()
                ops.mul_(decay)
                ops.add_(packing.unpack_signs(plus, n, tie), alpha=-lr)
                assert same_floats(packing.canonicalize_nan_(ops), want), (n, lr, decay)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_apply_decayed_every_half_precision_value(dtype):
    p0 = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    rng = np.random.default_rng(2)
    plus, tie = pack_bits(rng.random(p0.numel()) < 0.5), pack_bits(rng.random(p0.numel()) < 0.2)
    for lr, decay in ((1e-3, 1 - 1e-4), (0.7, 0.5), (300.0, 1.0)):
        p = p0.clone()
        emulate.apply_decayed(p, plus, tie, lr, decay, threads=256, blocks=16)
        assert same_floats(p, apply_decayed_reference(p0, plus, tie, lr, decay)), (lr, decay)


# ---- Lion's kernels through mpisign.cuda.kernels, torch_check and the backends, on the shim ---

LION_STEP = (0.9, 0.1 / 2.7, 0.99, 0.01 / 2.7)


@pytest.fixture
def fresh_torch_check(monkeypatch):
    """torch_check's once-per-device results forgotten (the tests' device is "cpu")."""
    monkeypatch.setattr(torch_check, "_results", {})


def words_at(words: torch.Tensor, sizes) -> list:
    """Slices of ``words`` for parameters of ``sizes``, one poisoned word between each."""
    outs, start = [], 1
    for n in sizes:
        outs.append(words[start: start + packing.n_words(n)])
        start += packing.n_words(n) + 1
    return outs


def device_words(a: np.ndarray | None) -> torch.Tensor | None:
    return None if a is None else torch.from_numpy(a.view(np.int64).copy())


def test_torch_check_on_emulated_kernels(fresh_torch_check):
    """The start-up comparison with torch, through mpisign.cuda.kernels with the shim's launches
    and torch's CPU ops: Lion's form is the one the compiled CPU kernels find by their own
    measure; torch's CPU add rounds alpha to float16/bfloat16 (its CUDA add keeps float32, the
    GPU test's case), which apply_decayed matches through the lr it is given."""
    with emulate.kernels_on_cpu() as k:
        torch_check.check("cpu", k)
        form = torch_check.lion_form("cpu", k)
        assert form in torch_check.FORMS
        if native.why_not() is None:
            assert form == native.momentum_form(torch.float32)
        assert torch_check.decayed_lr("cpu", torch.float32, 0.01, k) == 0.01
        for dtype in (torch.float16, torch.bfloat16):
            rounded = float(torch.tensor(0.01, dtype=dtype))
            assert rounded != 0.01 and torch_check.decayed_lr("cpu", dtype, 0.01, k) == rounded
        assert torch_check.compare_lion("cpu", form == "fused", k) == []


def test_resident_lion_on_cpu_stand_ins(fresh_torch_check):
    """ResidentSigns' Lion methods: one call for several parameters, signs into slices of one
    word buffer, one count for all, torch's bits (LionRule's ops); apply_decayed as torch's two
    ops for every kernel dtype; None, with nothing done, for what the kernel does not take."""
    rng = np.random.default_rng(5)
    sizes = (4099, 1, 65, 300)
    with emulate.kernels_on_cpu() as k:
        gpu = bridge.ResidentSigns("cpu", k)
        gs, ms = zip(*(lion_inputs(n, rng) for n in sizes))
        want_m = [m.clone() for m in ms]
        want_c = torch_check.torch_lion_step(list(gs), want_m, *LION_STEP)
        words = torch.full((sum(packing.n_words(n) + 1 for n in sizes) + 1,),
                           kernels._POISON_WORD, dtype=torch.int64)
        outs, got_m = words_at(words, sizes), [m.clone() for m in ms]
        count = gpu.lion_update_and_pack(list(gs), got_m, *LION_STEP, 1, outs)
        assert count == sum(int((~torch.isfinite(g)).sum()) for g in gs) > 0
        for c, out, m, wm in zip(want_c, outs, got_m, want_m):
            assert np.array_equal(out.numpy().view(np.uint64), packing.pack_signs(c, 1))
            assert same_floats(m, wm)
        guards = [0] + [out.storage_offset() + out.numel() for out in outs]
        assert (words[guards] == kernels._POISON_WORD).all()   # nothing written between
        g, m = gs[0], ms[0].clone()
        for bad in (([g.half()], [m.half()]), ([g], [m[:-1]]), ([g, g], [m]),
                    ([g.view(-1, 1)], [m]), ([torch.zeros(20)[::2]], [torch.zeros(10)])):
            before = [t.clone() for t in bad[1]]
            assert gpu.lion_update_and_pack(*bad[:1], bad[1], *LION_STEP, 0, outs[:1]) is None
            assert all(same_floats(a, b) for a, b in zip(bad[1], before))
        assert gpu.lion_update_and_pack([g], [m], *LION_STEP, 0, [outs[1]]) is None  # too short
        plus, tie = emulate.tally(votes_for(4, 4099, rng), 4099)
        for dtype in DTYPES:
            p0 = special_floats(4099, rng).to(dtype)
            v = packing.unpack_signs(plus, 4099, tie, dtype=dtype)
            want = torch_check.torch_apply_decayed(p0.clone(), v, 0.01, 1 - 1e-3)
            p = p0.clone()
            gpu.apply_decayed(p, device_words(plus), device_words(tie), 0.01, 1 - 1e-3)
            assert same_floats(p, want), dtype


def test_staged_lion_on_cpu_stand_ins(fresh_torch_check):
    """CudaSigns' Lion methods (MPI not CUDA-aware): the signs reach the host words at the
    next settle, like queued packs, through a device buffer that grows between steps; the
    vote staged back for apply_decayed. StagedSigns hands CPU tensors to its host backend."""
    rng = np.random.default_rng(6)
    with emulate.kernels_on_cpu() as k:
        gpu = bridge.CudaSigns("cpu", k, pin_memory=False)
        for step, sizes in enumerate(((70, 1), (5000, 70, 33))):
            gs, ms = zip(*(lion_inputs(n, rng) for n in sizes))
            want_m = [m.clone() for m in ms]
            want_c = torch_check.torch_lion_step(list(gs), want_m, *LION_STEP)
            outs = [np.zeros(packing.n_words(n), np.uint64) for n in sizes]
            got_m = [m.clone() for m in ms]
            count = gpu.lion_update_and_pack(list(gs), got_m, *LION_STEP, step % 2, outs)
            assert count == sum(int((~torch.isfinite(g)).sum()) for g in gs)
            gpu.settle()
            for c, out, m, wm in zip(want_c, outs, got_m, want_m):
                assert np.array_equal(out, packing.pack_signs(c, step % 2)) and same_floats(m, wm)
        assert gpu.lion_update_and_pack(list(gs), got_m, *LION_STEP, 0, [o[:-1] for o in outs]) \
            is None
        plus, tie = emulate.tally(votes_for(4, 5000, rng), 5000)
        p0 = special_floats(5000, rng)
        want = torch_check.torch_apply_decayed(p0.clone(), packing.unpack_signs(plus, 5000, tie),
                                               0.01, 0.999)
        p = p0.clone()
        gpu.apply_decayed(p, plus, tie, 0.01, 0.999)
        assert same_floats(p, want)

    class Host:
        tally = None

        def lion_update_and_pack(self, *args):
            return ("host", args)
    staged = bridge.StagedSigns(Host())
    args = ([torch.zeros(3)], [torch.zeros(3)], *LION_STEP, 0, [np.zeros(1, np.uint64)])
    assert staged.lion_update_and_pack(*args) == ("host", args)


class _Disagreeing:
    """mpisign.cuda.kernels on the shim, but lion_update_pack leaves the last coordinate's
    momentum as it was and apply_decayed ignores decay."""

    def __init__(self, k):
        self.k = k

    def __getattr__(self, name):
        return getattr(self.k, name)

    def lion_update_pack(self, g, m, *args, **kw):
        keep = m[-1:].clone()
        out = self.k.lion_update_pack(g, m, *args, **kw)
        m[-1:] = keep
        return out

    def apply_decayed(self, p, plus, tie, lr, decay):
        return self.k.apply_decayed(p, plus, tie, lr, 1.0)


def test_lion_kernels_that_disagree_with_torch_are_not_used(fresh_torch_check, caplog):
    """A form that matches torch in no way: an ERROR, and Lion's fused step declines (None,
    nothing done) so the rule takes torch's ops; apply_decayed then is torch's two ops."""
    rng = np.random.default_rng(8)
    with emulate.kernels_on_cpu() as k, caplog.at_level(logging.INFO, "mpisign.cuda.torch_check"):
        gpu = bridge.ResidentSigns("cpu", _Disagreeing(k))
        g, m = lion_inputs(300, rng)
        before, out = m.clone(), gpu.words(packing.n_words(300))
        assert gpu.lion_update_and_pack([g], [m], *LION_STEP, 0, [out]) is None
        assert same_floats(m, before) and not out.any()
        plus, tie = emulate.tally(votes_for(4, 300, rng), 300)
        p0 = special_floats(300, rng)
        want = torch_check.torch_apply_decayed(p0.clone(), packing.unpack_signs(plus, 300, tie),
                                               0.01, 0.5)
        p = p0.clone()
        gpu.apply_decayed(p, device_words(plus), device_words(tie), 0.01, 0.5)
        assert same_floats(p, want)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("Lion's fused kernel on cpu DISAGREES" in e for e in errors), errors
    assert any("apply_decayed on cpu DISAGREES" in e and "float32" in e for e in errors), errors
