"""The wire format and the bit-sliced tally against plain numpy on unpacked signs."""

import numpy as np
import pytest
import torch

from mpisign.backends import packing

LENGTHS = [0, 1, 7, 8, 9, 31, 32, 33, 63, 64, 65, 127, 128, 129, 1000, 4099]


def signs_with_zero_rule(a: np.ndarray, zero_bit: int) -> np.ndarray:
    """The documented bit of each coordinate, computed elementwise."""
    bits = (a > 0).astype(np.uint8)
    bits[(a == 0) | np.isnan(a)] = zero_bit
    return bits


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("zero_bit", [0, 1])
def test_pack_is_little_endian_packbits_with_zero_padding(n, zero_bit):
    rng = np.random.default_rng(n)
    a = rng.standard_normal(n).astype(np.float32)
    a[rng.random(n) < 0.2] = 0.0
    if n > 3:
        a[1], a[2], a[3] = np.nan, np.inf, -np.inf
    words = packing.pack_signs(a, zero_bit=zero_bit)
    assert words.dtype == np.uint64 and words.size == (n + 63) // 64
    expect = np.packbits(signs_with_zero_rule(a, zero_bit), bitorder="little")
    raw = words.view(np.uint8)
    assert np.array_equal(raw[: expect.size], expect)
    assert not raw[expect.size:].any()  # whole padding bytes are zero
    if n % 8:  # and so are the padding bits of the last byte
        assert raw[expect.size - 1] >> (n % 8) == 0
    # Coordinate i is bit i % 64 of word i // 64.
    for i in range(0, n, max(1, n // 13)):
        assert (int(words[i // 64]) >> (i % 64)) & 1 == signs_with_zero_rule(a, zero_bit)[i]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_torch_dtypes_and_numpy_agree(dtype):
    t = torch.randn(1001, dtype=torch.float64)
    t[::10] = 0
    words = packing.pack_signs(t.to(dtype), zero_bit=1)
    assert np.array_equal(words, packing.pack_signs(t.numpy(), zero_bit=1))
    scratch = torch.empty(2000, dtype=torch.bool)
    again = packing.pack_signs(t.to(dtype), zero_bit=1, out=np.empty(40, np.uint64), scratch=scratch)
    assert np.array_equal(words, again)


@pytest.mark.parametrize("n", LENGTHS)
def test_unpack_inverts_pack_and_applies_ties(n):
    rng = np.random.default_rng(n + 1)
    a = rng.standard_normal(n)
    words = packing.pack_signs(a)
    tie = packing.pack_signs(rng.standard_normal(n))
    v = packing.unpack_signs(words, n, tie=tie, dtype=torch.float64).numpy()
    expect = np.where(a > 0, 1.0, -1.0)
    expect[np.unpackbits(tie.view(np.uint8), count=n, bitorder="little") == 1] = 0.0
    assert np.array_equal(v, expect)


@pytest.mark.parametrize("m", range(1, 10))
@pytest.mark.parametrize("n", [1, 63, 64, 65, 1000])
def test_tally_and_majority_match_summed_signs(m, n):
    rng = np.random.default_rng(100 * m + n)
    bits = rng.integers(0, 2, size=(m, n), dtype=np.uint8)
    words = np.stack([np.pad(np.packbits(b, bitorder="little"), (0, 8 * ((n + 63) // 64) - (n + 7) // 8)
                             ).view(np.uint64) for b in bits])
    planes = packing.tally(words)
    assert planes.shape[0] == packing.count_planes(m)
    # The counter holds the exact count of "+" votes per coordinate.
    count = sum(np.unpackbits(planes[j].view(np.uint8), count=n, bitorder="little").astype(int) << j
                for j in range(planes.shape[0]))
    assert np.array_equal(count, bits.sum(0))
    plus, tie = packing.majority(planes, m, n)
    total = (2 * bits.astype(int) - 1).sum(0)
    v = packing.unpack_signs(plus, n, tie).numpy()
    assert np.array_equal(v, np.sign(total))
    assert (tie is None) == (m % 2 == 1)
    # Partial counts added in any split give the same bits (tree == server).
    for k in range(1, m):
        both = packing.add_counts(packing.tally(words[:k]), packing.tally(words[k:]),
                                  packing.count_planes(m))
        p2, t2 = packing.majority(both, m, n)
        assert np.array_equal(p2, plus) and (t2 is None or np.array_equal(t2, tie))
    # Disagreement is the popcount of the xor, ties not counted.
    for r in range(m):
        against = (bits[r] == 1) & (np.sign(total) < 0) | (bits[r] == 0) & (np.sign(total) > 0)
        assert packing.disagreement(words[r], plus, tie) == int(against.sum())
    # The same tally on torch int64 words (the GPU path's, on any device) gives the same bits.
    t_words = torch.from_numpy(words.view(np.int64).copy())
    t_plus, t_tie = packing.majority(packing.tally(t_words), m, n)
    assert t_plus.dtype == torch.int64 and np.array_equal(t_plus.numpy().view(np.uint64), plus)
    assert (t_tie is None) == (tie is None)
    if tie is not None:
        assert np.array_equal(t_tie.numpy().view(np.uint64), tie)
    k = m // 2
    t_both = packing.add_counts(packing.tally(t_words[:k]) if k else t_words[:1] * 0,
                                packing.tally(t_words[k:]), packing.count_planes(m))
    assert np.array_equal(packing.majority(t_both, m, n)[0].numpy().view(np.uint64), plus)


def test_argument_errors():
    with pytest.raises(ValueError, match="zero_bit"):
        packing.pack_signs(np.ones(3), zero_bit=2)
    with pytest.raises(ValueError, match="out"):
        packing.pack_signs(np.ones(100), out=np.empty(1, np.uint64))
    with pytest.raises(ValueError, match="words"):
        packing.unpack_signs(np.zeros(1, np.uint64), 65)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_apply_signs_matches_unpack_then_update(dtype):
    """The fused, chunked apply equals p - lr * (v + wd * p) computed from the unpacked vote,
    across a chunk boundary and with ties."""
    rng = np.random.default_rng(7)
    n = packing.APPLY_CHUNK + 1001
    plus = packing.pack_signs(rng.standard_normal(n))
    tie = packing.pack_signs(rng.standard_normal(n) - 1.0)  # ~16% ties
    p = torch.from_numpy(rng.standard_normal(n)).to(dtype)
    v = packing.unpack_signs(plus, n, tie, dtype=torch.float64)
    want = (p.double() - 0.01 * (v + 0.1 * p.double())).to(dtype)
    packing.apply_signs(p, plus, tie, 0.01, 0.1, scratch={})
    if dtype == torch.bfloat16:  # bf16 arithmetic: within one bf16 ulp (2**-7 relative)
        torch.testing.assert_close(p, want, rtol=2**-7, atol=1e-2)
    else:
        torch.testing.assert_close(p, want, rtol=0, atol=1e-6)
    assert (v == 0).any()  # ties were really exercised


def test_apply_with_a_schedule_keeps_few_tables_and_ties_are_plus_zero():
    """lr is folded into apply's lookup table: a schedule of many lrs must not grow the cache
    without bound. Ties vote +0.0 (as the GPU kernels), in unpack and in apply."""
    p = torch.zeros(1000)
    plus = packing.pack_signs(torch.randn(1000, generator=torch.Generator().manual_seed(0)))
    tie = plus.copy()
    tie[:] = np.uint64(0x00FF_00FF_00FF_00FF)
    for k in range(200):
        packing.apply_signs(p, plus, tie, 1e-3 * (1 + k / 200))
    assert len(packing._TABLES) <= packing._MAX_TABLES
    v = packing.unpack_signs(plus, 1000, tie)
    tied = packing.unpack_signs(tie, 1000) > 0
    assert (v[tied] == 0).all() and not torch.signbit(v[tied]).any()
    q = -torch.zeros(1000)  # -0.0 everywhere: a tie leaves it -0.0 - (+0.0) = -0.0
    packing.apply_signs(q, plus, tie, 0.1)
    assert torch.signbit(q[tied]).all() and (q[~tied].abs() == np.float32(0.1)).all()
