"""The GPU path: ``signs.cu`` compiled by CuPy (``RawModule``, NVRTC) and run on torch CUDA tensors.

Tensors reach CuPy through DLPack, zero copy, each first viewed as a plain integer dtype of its
element size (DLPack has no bool, and not every stack exchanges bfloat16 or uint64) and
reinterpreted on the CuPy side. Words are uint64 tensors in the wire format of
:mod:`mpisign.packing`; the functions mirror :mod:`mpisign.cuda.emulate` one for one.

Streams: every kernel is queued on torch's current stream of its device (a CuPy
``ExternalStream``), so it is ordered with the torch work around it, and nothing here waits on
the device. A caller that hands an output to MPI must synchronize first
(:func:`mpisign.cuda.aware.sync_for_mpi`).

Self-check: :func:`available` runs :func:`self_check` once per device, which compares every
kernel with :mod:`mpisign.packing` on small random inputs (ragged lengths, zeros, NaN, inf,
subnormals); on any mismatch or error it logs an ERROR and returns False, and callers take the
CPU reference path instead. The same comparison runs here without a GPU, on the emulated
kernels (:func:`compare_with_reference` with ``backend=emulate``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from mpisign import packing

__all__ = ["SOURCE_PATH", "NVRTC_OPTIONS", "available", "self_check", "compare_with_reference",
           "pack", "tally", "apply", "disagreement"]

log = logging.getLogger(__name__)

SOURCE_PATH = Path(__file__).resolve().parent / "signs.cu"
# No fused multiply-add, no flush to zero: apply must round exactly like the CPU reference.
NVRTC_OPTIONS = ("--fmad=false", "--ftz=false")
_THREADS = 256
_MAX_BLOCKS = 65535
_MAX_WORKERS = 65535  # MAX_PLANES = 16 in signs.cu
_SUFFIX = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
_INT_OF_SIZE = {2: torch.int16, 4: torch.int32, 8: torch.int64}
_DEVICE_TYPE = "cuda"  # tests run this module's glue on CPU tensors with a stand-in for CuPy
_checked: dict[int, bool] = {}
_warned_no_cupy = False


# ---- launching ------------------------------------------------------------------------------

def _cupy():
    import cupy  # imported late: the package works without CuPy
    return cupy


@functools.lru_cache(maxsize=None)
def _module(device_index: int):
    cp = _cupy()
    with cp.cuda.Device(device_index):
        return cp.RawModule(code=SOURCE_PATH.read_text(), options=NVRTC_OPTIONS)


def _external_stream(cp, stream, device_index: int):
    """CuPy's view of torch's ``stream``. ``Stream.from_external`` (CuPy >= 14) takes an object
    with ``__cuda_stream__``, which torch's streams have from 2.10 on; otherwise (older torch,
    or older CuPy) ``ExternalStream`` takes the raw handle. Both ask for what each library has,
    not for version numbers."""
    if hasattr(cp.cuda.Stream, "from_external") and hasattr(stream, "__cuda_stream__"):
        return cp.cuda.Stream.from_external(stream)
    if hasattr(cp.cuda, "ExternalStream"):
        return cp.cuda.ExternalStream(stream.cuda_stream, device_index)
    raise RuntimeError("this CuPy has no ExternalStream and this torch's streams have no "
                       "__cuda_stream__ (torch >= 2.10): upgrade torch, or use CuPy < 14")


@contextlib.contextmanager
def _on(device: torch.device):
    """CuPy on ``device``, queuing on torch's current stream there."""
    cp = _cupy()
    cp_stream = _external_stream(cp, torch.cuda.current_stream(device), device.index)
    with cp.cuda.Device(device.index), cp_stream:
        yield cp


def _view(cp, t: torch.Tensor, dtype):
    """Zero-copy CuPy array of contiguous ``t``'s bytes, as ``dtype``."""
    a = cp.from_dlpack(t.view(_INT_OF_SIZE[t.element_size()])).view(dtype)
    if t.numel() and a.data.ptr != t.data_ptr():  # a copy would silently drop the kernel's writes
        raise RuntimeError("DLPack exchange copied the tensor instead of sharing it")
    return a


def _launch(device: torch.device, name: str, grid: tuple, args: tuple) -> None:
    fn = _module(device.index).get_function(name)
    fn(grid, (_THREADS,), args)


def _blocks(work_threads: int) -> int:
    return max(1, min(_MAX_BLOCKS, -(-work_threads // _THREADS)))


def _cuda(t, name: str, dtypes=None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.device.type != _DEVICE_TYPE or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous CUDA tensor")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name} must be one of {sorted(map(str, dtypes))}, got {t.dtype}")
    return t


def _words(t, name: str, min_words: int = 0) -> torch.Tensor:
    t = _cuda(t, name, (torch.uint64, torch.int64))
    if t.shape[-1] < min_words:
        raise ValueError(f"{name} needs >= {min_words} words, got {t.shape[-1]}")
    return t


def votes_shape(shape) -> tuple[int, int]:
    """``(M, W)`` of an M x W votes array, 1 <= M <= the kernels' worker limit, else ValueError.
    Shared by this module and :mod:`.emulate`, which take the same arguments."""
    shape = tuple(shape)
    if len(shape) != 2 or not 1 <= shape[0] <= _MAX_WORKERS:
        raise ValueError(f"votes must be M x W with 1 <= M <= {_MAX_WORKERS}, got {shape}")
    return shape


def bits_in(n: int | None, w: int) -> int:
    """``n`` (default: every bit of ``w`` words), checked to fit in ``w`` words."""
    n = 64 * w if n is None else n
    if not 0 <= n <= 64 * w:
        raise ValueError(f"n must be in 0..{64 * w} for {w} words, got {n}")
    return n


# ---- the four kernels -----------------------------------------------------------------------

def pack(x: torch.Tensor, zero_bit: int = 0, out: torch.Tensor | None = None) -> torch.Tensor:
    """Sign words of ``x`` (flattened) as a uint64 CUDA tensor, bit for bit
    :func:`mpisign.packing.pack_signs`; ``out`` (>= n_words words) is filled if given."""
    if zero_bit not in (0, 1):
        raise ValueError(f"zero_bit must be 0 or 1, got {zero_bit!r}")
    flat = _cuda(x, "x", _SUFFIX).reshape(-1)
    n, w = flat.numel(), packing.n_words(flat.numel())
    out = torch.empty(w, dtype=torch.uint64, device=x.device) if out is None else _words(out, "out", w)[:w]
    if n:
        with _on(x.device) as cp:
            elem = cp.uint32 if flat.element_size() == 4 else cp.uint16
            args = (_view(cp, flat, elem), np.uint64(n), np.int32(zero_bit), _view(cp, out, cp.uint32))
            _launch(x.device, f"pack_{_SUFFIX[flat.dtype]}", (_blocks(64 * w),), args)
    return out


def tally(votes: torch.Tensor, n: int):
    """Majority of ``votes`` (M x W words): ``(plus, tie)`` uint64 CUDA tensors, as
    :func:`mpisign.packing.majority` of :func:`mpisign.packing.tally` (tie is None for odd M)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    votes = _words(votes, "votes", packing.n_words(n))
    m, w = votes_shape(votes.shape)
    plus = torch.empty(w, dtype=torch.uint64, device=votes.device)
    tie = torch.empty_like(plus)
    if w:
        with _on(votes.device) as cp:
            args = (_view(cp, votes, cp.uint32), np.uint32(m), np.uint64(2 * w), np.uint64(n),
                    _view(cp, plus, cp.uint32), _view(cp, tie, cp.uint32))
            _launch(votes.device, "tally_majority", (_blocks(2 * w),), args)
    return plus, (tie if m % 2 == 0 else None)


def apply(p: torch.Tensor, plus: torch.Tensor, tie: torch.Tensor | None, lr: float,
          wd: float = 0.0) -> torch.Tensor:
    """In place: ``p = p - lr * (v + wd * p)`` in float32 (lr, wd rounded to float32), with
    v = +1 / -1 from ``plus`` and 0 where ``tie``; no float temporary. Returns ``p``."""
    p = _cuda(p, "p", _SUFFIX)
    n = p.numel()
    plus = _words(plus, "plus", packing.n_words(n))
    tie = None if tie is None else _words(tie, "tie", packing.n_words(n))
    if n:
        with _on(p.device) as cp:
            elem = cp.float32 if p.element_size() == 4 else cp.uint16
            plus_c = _view(cp, plus, cp.uint32)
            tie_c = plus_c if tie is None else _view(cp, tie, cp.uint32)
            args = (_view(cp, p.reshape(-1), elem), plus_c, tie_c, np.int32(tie is not None),
                    np.uint64(n), np.float32(lr), np.float32(wd))
            _launch(p.device, f"apply_{_SUFFIX[p.dtype]}", (_blocks(n),), args)
    return p


def disagreement(votes: torch.Tensor, plus: torch.Tensor, tie: torch.Tensor | None = None,
                 n: int | None = None) -> torch.Tensor:
    """Per worker: coordinates (of the first ``n``) where its bits differ from ``plus``, ties
    excluded; an int64 CUDA tensor of M counts."""
    votes = _words(votes, "votes")
    m, w = votes_shape(votes.shape)
    n = bits_in(n, w)
    plus = _words(plus, "plus", w)
    tie = None if tie is None else _words(tie, "tie", w)
    counts = torch.zeros(m, dtype=torch.int64, device=votes.device)
    if w:
        with _on(votes.device) as cp:
            plus_c = _view(cp, plus, cp.uint32)
            tie_c = plus_c if tie is None else _view(cp, tie, cp.uint32)
            args = (_view(cp, votes, cp.uint32), np.uint32(m), np.uint64(2 * w), np.uint64(n), plus_c,
                    tie_c, np.int32(tie is not None), _view(cp, counts, cp.uint64))
            _launch(votes.device, "disagreement", (_blocks(2 * w), min(m, 65535)), args)
    return counts


# ---- checking against the CPU reference -----------------------------------------------------

def _special_floats(n: int, gen: torch.Generator) -> torch.Tensor:
    """Random float32 with zeros, -0, NaN, +-inf and subnormals mixed in."""
    x = torch.randn(n, generator=gen)
    specials = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-40, -1e-40])
    pick = torch.randint(0, 4 * len(specials), (n,), generator=gen)
    hit = pick < len(specials)
    x[hit] = specials[pick[hit]]
    return x


def _host(a) -> np.ndarray:
    return a.cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def _same_floats(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical, except that any NaN equals any NaN."""
    both_nan = torch.isnan(a.float()) & torch.isnan(b.float())
    ia, ib = (t.view(_INT_OF_SIZE[t.element_size()]) for t in (a, b))
    return bool(((ia == ib) | both_nan).all())


def _reference_apply(p: torch.Tensor, plus, tie, lr: float, wd: float) -> torch.Tensor:
    v = packing.unpack_signs(plus, p.numel()).numpy()
    if tie is not None:  # v = +0.0 at a tie, as the kernel has it
        v[packing.unpack_signs(tie, p.numel()).numpy() > 0] = 0.0
    x = p.float().numpy()
    with np.errstate(all="ignore"):
        new = x - np.float32(lr) * (v + np.float32(wd) * x if wd else v)
    return torch.from_numpy(new).to(p.dtype)


def compare_with_reference(backend=None, device="cuda", seed: int = 0) -> list[str]:
    """Run ``backend``'s pack/tally/apply/disagreement (this module by default) on ``device``
    with small random inputs; return what disagrees with :mod:`mpisign.packing` (empty: all)."""
    backend = sys.modules[__name__] if backend is None else backend
    gen = torch.Generator().manual_seed(seed)
    bad = []
    for n in (1, 31, 65, 1000, 4099):
        x = _special_floats(n, gen)
        for dtype in _SUFFIX:
            for zb in (0, 1):
                got = _host(backend.pack(x.to(dtype).to(device), zb))
                if not np.array_equal(got, packing.pack_signs(x.to(dtype), zb)):
                    bad.append(f"pack {dtype} n={n} zero_bit={zb}")
        for m in (1, 2, 3, 4, 7):
            votes = np.stack([packing.pack_signs(_special_floats(n, gen), r % 2) for r in range(m)])
            dev_votes = torch.from_numpy(votes).to(device)
            plus, tie = backend.tally(dev_votes, n)
            want_plus, want_tie = packing.majority(packing.tally(votes), m, n)
            if not np.array_equal(_host(plus), want_plus) or (tie is None) != (want_tie is None) or (
                    tie is not None and not np.array_equal(_host(tie), want_tie)):
                bad.append(f"tally m={m} n={n}")
                continue
            counts = _host(backend.disagreement(dev_votes, plus, tie, n))
            if list(counts) != [packing.disagreement(v, want_plus, want_tie) for v in votes]:
                bad.append(f"disagreement m={m} n={n}")
            if m in (3, 4):
                for dtype in _SUFFIX:
                    p = x.to(dtype)
                    want = _reference_apply(p, want_plus, want_tie, 0.01, 0.1)
                    got = backend.apply(p.to(device, copy=True), plus, tie, 0.01, 0.1)
                    if not _same_floats(got.cpu(), want):
                        bad.append(f"apply {dtype} m={m} n={n}")
    return bad


def self_check(device=None, *, backend=None) -> bool:
    """Compare the kernels with the CPU reference on ``device`` (once per CUDA device); on any
    mismatch or error log an ERROR and return False, so the caller falls back to the CPU path.

    ``backend`` (e.g. :mod:`mpisign.cuda.emulate` with ``device="cpu"``) checks another
    implementation of the same functions instead, uncached: this is how the check is tested."""
    device = torch.device("cuda" if device is None else device)
    if backend is None and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if backend is None and device.index in _checked:
        return _checked[device.index]
    try:
        bad = compare_with_reference(backend, device)
    except Exception as exc:  # a compile or launch error is a failed check, not a crash
        bad = [f"{type(exc).__name__}: {exc}"]
    if bad:
        log.error("GPU sign kernels on %s DISAGREE with the CPU reference (%d cases: %s); "
                  "falling back to the CPU reference path", device, len(bad), "; ".join(bad[:4]))
    else:
        log.info("GPU sign kernels on %s agree with the CPU reference", device)
    if backend is None:
        _checked[device.index] = not bad
    return not bad


def available(device=None) -> bool:
    """True when CUDA tensors on ``device`` can take the GPU kernels: CUDA, CuPy, self-check."""
    global _warned_no_cupy
    if not torch.cuda.is_available():
        return False
    try:
        _cupy()
    except ImportError:
        if not _warned_no_cupy:
            log.warning("CuPy is not installed: CUDA tensors take the CPU reference path "
                        "(pip install cupy-cuda12x or cupy-cuda13x to use the GPU kernels)")
            _warned_no_cupy = True
        return False
    return self_check(device)
