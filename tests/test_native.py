"""The compiled CPU kernels (mpisign/backends/_signs.c via mpisign.backends.native) against the numpy reference
(mpisign.backends.packing), bit for bit: every dtype, ragged lengths, zeros, NaN (of any sign and
payload) and +-inf, both zero bits, ties, weight decay, unaligned slices of larger buffers; on
the AVX2 bodies and, in a second interpreter, on the portable ones (MPISIGN_SIMD=portable)."""

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mpisign.backends import native, packing, signs

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LENGTHS = [0, 1, 7, 31, 63, 64, 65, 127, 128, 129, 1000, 4099, 65_537]

built = pytest.mark.skipif(native.why_not() is not None, reason=f"{native.why_not()}")


def special_values(n: int, dtype, seed: int) -> torch.Tensor:
    """Normal noise with exact zeros (both signs), NaN, +-inf and tiny values sprinkled in."""
    rng = np.random.default_rng([seed, n])
    x = rng.standard_normal(n)
    pick = rng.random(n)
    x[pick < 0.05] = 0.0
    x[(pick >= 0.05) & (pick < 0.07)] = -0.0
    x[(pick >= 0.07) & (pick < 0.08)] = np.nan
    x[(pick >= 0.08) & (pick < 0.09)] = np.inf
    x[(pick >= 0.09) & (pick < 0.10)] = -np.inf
    x[(pick >= 0.10) & (pick < 0.11)] = 1e-40   # float32 subnormal; 0 in half precision
    return torch.from_numpy(x).to(dtype)


#: Mantissa bits of each dtype, and the canonical NaN, the one NaN apply writes.
MANTISSA = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23, torch.float64: 52}
CANONICAL_NAN = {torch.float16: 0x7FFF, torch.bfloat16: 0x7FFF, torch.float32: 0x7FFF_FFFF,
                 torch.float64: 0x7FFF_FFFF_FFFF_FFFF}


def with_nan_payloads(x: torch.Tensor, seed: int, share: float = 0.05) -> torch.Tensor:
    """A copy of ``x`` with NaNs at about ``share`` of its coordinates: random sign and payload,
    so both quiet (top mantissa bit set) and signalling NaNs."""
    size, m = x.element_size(), MANTISSA[x.dtype]
    unsigned = {2: np.uint16, 4: np.uint32, 8: np.uint64}[size]
    raw = x.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[size]).numpy()
    raw = raw.view(unsigned).copy()
    rng = np.random.default_rng([seed, x.numel()])
    hit = rng.random(raw.size) < share
    k = int(hit.sum())
    payload = rng.integers(1, 2**m, size=k, dtype=np.uint64)
    sign = rng.integers(0, 2, size=k, dtype=np.uint64) << np.uint64(8 * size - 1)
    exponent = np.uint64((1 << (8 * size - 1)) - (1 << m))
    raw[hit] = (sign | exponent | payload).astype(unsigned)
    return torch.from_numpy(raw.view(f"i{size}")).view(x.dtype)


def bits(t: torch.Tensor) -> np.ndarray:
    """The raw bits of ``t``, so that -0.0 vs +0.0 and NaN payloads count."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[
        t.element_size()]).numpy()


def unaligned(x: torch.Tensor, offset: int) -> torch.Tensor:
    """``x``'s values in a slice of a larger buffer, ``offset`` elements in (not 32B-aligned)."""
    big = torch.empty(x.numel() + offset + 3, dtype=x.dtype)
    big[offset: offset + x.numel()] = x
    return big[offset: offset + x.numel()]


def random_words(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.integers(0, 2**64, size=packing.n_words(n), dtype=np.uint64, endpoint=False)
    if n % 64:
        w[-1] &= np.uint64((1 << (n % 64)) - 1)
    return w


@built
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", LENGTHS)
def test_pack_is_the_reference(n, dtype):
    x = special_values(n, dtype, seed=1)
    for zero_bit in (0, 1):
        want = packing.pack_signs(x, zero_bit)
        for offset in (0, 1, 5):
            words = np.full(packing.n_words(n) + 2, 0xDEAD, dtype=np.uint64)  # poisoned
            got = native.pack(unaligned(x, offset), zero_bit, words[1:])
            assert np.array_equal(got, want), (n, dtype, zero_bit, offset)
            assert words[0] == 0xDEAD and words[-1] == 0xDEAD, "wrote outside its words"


@built
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", LENGTHS)
def test_unpack_is_the_reference(n, dtype):
    plus, tie = random_words(n, 2), random_words(n, 3)
    for t in (None, tie):
        want = packing.unpack_signs(plus, n, t, dtype=dtype)
        out = unaligned(torch.full((n,), 7.0, dtype=dtype), 3)
        native.unpack(plus, t, out)
        assert np.array_equal(bits(out), bits(want)), (n, dtype, t is None)


@built
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", LENGTHS)
def test_apply_is_the_reference(n, dtype):
    """Finite, zero, infinite and NaN parameters (NaNs of every sign and payload, quiet and
    signalling: both write the canonical NaN), with and without weight decay and ties, lr and
    wd that float32 rounds."""
    p0 = with_nan_payloads(special_values(n, dtype, seed=4), seed=4)
    plus, tie = random_words(n, 5), random_words(n, 6)
    for t in (None, tie):
        for lr, wd in [(1e-3, 0.0), (0.1, 1e-4), (1 / 3, 0.1), (7e-5, 1e-60)]:
            want = p0.clone()
            packing.apply_signs(want, plus, t, lr, wd)
            got = unaligned(p0, 1)
            native.apply(got, plus, t, lr, wd)
            assert np.array_equal(bits(got), bits(want)), (n, dtype, lr, wd, t is None)


@built
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_apply_on_nan_parameters_writes_the_canonical_nan(dtype):
    """NaN in (any sign and payload, quiet or signalling), or NaN made (inf - inf under weight
    decay): the compiled kernel and the reference both write exactly the canonical NaN."""
    n = 1000
    x = torch.full((n,), float("inf"), dtype=dtype)
    x[1::2] = -float("inf")
    p0 = with_nan_payloads(x, seed=12, share=0.5)
    canonical = torch.tensor(CANONICAL_NAN[dtype]).numpy().astype(bits(p0).dtype)
    for t in (None, random_words(n, 3)):
        for lr, wd in [(0.1, 0.0), (0.1, 0.01), (0.0, 0.01)]:
            want = p0.clone()
            packing.apply_signs(want, random_words(n, 1), t, lr, wd)
            got = unaligned(p0, 1)
            native.apply(got, random_words(n, 1), t, lr, wd)
            nan = torch.isnan(p0) | (torch.isinf(p0) & (wd != 0))
            assert torch.equal(torch.isnan(got), nan), (dtype, lr, wd)
            assert (bits(got)[nan.numpy()] == canonical).all(), (dtype, lr, wd)
            assert np.array_equal(bits(got), bits(want)), (dtype, lr, wd)


@built
def test_bad_buffers_are_refused_before_the_kernel_runs():
    x = torch.randn(130)
    with pytest.raises(ValueError, match="at least 3"):
        native.pack(x, 0, np.zeros(2, np.uint64))
    with pytest.raises(ValueError, match="contiguous"):
        native.pack(x[::2], 0, np.zeros(3, np.uint64))
    with pytest.raises(ValueError, match="uint64"):
        native.unpack(np.zeros(3, np.int64), None, x)
    with pytest.raises(ValueError, match="float32"):
        native.apply(x.half(), np.zeros(3, np.uint64), None, 0.1)
    with pytest.raises(ValueError, match="zero_bit"):
        native.pack(x, 2, np.zeros(3, np.uint64))


@built
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_compiled_backend_is_the_host_backend(dtype):
    """What Signum and majority_vote call: CompiledSigns against HostSigns (the reference),
    including the half-precision apply it hands to the reference, and non-contiguous tensors."""
    n = 1000
    host, compiled = signs.HostSigns(), signs.CompiledSigns()
    x = special_values(n, dtype, seed=7).reshape(20, 50).t()   # not contiguous
    a, b = host.words(packing.n_words(n)), compiled.words(packing.n_words(n))
    host.pack(x, 1, a)
    compiled.pack(x, 1, b)
    assert np.array_equal(a, b)
    plus, tie = random_words(n, 8), random_words(n, 9)
    p = with_nan_payloads(special_values(n, dtype, seed=10), seed=10)
    q = p.clone()
    host.apply(p, plus, tie, 0.01, 0.001)
    compiled.apply(q, plus, tie, 0.01, 0.001)
    assert np.array_equal(bits(p), bits(q))
    out = torch.empty(n, dtype=dtype)
    assert compiled.unpack(plus, tie, n, out, out) is out
    assert np.array_equal(bits(out), bits(host.unpack(plus, tie, n, out)))


def test_a_missing_extension_falls_back_loudly(monkeypatch, caplog):
    monkeypatch.setattr(native, "_signs", None)
    monkeypatch.setattr(native, "_error", ImportError("no module named mpisign.backends._signs"))
    monkeypatch.setattr(native, "_warned", False)
    with caplog.at_level(logging.WARNING, logger="mpisign.backends.native"):
        assert not native.available()
        assert type(signs.signs_for([torch.zeros(3)])) is signs.HostSigns
        native.available()
    warnings = [r for r in caplog.records if "compiled CPU kernels unavailable" in r.message]
    assert len(warnings) == 1 and "numpy reference" in warnings[0].message


def test_the_extension_is_built_where_a_compiler_is():
    """setup.py builds it whenever a C compiler exists: then nothing may be silently slow."""
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler here")
    assert native.why_not() in (None, "MPISIGN_KERNELS=reference"), native.why_not()
    assert type(signs.signs_for([torch.zeros(3)])) is signs.CompiledSigns


@built
@pytest.mark.skipif(os.environ.get("MPISIGN_SIMD") == "portable", reason="already portable")
def test_the_portable_bodies_too():
    """The same tests in an interpreter where the kernels take their portable C bodies."""
    if native.simd() != "avx2":
        pytest.skip("this CPU runs the portable bodies already")
    env = dict(os.environ, MPISIGN_SIMD="portable")
    code = "import sys; from mpisign.backends import native; print(native.simd())"
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120).stdout.strip() == "portable"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           __file__, "-k", "is_the_reference or nan_parameters or zero_mask"],
                          env=env, capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stdout[-3000:]


@built
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", LENGTHS)
def test_update_pack_is_torch_then_the_reference_pack(n, dtype):
    """The fused local step against Signum's general path: torch's scrub (nan_to_num), torch's
    _foreach momentum update, then the reference pack; with and without momentum, on
    unaligned slices."""
    assert native.momentum_form(dtype) is not None, "torch's rounding was not recognized"
    g = special_values(n, dtype, seed=11) * 100
    m0 = torch.randn(n, dtype=dtype, generator=torch.Generator().manual_seed(n))
    clean = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
    bad = int((~torch.isfinite(g)).sum())
    for beta, alpha in [(0.9, 0.1), (0.0, 1.0), (0.99, 0.01 / 1024)]:
        for zero_bit in (0, 1):
            want_m = m0.clone()
            torch._foreach_mul_([want_m], beta)
            torch._foreach_add_([want_m], [clean], alpha=alpha)
            m = unaligned(m0, 1) if beta else None
            out = np.zeros(packing.n_words(n), np.uint64)
            assert native.update_pack(unaligned(g, 3), m, beta, alpha, zero_bit, out) == bad
            want = packing.pack_signs(want_m if beta else clean, zero_bit)
            assert np.array_equal(out, want), (n, dtype, beta, zero_bit)
            if beta:
                assert np.array_equal(bits(m), bits(want_m)), (n, dtype, beta)


@built
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", LENGTHS)
def test_the_fused_kernels_zero_mask_is_where_the_zero_bit_matters(n, dtype):
    """``zeros=``: bit 1 exactly where the packed value is 0 or NaN, i.e. where packing with
    zero bit 0 and with zero bit 1 differ (two runs from the same state); padding bits 0; the
    packed words and the momentum are those of a call without it."""
    g = special_values(n, dtype, seed=5) * 100
    g[::5] = 0.0
    m0 = torch.randn(n, dtype=dtype, generator=torch.Generator().manual_seed(n))
    m0[::3] = 0.0   # with g = 0 there: an exact 0 of the momentum and of Lion's c
    calls = [lambda m, zb, out, z: native.update_pack(g, m, 0.9, 0.1, zb, out, z),
             lambda m, zb, out, z: native.update_pack(g, None, 0.0, 1.0, zb, out, z),
             lambda m, zb, out, z: native.lion_update_pack(g, m, (0.9, 0.99), (0.1, 0.01), zb,
                                                           out, z)]
    for call in calls:
        runs = {}
        for zero_bit in (0, 1):
            m, out = m0.clone(), np.zeros(packing.n_words(n), np.uint64)
            zeros = np.full(packing.n_words(n), 7, np.uint64)
            call(m, zero_bit, out, zeros)
            plain_m, plain = m0.clone(), np.zeros_like(out)
            call(plain_m, zero_bit, plain, None)
            assert np.array_equal(out, plain) and torch.equal(m, plain_m)
            runs[zero_bit] = out, zeros
        (w0, z0), (w1, z1) = runs[0], runs[1]
        assert np.array_equal(z0, z1) and np.array_equal(z0, w0 ^ w1), (n, dtype)
        if n % 64:
            assert z0[-1] >> np.uint64(n % 64) == 0


@built
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_signum_on_the_compiled_kernels_is_signum_on_the_reference(momentum, monkeypatch):
    """Signum end to end (one rank): the compiled backend and the reference one give the same
    parameters, momentum and statistics, with NaN/inf gradients, a float64 parameter, weight
    decay, two groups and a GradScaler-style scale."""
    from mpi4py import MPI

    import mpisign

    def run(kernels: str):
        monkeypatch.setenv("MPISIGN_KERNELS", kernels)
        torch.manual_seed(0)
        a, b = torch.nn.Parameter(torch.randn(1000)), torch.nn.Parameter(torch.randn(77).double())
        opt = mpisign.Signum([{"params": [a]}, {"params": [b], "weight_decay": 0.01}], lr=0.01,
                             momentum=momentum, comm=MPI.COMM_SELF)
        opt.grad_scale = torch.tensor(8.0)
        for k in range(4):
            a.grad = special_values(1000, torch.float32, seed=k) * 3
            b.grad = special_values(77, torch.float64, seed=100 + k)
            opt.step()
        return opt, [a, b]

    ref_opt, ref = run("reference")
    assert type(ref_opt.engine.plan.backend) is signs.HostSigns
    opt, got = run("compiled")
    assert type(opt.engine.plan.backend) is signs.CompiledSigns
    for p, q in zip(ref, got):
        assert np.array_equal(bits(p.detach()), bits(q.detach()))
        if momentum:
            assert torch.equal(ref_opt.state[p]["momentum_buffer"],
                               opt.state[q]["momentum_buffer"])
    assert opt.stats.as_dict() == ref_opt.stats.as_dict()
