"""The compiled CPU kernels (``mpisign/backends/_signs.c``, built by ``setup.py``): pack, unpack, apply
(and apply_decayed, Lion's), and Signum's and Lion's local steps fused with the scrub and the pack
(update_pack, lion_update_pack).

Bit for bit the numpy reference of :mod:`mpisign.backends.packing` (tested on every dtype, ragged and
unaligned), in one pass over the floats instead of two to four; SIMD (AVX2) chosen at run time,
a portable body elsewhere (``MPISIGN_SIMD=portable`` forces it). Where the extension was not
built (no C compiler at install), :func:`available` is False and the first caller logs a warning
once: the reference path is 2-6x slower, never silently. ``MPISIGN_KERNELS=reference`` turns
the compiled kernels off on purpose.

Each function takes CPU tensors and numpy words and checks them, since the kernels get raw
addresses: a wrong size is a ValueError, never a write past a buffer.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import numpy as np
import torch

from .packing import n_words

__all__ = ["available", "why_not", "simd", "pack", "unpack", "apply", "apply_decayed",
           "update_pack", "lion_update_pack", "momentum_form", "DTYPES", "APPLY_DTYPES",
           "UPDATE_DTYPES"]

log = logging.getLogger(__name__)

#: The kernels' dtype codes (mpisign/backends/_signs.c).
DTYPES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
#: apply's dtypes; half precision applies on the reference (see _signs.c).
APPLY_DTYPES = (torch.float32, torch.float64)
#: The bits of 1.0 in each dtype: unpack's |value| for a "+" bit.
_ONE_BITS = {torch.float32: 0x3F800000, torch.float64: 0x3FF0000000000000,
             torch.float16: 0x3C00, torch.bfloat16: 0x3F80}

try:
    from . import _signs
    _error = None
except ImportError as e:  # not built: no compiler at install, or a source checkout
    _signs, _error = None, e

_warned = False


def why_not() -> str | None:
    """Why the compiled kernels are off, or None when they are on."""
    if os.environ.get("MPISIGN_KERNELS", "compiled") == "reference":
        return "MPISIGN_KERNELS=reference"
    if _signs is None:
        if importlib.util.find_spec(f"{__package__}._signs") is None:
            return "the extension mpisign.backends._signs was not built (no C compiler at install?)"
        return f"the extension mpisign.backends._signs did not load ({_error})"
    return None


def available() -> bool:
    """True when the compiled kernels run; else warns once why not (see the module docstring)."""
    global _warned
    reason = why_not()
    if reason is not None and not _warned and reason != "MPISIGN_KERNELS=reference":
        _warned = True
        log.warning("compiled CPU kernels unavailable: %s. Packing and applying signs runs the "
                    "numpy reference, 2-6x slower per coordinate. Reinstall with a C compiler "
                    "(pip install -e . with gcc or clang on PATH).", reason)
    return reason is None


def simd() -> str:
    """The instruction set the kernels use here: "avx2" or "portable"."""
    return _signs.simd()


def _flat(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.device.type != "cpu" or not t.is_contiguous() or t.dtype not in DTYPES:
        raise ValueError(f"{what} must be a contiguous CPU tensor of {list(DTYPES)}, got "
                         f"{t.dtype} on {t.device}, contiguous={t.is_contiguous()}")
    return t


def _words(a, n: int, what: str):
    if a is None:
        return 0
    if not (isinstance(a, np.ndarray) and a.dtype == np.uint64 and a.ndim == 1
            and a.flags.c_contiguous and a.size >= n_words(n)):
        raise ValueError(f"{what} must be contiguous 1-D uint64 words, at least {n_words(n)}, "
                         f"got {getattr(a, 'dtype', type(a).__name__)} "
                         f"{getattr(a, 'shape', '')}")
    return a.ctypes.data


def pack(x: torch.Tensor, zero_bit: int, out: np.ndarray) -> np.ndarray:
    """:func:`mpisign.backends.packing.pack_signs` of ``x`` into ``out[:n_words(n)]`` (returned)."""
    x = _flat(x, "x")
    if zero_bit not in (0, 1):
        raise ValueError(f"zero_bit must be 0 or 1, got {zero_bit!r}")
    n = x.numel()
    if not out.flags.writeable:
        raise ValueError("out is read-only")
    _signs.pack(x.data_ptr(), DTYPES[x.dtype], n, zero_bit, _words(out, n, "out"))
    return out[: n_words(n)]


def unpack(plus: np.ndarray, tie: np.ndarray | None, out: torch.Tensor) -> torch.Tensor:
    """:func:`mpisign.backends.packing.unpack_signs` into ``out`` (its dtype, its ``numel()`` bits)."""
    out = _flat(out, "out")
    n = out.numel()
    _signs.unpack(_words(plus, n, "plus"), _words(tie, n, "tie"), n, DTYPES[out.dtype],
                  out.data_ptr(), _ONE_BITS[out.dtype])
    return out


def apply(p: torch.Tensor, plus: np.ndarray, tie: np.ndarray | None, lr: float,
          weight_decay: float = 0.0) -> None:
    """:func:`mpisign.backends.packing.apply_signs` in place, for float32 and float64 parameters: the same
    bits, every NaN written as :data:`mpisign.backends.packing.CANONICAL_NAN`."""
    p = _flat(p, "p")
    if p.dtype not in APPLY_DTYPES:
        raise ValueError(f"apply takes {APPLY_DTYPES}, got {p.dtype}")
    n = p.numel()
    _signs.apply(p.data_ptr(), DTYPES[p.dtype], n, _words(plus, n, "plus"),
                 _words(tie, n, "tie"), float(lr), float(weight_decay))


def apply_decayed(p: torch.Tensor, plus: np.ndarray, tie: np.ndarray | None, lr: float,
                  decay: float) -> None:
    """``p = p * decay - lr * v`` in place, for float32 and float64 parameters: the bits of torch's
    ``p.mul_(decay); p.add_(v, alpha=-lr)``, every NaN written as
    :data:`mpisign.backends.packing.CANONICAL_NAN`."""
    p = _flat(p, "p")
    if p.dtype not in APPLY_DTYPES:
        raise ValueError(f"apply_decayed takes {APPLY_DTYPES}, got {p.dtype}")
    n = p.numel()
    _signs.apply_decayed(p.data_ptr(), DTYPES[p.dtype], n, _words(plus, n, "plus"),
                         _words(tie, n, "tie"), float(lr), float(decay))


#: apply's and update_pack's dtypes have this in common.
UPDATE_DTYPES = APPLY_DTYPES
_forms: dict = {}


def momentum_form(dtype) -> str | None:
    """How torch rounds Signum's momentum update ``m = m * beta; m = m + alpha * g`` on this
    machine: "fused" (the add is one FMA: what ATen's vectorized CPU kernels do where the CPU
    has FMA) or "separate" (two roundings), measured once per dtype on torch itself; None if
    the kernel matches neither (then the update stays torch's)."""
    if dtype not in _forms:
        gen = torch.Generator().manual_seed(12)
        n = 1031   # not a multiple of any vector width: torch's tail loop counts too
        m0 = torch.randn(n, generator=gen, dtype=dtype)
        g = torch.randn(n, generator=gen, dtype=dtype) * 1e3
        beta, alpha = 0.9, 0.1 * 0.37
        want = m0.clone()
        torch._foreach_mul_([want], beta)
        torch._foreach_add_([want], [g], alpha=alpha)
        _forms[dtype] = None
        for form in ("fused", "separate"):
            got = m0.clone()
            _signs.update_pack(g.data_ptr(), got.data_ptr(), DTYPES[dtype], n, beta, alpha,
                               form == "fused", 0, np.empty(n_words(n), np.uint64).ctypes.data, 0)
            if torch.equal(got.view(torch.uint8), want.view(torch.uint8)):
                _forms[dtype] = form
                break
        if _forms[dtype] is None:
            log.warning("torch's momentum update rounds neither as one FMA nor as two "
                        "roundings here: Signum keeps torch's own update (one pass slower)")
    return _forms[dtype]


def _zeros_at(zeros: np.ndarray | None, n: int) -> int:
    """The address of ``zeros`` (a zero mask's words), or 0 where none is wanted."""
    return 0 if zeros is None else _words(zeros, n, "zeros")


def update_pack(g: torch.Tensor, m: torch.Tensor | None, beta: float, alpha: float,
                zero_bit: int, out: np.ndarray, zeros: np.ndarray | None = None) -> int:
    """Signum's local step for one parameter in one pass: non-finite entries of ``g`` count and
    vote as 0; ``m = m * beta + alpha * g`` as torch rounds it (:func:`momentum_form`, which
    must not be None); the signs of ``m`` (or of ``g`` when ``m`` is None) into ``out``, and,
    where ``zeros`` is given, its zero mask there (bit 1: the value is exactly 0, so it casts no
    vote). Returns the number of non-finite entries of ``g``."""
    g = _flat(g, "g")
    if g.dtype not in UPDATE_DTYPES:
        raise ValueError(f"update_pack takes {UPDATE_DTYPES}, got {g.dtype}")
    if m is not None and (_flat(m, "m").dtype != g.dtype or m.numel() != g.numel()):
        raise ValueError(f"m must match g: {m.dtype}[{m.numel()}] vs {g.dtype}[{g.numel()}]")
    if zero_bit not in (0, 1):
        raise ValueError(f"zero_bit must be 0 or 1, got {zero_bit!r}")
    n = g.numel()
    fused = momentum_form(g.dtype) == "fused"
    return _signs.update_pack(g.data_ptr(), 0 if m is None else m.data_ptr(), DTYPES[g.dtype],
                              n, float(beta), float(alpha), fused, zero_bit,
                              _words(out, n, "out"), _zeros_at(zeros, n))


def lion_update_pack(g: torch.Tensor, m: torch.Tensor, betas: tuple, alphas: tuple, zero_bit: int,
                     out: np.ndarray, zeros: np.ndarray | None = None) -> int:
    """Lion's local step for one parameter in one pass: non-finite entries of ``g`` count and
    vote as 0; the signs of ``c = m * b1 + a1 * g`` into ``out`` (and its zero mask into ``zeros``,
    as :func:`update_pack`); ``m = m * b2 + a2 * g``; each
    add rounded as torch rounds it (:func:`momentum_form`, which must not be None). Returns the
    number of non-finite entries of ``g``."""
    g, m = _flat(g, "g"), _flat(m, "m")
    if g.dtype not in UPDATE_DTYPES:
        raise ValueError(f"lion_update_pack takes {UPDATE_DTYPES}, got {g.dtype}")
    if m.dtype != g.dtype or m.numel() != g.numel():
        raise ValueError(f"m must match g: {m.dtype}[{m.numel()}] vs {g.dtype}[{g.numel()}]")
    if zero_bit not in (0, 1):
        raise ValueError(f"zero_bit must be 0 or 1, got {zero_bit!r}")
    n = g.numel()
    fused = momentum_form(g.dtype) == "fused"
    (b1, b2), (a1, a2) = betas, alphas
    return _signs.lion_update_pack(g.data_ptr(), m.data_ptr(), DTYPES[g.dtype], n, float(b1),
                                   float(a1), float(b2), float(a2), fused, zero_bit,
                                   _words(out, n, "out"), _zeros_at(zeros, n))
