"""The GPU path: ``signs.cu`` compiled by CuPy (``RawModule``, NVRTC) and run on torch CUDA tensors.

Tensors reach CuPy through DLPack, zero copy, each first viewed as a plain integer dtype of its
element size (DLPack has no bool, and not every stack exchanges bfloat16 or uint64) and
reinterpreted on the CuPy side. Words are uint64 tensors in the wire format of
:mod:`mpisign.backends.packing`; the functions mirror :mod:`mpisign.cuda.emulate` one for one.

Streams: every kernel is queued on torch's current stream of its device (a CuPy
``ExternalStream``), so it is ordered with the torch work around it, and nothing here waits on
the device. A caller that hands an output to MPI must synchronize first
(:func:`mpisign.cuda.aware.sync_for_mpi`).

Self-check: :func:`available` runs :func:`self_check` once per device, which compares every
kernel with :mod:`mpisign.backends.packing` on small random inputs (ragged lengths, zeros, NaN, inf,
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

from ..backends import packing

__all__ = ["SOURCE_PATH", "NVRTC_OPTIONS", "available", "self_check", "compare_with_reference",
           "pack", "tally", "apply", "disagreement", "apply_decayed", "lion_update_pack"]

log = logging.getLogger(__name__)

SOURCE_PATH = Path(__file__).resolve().parent / "signs.cu"
# No fused multiply-add, no flush to zero: apply must round exactly like the CPU reference
# (lion_update_pack's FMA, where torch's rounding has one, is an explicit __fmaf_rn).
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


_streams: dict = {}   # (device index, torch stream handle) -> CuPy's view of that stream
_MAX_STREAMS = 256    # torch's pools hold 32 streams per priority per device


def _cupy_stream(cp, stream, device_index: int):
    """:func:`_external_stream`, made once per torch stream (by its handle) and reused: a
    kernel call builds no wrapper. A wrapper owns nothing, so a handle torch reuses for a new
    stream is still that stream."""
    key = (device_index, stream.cuda_stream)
    cached = _streams.get(key)
    if cached is None:
        if len(_streams) >= _MAX_STREAMS:
            _streams.clear()
        cached = _streams[key] = _external_stream(cp, stream, device_index)
    return cached


@functools.lru_cache(maxsize=None)
def _cupy_device(device_index: int):
    return _cupy().cuda.Device(device_index)


@contextlib.contextmanager
def _on(device: torch.device):
    """CuPy on ``device``, queuing on torch's current stream there (device and stream objects
    made once each)."""
    cp = _cupy()
    with _cupy_device(device.index), _cupy_stream(cp, torch.cuda.current_stream(device),
                                                  device.index):
        yield cp


def _view(cp, t: torch.Tensor, dtype):
    """Zero-copy CuPy array of contiguous ``t``'s bytes, as ``dtype``."""
    a = cp.from_dlpack(t.view(_INT_OF_SIZE[t.element_size()])).view(dtype)
    if t.numel() and a.data.ptr != t.data_ptr():  # a copy would silently drop the kernel's writes
        raise RuntimeError("DLPack exchange copied the tensor instead of sharing it")
    return a


@functools.lru_cache(maxsize=None)
def _function(device_index: int, name: str):
    """The compiled kernel ``name`` on a device, looked up once."""
    return _module(device_index).get_function(name)


def _launch(device: torch.device, name: str, grid: tuple, args: tuple) -> None:
    _function(device.index, name)(grid, (_THREADS,), args)


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


# ---- the kernels ----------------------------------------------------------------------------

def pack(x: torch.Tensor, zero_bit: int = 0, out: torch.Tensor | None = None) -> torch.Tensor:
    """Sign words of ``x`` (flattened) as a uint64 CUDA tensor, bit for bit
    :func:`mpisign.backends.packing.pack_signs`; ``out`` (>= n_words words) is filled if given."""
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
    :func:`mpisign.backends.packing.majority` of :func:`mpisign.backends.packing.tally` (tie is None for odd M)."""
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


def _apply_vote(kernel: str, p: torch.Tensor, plus, tie, lr: float, x: float) -> torch.Tensor:
    """Launch ``kernel``_<dtype> (apply or apply_decayed) on ``p`` with the vote and two floats."""
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
                    np.uint64(n), np.float32(lr), np.float32(x))
            _launch(p.device, f"{kernel}_{_SUFFIX[p.dtype]}", (_blocks(n),), args)
    return p


def apply(p: torch.Tensor, plus: torch.Tensor, tie: torch.Tensor | None, lr: float,
          wd: float = 0.0) -> torch.Tensor:
    """In place: ``p = p - lr * (v + wd * p)`` in float32 (lr, wd rounded to float32), with
    v = +1 / -1 from ``plus`` and 0 where ``tie``; no float temporary. Returns ``p``."""
    return _apply_vote("apply", p, plus, tie, lr, wd)


def apply_decayed(p: torch.Tensor, plus: torch.Tensor, tie: torch.Tensor | None, lr: float,
                  decay: float) -> torch.Tensor:
    """In place: ``p = p * decay - lr * v`` (decoupled weight decay), rounded as torch's
    ``p.mul_(decay)`` then ``p.add_(v, alpha=-lr)`` on the GPU (decay, lr as float32; the
    product rounded to p's dtype first), every NaN the canonical one. Returns ``p``."""
    return _apply_vote("apply_decayed", p, plus, tie, lr, decay)


def lion_update_pack(g: torch.Tensor, m: torch.Tensor, beta1: float, alpha1: float,
                     beta2: float, alpha2: float, zero_bit: int, fused: bool,
                     out: torch.Tensor | None = None, nonfinite: torch.Tensor | None = None):
    """Lion's local step for one float32 parameter, in one pass on the current stream: the
    signs of ``c = m * beta1 + alpha1 * g`` into ``out`` (>= n_words words; 0 as
    ``zero_bit``), then ``m = m * beta2 + alpha2 * g`` in place, non-finite entries of ``g``
    taken as 0 and counted into ``nonfinite`` (a 1-element int64 tensor of the device, added
    to, not read: reading it waits for the device). ``fused``: the adds as one FMA each, else
    two roundings (:func:`mpisign.cuda.torch_check.lion_form` says which torch does). Returns
    ``(words, nonfinite)``: the n_words words of ``out`` and the counter, new where not given."""
    if zero_bit not in (0, 1):
        raise ValueError(f"zero_bit must be 0 or 1, got {zero_bit!r}")
    g, m = _cuda(g, "g", (torch.float32,)), _cuda(m, "m", (torch.float32,))
    if m.shape != g.shape or m.device != g.device:
        raise ValueError(f"m must be g's shape on g's device: {tuple(m.shape)} on {m.device} "
                         f"vs {tuple(g.shape)} on {g.device}")
    n, w = g.numel(), packing.n_words(g.numel())
    if out is None:
        out = torch.empty(w, dtype=torch.uint64, device=g.device)
    out = _words(out, "out", w)[:w]
    if nonfinite is None:
        nonfinite = torch.zeros(1, dtype=torch.int64, device=g.device)
    nonfinite = _cuda(nonfinite, "nonfinite", (torch.int64, torch.uint64))
    if nonfinite.numel() != 1 or {out.device, nonfinite.device} != {g.device}:
        raise ValueError("out and the 1-element nonfinite counter must be on g's device")
    if n:
        with _on(g.device) as cp:
            args = (_view(cp, g.reshape(-1), cp.float32), _view(cp, m.reshape(-1), cp.float32),
                    np.uint64(n), np.float32(beta1), np.float32(alpha1), np.float32(beta2),
                    np.float32(alpha2), np.int32(bool(fused)), np.int32(zero_bit),
                    _view(cp, out, cp.uint32), _view(cp, nonfinite.reshape(-1), cp.uint64))
            _launch(g.device, "lion_update_pack_f32", (_blocks(64 * w),), args)
    return out, nonfinite


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
    """Random float32 with zeros, -0, NaN (either sign, with payloads, quiet and signalling),
    +-inf and subnormals mixed in."""
    x = torch.randn(n, generator=gen)
    nans = torch.tensor([0x7FC0_0000, 0x7FC0_1234, -0x0040_0001, 0x7F80_0001],   # -: 0xffbfffff
                        dtype=torch.int32).view(torch.float32)
    specials = torch.cat([torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-40, -1e-40]),
                          nans])
    pick = torch.randint(0, 4 * len(specials), (n,), generator=gen)
    hit = pick < len(specials)
    x[hit] = specials[pick[hit]]
    return x


def _host(a) -> np.ndarray:
    return a.cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def _same_floats(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical, NaN included: apply writes one NaN (:data:`packing.CANONICAL_NAN`)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    ia, ib = (t.view(_INT_OF_SIZE[t.element_size()]) for t in (a, b))
    return torch.equal(ia, ib)


def _reference_apply(p: torch.Tensor, plus, tie, lr: float, wd: float) -> torch.Tensor:
    v = packing.unpack_signs(plus, p.numel()).numpy()
    if tie is not None:  # v = +0.0 at a tie, as the kernel has it
        v[packing.unpack_signs(tie, p.numel()).numpy() > 0] = 0.0
    x = p.float().numpy()
    with np.errstate(all="ignore"):
        new = x - np.float32(lr) * (v + np.float32(wd) * x if wd else v)
    out = torch.from_numpy(new).to(p.dtype)
    nan = torch.from_numpy(np.isnan(new))  # whatever NaN numpy made: the kernel writes just one
    out.view(_INT_OF_SIZE[out.element_size()])[nan] = packing.CANONICAL_NAN[p.dtype]
    return out


def compare_with_reference(backend=None, device="cuda", seed: int = 0) -> list[str]:
    """Run ``backend``'s pack/tally/apply/disagreement (this module by default) on ``device``
    with small random inputs; return what disagrees with :mod:`mpisign.backends.packing` (empty: all)."""
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


@contextlib.contextmanager
def _side_stream(device: torch.device):
    """A non-default stream of ``device`` as torch's current one (nothing for CPU stand-ins):
    the optimizer runs wherever the caller's stream is, so the check must too."""
    if device.type != "cuda":
        yield
        return
    with torch.cuda.stream(torch.cuda.Stream(device)):
        yield


@contextlib.contextmanager
def _grid_cap(blocks: int):
    """Launch at most ``blocks`` blocks, so every kernel's grid-stride loop takes turns."""
    global _MAX_BLOCKS
    saved, _MAX_BLOCKS = _MAX_BLOCKS, blocks
    try:
        yield
    finally:
        _MAX_BLOCKS = saved


_POISON_WORD = -0x5A5A_A5A5_0BAD_F00D   # in words no kernel may write


def _poisoned(n: int, device) -> torch.Tensor:
    return torch.full((n,), _POISON_WORD, dtype=torch.int64, device=device)


def _compare_offsets(device: torch.device, gen: torch.Generator, n: int) -> list[str]:
    """As the optimizer lays them out: words packed into, and read from, slices at non-zero
    offsets of larger buffers; parameters that are slices of a larger tensor; ``wd`` = 0 and
    > 0; and the unpack (:func:`mpisign.backends.signs.unpack_by_apply`, apply on zeros)."""
    from ..backends.base import unpack_by_apply  # the GPU paths' unpack
    bad, w = [], packing.n_words(n)
    x = _special_floats(n, gen)
    votes = np.stack([packing.pack_signs(_special_floats(n, gen), r % 2) for r in range(4)])
    plus, tie = packing.majority(packing.tally(votes), 4, n)
    words = _poisoned(3 * w + 8, device)   # [3: 3+w] plus, [w+5: 2w+5] tie, [2w+7:] packed
    words[3:3 + w] = torch.from_numpy(plus.view(np.int64)).to(device)
    words[w + 5: 2 * w + 5] = torch.from_numpy(tie.view(np.int64)).to(device)
    dev_plus, dev_tie = words[3:3 + w], words[w + 5: 2 * w + 5]
    for dtype in _SUFFIX:
        packed = words[2 * w + 7: 3 * w + 7]
        pack(x.to(dtype).to(device), 1, out=packed)
        if not np.array_equal(_host(packed).view(np.uint64), packing.pack_signs(x.to(dtype), 1)):
            bad.append(f"pack into words at an offset, {dtype} n={n}")
        for wd in (0.0, 0.1):
            big = torch.cat([torch.full((5,), 7.0), x, torch.full((3,), 9.0)]).to(dtype)
            dev = big.to(device, copy=True)
            apply(dev[5:5 + n], dev_plus, dev_tie, 0.01, wd)
            want = big.clone()
            want[5:5 + n] = _reference_apply(big[5:5 + n], plus, tie, 0.01, wd)
            if not _same_floats(dev.cpu(), want):
                bad.append(f"apply at an offset, {dtype} n={n} wd={wd}")
        got = unpack_by_apply(apply, dev_plus, dev_tie, n, x.to(dtype).to(device))
        if not _same_floats(got.cpu(), packing.unpack_signs(plus, n, tie, dtype=dtype)):
            bad.append(f"unpack {dtype} n={n}")
    guards = [*range(3), 3 + w, 4 + w, 2 * w + 5, 2 * w + 6, 3 * w + 7]
    if set(_host(words[guards]).tolist()) != {_POISON_WORD}:
        bad.append("a kernel wrote outside its words")
    return bad


def compare_real_paths(device="cuda", seed: int = 1) -> list[str]:
    """What training runs beyond :func:`compare_with_reference`'s small cases, all on a side
    stream: every kernel with a grid of 3 blocks (their grid-stride loops), a pack and an apply
    past the full grid of ``_THREADS * _MAX_BLOCKS`` threads, and words and parameters at
    offsets with the unpack (:func:`_compare_offsets`). Empty: all agree."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    with _side_stream(device):
        with _grid_cap(3):
            bad = [f"3 blocks: {b}" for b in compare_with_reference(None, device, seed)]
        bad += _compare_offsets(device, gen, 4099)
        n = _THREADS * _MAX_BLOCKS + 65   # one grid of threads, and a ragged word past it
        x = torch.randn(n, generator=gen)
        if not np.array_equal(_host(pack(x.to(device))), packing.pack_signs(x)):
            bad.append(f"pack n={n}")
        plus = packing.pack_signs(torch.randn(n, generator=gen))
        got = apply(x.to(device, copy=True), torch.from_numpy(plus.view(np.int64)).to(device),
                    None, 0.5)
        if not _same_floats(got.cpu(), _reference_apply(x, plus, None, 0.5, 0.0)):
            bad.append(f"apply n={n}")
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
        if backend is None or backend is sys.modules[__name__]:
            bad += compare_real_paths(device)
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
