"""Packed sign bits and the bit-sliced majority tally: the CPU reference.

Wire format
-----------
A vector of ``n`` coordinates is packed into ``W = ceil(n / 64)`` uint64 words, little-endian:
coordinate ``i`` is bit ``i % 64`` of word ``i // 64``. Bit 1 is a vote for "+", bit 0 a vote for
"-". The ``64 * W - n`` padding bits are always 0 and never reach a parameter. On a little-endian
host, the words read as bytes are exactly ``numpy.packbits(bits, bitorder="little")``, and a
32-bit word is what one CUDA warp ballot produces, so the CPU and GPU paths share one format.

Zero rule
---------
One bit cannot say "0". A coordinate that is exactly 0 (or NaN, which has no sign) is packed as
``zero_bit``; callers pass ``zero_bit = (rank + step) % 2``. Where every rank holds a 0 the votes
then split evenly: a tie (vote 0, no step) when the number of ranks is even, and a vote that
flips sign every step when it is odd, so such a coordinate stays within ``lr`` of where it was
instead of drifting by ``lr`` per step, which packing 0 as "+" would do.

Tally
-----
Votes are counted without unpacking, with bit-sliced counters: plane ``j`` holds bit ``j`` of the
"+" count of 64 coordinates at once. Adding one worker's bits is a carry-save add over the planes;
adding two partial counts is a ripple-carry add; the majority ``count >= M // 2 + 1`` and, for even
M, the tie ``count == M / 2`` are compared plane by plane. All of it is exact integer arithmetic,
associative and commutative, so every topology gets the same bits.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "n_words",
    "pack_signs",
    "unpack_signs",
    "count_planes",
    "add_vote",
    "add_counts",
    "tally",
    "majority",
    "disagreement",
    "apply_signs",
    "CANONICAL_NAN",
    "canonicalize_nan_",
]

WORD_BITS = 64
_WORD = np.uint64
_ALL_ONES = np.uint64(0xFFFF_FFFF_FFFF_FFFF)


def n_words(n: int) -> int:
    """Number of uint64 words that hold ``n`` packed bits."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return (n + WORD_BITS - 1) // WORD_BITS


def _tail_mask(n: int) -> np.uint64:
    """Mask of the valid bits of the last word of an ``n``-bit vector (all ones if full)."""
    r = n % WORD_BITS
    return _ALL_ONES if r == 0 else np.uint64((1 << r) - 1)


def _as_bool_lt0_or_gt0(x, greater: bool, scratch=None) -> np.ndarray:
    """``x > 0`` (greater) or ``x < 0`` as a flat numpy bool array, in one pass over ``x``."""
    if isinstance(x, torch.Tensor):
        t = x.detach().reshape(-1)
        if t.device.type != "cpu":
            raise ValueError(f"pack_signs takes CPU tensors, got device {t.device}; "
                             "CUDA tensors go through mpisign.cuda")
        if scratch is not None and scratch.numel() >= t.numel():
            out = scratch[: t.numel()]
            (torch.gt if greater else torch.lt)(t, 0, out=out)
        else:
            out = torch.gt(t, 0) if greater else torch.lt(t, 0)
        return out.numpy()
    a = np.asarray(x).reshape(-1)
    return a > 0 if greater else a < 0


def pack_signs(x, zero_bit: int = 0, out: np.ndarray | None = None, scratch=None) -> np.ndarray:
    """Pack the signs of ``x`` (flattened) into uint64 words: bit 1 = "+", 0 = "-".

    ``x`` is a CPU torch tensor or numpy array of floating dtype. Coordinates that are 0 or NaN
    are packed as ``zero_bit`` (see the module docstring). ``out``, if given, is a uint64 array
    of at least ``n_words(x.numel())`` words and is filled and returned; ``scratch`` is an
    optional torch bool tensor of at least ``x.numel()`` elements, reused to avoid allocation.
    """
    if zero_bit not in (0, 1):
        raise ValueError(f"zero_bit must be 0 or 1, got {zero_bit!r}")
    # zero_bit = 0: bit = x > 0 (0 and NaN -> 0).  zero_bit = 1: bit = not (x < 0) (0, NaN -> 1).
    # Either way one comparison pass over the floats; the inversion runs on the 8x smaller words.
    bits = _as_bool_lt0_or_gt0(x, greater=(zero_bit == 0), scratch=scratch)
    n = bits.size
    w = n_words(n)
    if out is None:
        out = np.empty(w, dtype=_WORD)
    elif out.dtype != _WORD or out.size < w:
        raise ValueError(f"out must be a uint64 array of >= {w} words, got {out.dtype}[{out.size}]")
    words = out[:w]
    if w == 0:
        return words
    packed = np.packbits(bits, bitorder="little")
    as_bytes = words.view(np.uint8)
    as_bytes[: packed.size] = packed
    as_bytes[packed.size:] = 0
    if zero_bit == 1:
        np.invert(words, out=words)
    words[-1] &= _tail_mask(n)
    return words


_NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}
_TABLES: dict = {}
_MAX_TABLES = 32  # tables are keyed by value (apply folds lr into them): keep a schedule's few


def _table(kind: str, np_dtype, on: float) -> np.ndarray:
    """A lookup table from packed bits to votes, ``on`` for "+", ``-on`` for "-", ``+0.0`` at a tie:

    * ``"byte"``: 256 x 8, row ``b`` is bits 0..7 of a plus byte ``b``;
    * ``"nibble"``: 256 x 4, row ``p | t << 4`` is bits 0..3 of a plus nibble ``p`` with its
      tie nibble ``t``, so ties cost no pass of their own.
    """
    key = (kind, np.dtype(np_dtype).str, on)
    if key not in _TABLES:
        if len(_TABLES) >= _MAX_TABLES:
            _TABLES.clear()
        rows = np.arange(256, dtype=np.uint8)[:, None]
        bits = np.unpackbits(rows, axis=1, bitorder="little")
        if kind == "byte":
            values = np.where(bits == 1, on, -on)
        else:
            values = np.where(bits[:, 4:] == 1, 0.0, np.where(bits[:, :4] == 1, on, -on))
        _TABLES[key] = values.astype(np_dtype)
    return _TABLES[key]


def _tie_bytes(tie: np.ndarray | None, n: int) -> np.ndarray | None:
    """The tie mask as bytes, or None when it has no tie among the first ``n`` bits."""
    return tie.view(np.uint8) if tie is not None and tie[: n_words(n)].any() else None


def _expand_votes(plus_bytes: np.ndarray, tie_bytes: np.ndarray | None, out: np.ndarray,
                  on: float = 1.0) -> None:
    """``on`` / ``-on`` for each bit of ``plus_bytes`` into ``out`` (len x 8, its dtype), and
    +0.0 where ``tie_bytes`` has a 1: one table lookup per byte, or per nibble with ties (the
    plus and tie nibbles index one table), no per-bit arithmetic."""
    if tie_bytes is None:
        np.take(_table("byte", out.dtype, on), plus_bytes, axis=0, out=out)
        return
    index = np.empty((plus_bytes.size, 2), dtype=np.uint8)  # 1/32 of out's bytes (fp32)
    np.bitwise_and(plus_bytes, 0x0F, out=index[:, 0])
    index[:, 0] |= np.left_shift(tie_bytes, 4)               # low nibbles: plus | tie << 4
    np.right_shift(plus_bytes, 4, out=index[:, 1])
    index[:, 1] |= np.bitwise_and(tie_bytes, 0xF0)           # high nibbles
    np.take(_table("nibble", out.dtype, on), index, axis=0, out=out.reshape(-1, 2, 4))


def unpack_signs(words: np.ndarray, n: int, tie: np.ndarray | None = None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Unpack ``n`` bits into a CPU tensor of +1 (bit 1) / -1 (bit 0), and 0 where ``tie`` is set.

    One table lookup per byte (8 coordinates), no per-bit arithmetic: about memcpy speed.
    """
    if words.size < n_words(n):
        raise ValueError(f"{n} bits need {n_words(n)} words, got {words.size}")
    np_dtype = _NUMPY_DTYPES.get(dtype, np.float32)  # bfloat16: build in float32, cast once
    nbytes = (n + 7) // 8
    out = np.empty((nbytes, 8), dtype=np_dtype)
    tie_bytes = _tie_bytes(tie, n)
    _expand_votes(words.view(np.uint8)[:nbytes], None if tie_bytes is None else tie_bytes[:nbytes],
                  out)
    v = torch.from_numpy(out.reshape(-1)[:n])
    return v if v.dtype == dtype else v.to(dtype)


#: Coordinates unpacked at a time by apply_signs: a 1 MiB float32 scratch, cache-resident.
APPLY_CHUNK = 1 << 18

#: The one NaN that apply writes, as the bits of a signed integer of the dtype's size: sign 0,
#: exponent and mantissa all ones. It is what the GPU's float32 arithmetic returns for any NaN
#: result; x86 would keep an input NaN's sign and payload, and makes 0xffc00000 of inf - inf.
CANONICAL_NAN = {torch.float32: 0x7FFF_FFFF, torch.float64: 0x7FFF_FFFF_FFFF_FFFF,
                 torch.float16: 0x7FFF, torch.bfloat16: 0x7FFF}
_INT_OF_SIZE = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def canonicalize_nan_(t: torch.Tensor) -> torch.Tensor:
    """Every NaN of ``t``, in place, as its dtype's :data:`CANONICAL_NAN`; returns ``t``.

    On the CPU, ``t.sum()`` screens first: a NaN anywhere makes the sum NaN, and the sum is one
    read pass, 20x cheaper than ``isnan(t).any()`` (a NaN sum without a NaN in ``t``, from
    inf - inf, only costs the exact pass). On a device the masked write is queued as is, since
    asking whether there is a NaN would wait on the device.
    """
    if t.device.type == "cpu" and not bool(t.sum().isnan()):
        return t
    t.view(_INT_OF_SIZE[t.element_size()]).masked_fill_(torch.isnan(t), CANONICAL_NAN[t.dtype])
    return t


def apply_signs(p: torch.Tensor, plus: np.ndarray, tie: np.ndarray | None, lr: float,
                weight_decay: float = 0.0, scratch: dict | None = None) -> None:
    """``p -= lr * (v + weight_decay * p)`` in place, ``v`` the packed vote (+1, -1, 0 at ties).

    ``p`` is a contiguous CPU tensor whose coordinates are bits ``0 .. p.numel()-1`` of
    ``plus`` / ``tie``. The vote is unpacked :data:`APPLY_CHUNK` coordinates at a time into a
    reused scratch buffer and applied at once, so no float temporary of the parameter's size is
    ever made. ``scratch`` is a dict the caller keeps across calls.

    Rounding is the GPU ``apply`` kernel's, bit for bit: float32 arithmetic (float64 for float64
    parameters), ``lr`` and ``weight_decay`` rounded to float32, each operation rounded on its
    own (no fused multiply-add), half-precision parameters rounded once at the end, every NaN
    written as :data:`CANONICAL_NAN` (whatever the input NaN's sign and payload, and however
    torch rounds NaN to half precision). So ranks on CPUs and ranks on GPUs hold the same bits
    after every step.
    """
    if not p.is_contiguous():
        raise ValueError("apply_signs needs a contiguous parameter")
    n = p.numel()
    flat = p.view(-1)
    wide = torch.float64 if p.dtype == torch.float64 else torch.float32
    np_dtype = np.float64 if wide == torch.float64 else np.float32
    lr, weight_decay = (float(np_dtype(x)) for x in (lr, weight_decay))
    scratch = {} if scratch is None else scratch
    key = np.dtype(np_dtype).str
    if key not in scratch:
        scratch[key] = tuple(np.empty((APPLY_CHUNK // 8, 8), np_dtype) for _ in range(3))
    buf, tbuf, xbuf = scratch[key]
    plus_bytes = plus.view(np.uint8)
    tie_bytes = _tie_bytes(tie, n)
    # Without weight decay lr * v is +-lr (or +0): exact, so it goes into the table itself.
    on = 1.0 if weight_decay else lr
    for start in range(0, n, APPLY_CHUNK):  # APPLY_CHUNK is a multiple of 8: byte-aligned
        stop = min(n, start + APPLY_CHUNK)
        b0, nb = start // 8, (stop - start + 7) // 8
        _expand_votes(plus_bytes[b0: b0 + nb],
                      None if tie_bytes is None else tie_bytes[b0: b0 + nb], buf[:nb], on)
        v = torch.from_numpy(buf[:nb].reshape(-1)[: stop - start])
        chunk = flat[start:stop]
        x = chunk
        if chunk.dtype != wide:  # half precision: compute wide, round once when storing
            x = torch.from_numpy(xbuf[:nb].reshape(-1)[: stop - start])
            x.copy_(chunk)
        if weight_decay:
            t = torch.from_numpy(tbuf[:nb].reshape(-1)[: stop - start])
            torch.mul(x, weight_decay, out=t)
            v.add_(t)                       # v + wd * p
            v.mul_(lr)                      # lr * (v + wd * p)
        x.sub_(v)                           # p - lr * (v + wd * p)
        if x is not chunk:
            chunk.copy_(x)
        canonicalize_nan_(chunk)            # the kernel's NaN, not the input's or x86's


def count_planes(m: int) -> int:
    """Bit planes needed to count up to ``m`` votes: ``ceil(log2(m + 1))``."""
    return max(1, int(m).bit_length())


def _ns(a):
    """The array namespace of ``a``: numpy, or torch for tensors. The tally below is written once
    for both (numpy uint64 words on the host; torch int64 words on any device, the same bits),
    with the bitwise functions the two spell alike and ``out=`` so no temporary is allocated."""
    return torch if isinstance(a, torch.Tensor) else np


def _zeros(like, shape):
    """Zero words of ``shape``, of ``like``'s kind, dtype and device."""
    if isinstance(like, torch.Tensor):
        return like.new_zeros(shape)
    return np.zeros(shape, dtype=like.dtype)


def _word_mask(like, mask: np.uint64):
    """``mask`` as an operand for ``like``'s words: as is for numpy, the same 64 bits as a
    signed int for torch's int64 words."""
    return int(np.array(mask).view(np.int64)) if isinstance(like, torch.Tensor) else mask


def add_vote(planes, v) -> None:
    """Add one worker's vote bits ``v`` (W words) into counter ``planes`` (P x W), in place.

    Carry-save: ``c[j], carry = c[j] ^ carry, c[j] & carry`` for each plane. The caller sizes
    ``planes`` with :func:`count_planes` for the final count, so no carry leaves the top plane.
    """
    xp = _ns(planes)
    carry = v.clone() if xp is torch else v.copy()
    tmp = xp.empty_like(carry)
    for c in planes:
        xp.bitwise_and(c, carry, out=tmp)
        xp.bitwise_xor(c, carry, out=c)
        carry, tmp = tmp, carry


def add_counts(a, b, planes_out: int):
    """Ripple-carry sum of two bit-sliced counters (Pa x W and Pb x W) into ``planes_out`` planes."""
    xp, w = _ns(a), a.shape[1]
    out = _zeros(a, (planes_out, w))
    carry, s, zero = _zeros(a, w), _zeros(a, w), _zeros(a, w)
    for j in range(planes_out):
        x = a[j] if j < a.shape[0] else zero
        y = b[j] if j < b.shape[0] else zero
        xp.bitwise_xor(x, y, out=s)
        xp.bitwise_xor(s, carry, out=out[j])
        # carry = x & y | carry & (x ^ y)
        xp.bitwise_and(carry, s, out=s)
        xp.bitwise_and(x, y, out=carry)
        xp.bitwise_or(carry, s, out=carry)
    return out


def tally(votes):
    """Bit-sliced "+" counts of ``votes`` (M x W packed vectors): a P x W counter."""
    m, w = votes.shape
    planes = _zeros(votes, (count_planes(m), w))
    for v in votes:
        add_vote(planes, v)
    return planes


def _compare_count(planes, t: int):
    """Bitwise ``count > t`` and ``count == t`` for a bit-sliced counter, top plane first."""
    xp, w = _ns(planes), planes.shape[1]
    gt = _zeros(planes, w)
    if t >> planes.shape[0]:  # t needs more planes than the counter has: count < t everywhere
        return gt, _zeros(planes, w)
    eq = xp.bitwise_not(_zeros(planes, w))
    tmp = xp.empty_like(gt)
    for j in reversed(range(planes.shape[0])):
        c = planes[j]
        if t >> j & 1:
            eq &= c
        else:
            xp.bitwise_and(eq, c, out=tmp)
            gt |= tmp
            xp.bitwise_not(c, out=tmp)
            eq &= tmp
    return gt, eq


def majority(planes, m: int, n: int | None = None):
    """Majority of ``m`` votes from their bit-sliced counter.

    Returns ``(plus, tie)``: ``plus`` has bit 1 where the "+" count is at least ``m // 2 + 1``;
    ``tie`` (only for even ``m``, else None) has bit 1 where the count is exactly ``m / 2``. If
    ``n`` is given, bits at and past ``n`` are cleared in both. ``planes`` is numpy uint64 or a
    torch int64 tensor (any device); the result is of the same kind.
    """
    gt, eq = _compare_count(planes, m // 2)  # count > m//2  <=>  count >= m//2 + 1
    tie = eq if m % 2 == 0 else None
    if n is not None and gt.shape[0]:
        mask = _word_mask(gt, _tail_mask(n))
        gt[-1] &= mask
        if tie is not None:
            tie[-1] &= mask
    return gt, tie


def disagreement(words: np.ndarray, plus: np.ndarray, tie: np.ndarray | None = None) -> int:
    """Coordinates on which a worker's bits differ from the majority (tied ones not counted)."""
    d = np.bitwise_xor(words, plus)
    if tie is not None:
        d &= ~tie
    return int(np.bitwise_count(d).sum(dtype=np.int64))
