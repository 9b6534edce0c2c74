"""The CUDA kernels of ``signs.cu``, run on the CPU through the host shim.

``host_driver.cpp`` includes ``host_shim.h`` and then ``signs.cu``, the very source that
:mod:`mpisign.cuda.kernels` hands to CuPy on a GPU; g++ builds it into a shared library (cached
by a hash of the sources, the flags and the compiler) that this module calls through ctypes. The
functions take numpy arrays or CPU torch tensors and mirror :mod:`mpisign.cuda.kernels`: words
are uint64 in the wire format of :mod:`mpisign.backends.packing`. Each output buffer carries a guard word
past its end that the call checks, so a kernel writing out of bounds fails here, and starts out
filled with a poison pattern, so a word the kernel should write but skips shows up.

``threads`` (per block, a multiple of 32) and ``blocks`` choose the launch; the default grid is
deliberately small so the kernels' grid-stride loops are exercised.

:func:`kernels_on_cpu` goes one layer up: :mod:`mpisign.cuda.kernels` itself (argument checks,
DLPack views, launch arguments) with its launches run by the shim on CPU tensors, so the GPU
path of the optimizer and the collectives runs end to end, over real MPI, on a machine without
a GPU.

How the shim runs a kernel: each CUDA thread runs as a ucontext fiber; a block's fibers take
turns, and a fiber yields only inside a warp primitive, until all 32 lanes of its warp have
arrived. Kernels therefore run
unchanged (no per-warp rewriting that the GPU build would not share), ballots and shuffles see
exactly the lanes' values, and a lane that skips a warp primitive is reported as a deadlock
instead of passing silently. Threads or per-warp loops were the alternatives: OS threads would
need a barrier per primitive and bring scheduling noise for no gain in faithfulness; per-warp
loops would make the kernels a different program from the one the GPU runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..backends import packing
from .kernels import bits_in, votes_shape

__all__ = ["compiler", "load", "pack", "tally", "apply", "apply_decayed", "lion_update_pack",
           "disagreement", "kernels_on_cpu"]

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
SOURCES = ("signs.cu", "host_shim.h", "host_driver.cpp")
FLAGS = ("-O2", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off", "-Wall", "-Wno-unknown-pragmas")
_GUARD = np.uint64(0xA5A5_5A5A_DEAD_BEEF)
_POISON = np.uint64(0x5A5A_A5A5_0BAD_F00D)

_P, _U64, _U32, _I32, _F32 = ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_int, ctypes.c_float
_ARGTYPES = {
    "run_pack_f32": [_U32, _U32, _P, _U64, _I32, _P],
    "run_pack_f16": [_U32, _U32, _P, _U64, _I32, _P],
    "run_pack_bf16": [_U32, _U32, _P, _U64, _I32, _P],
    "run_tally_majority": [_U32, _U32, _P, _U32, _U64, _U64, _P, _P],
    "run_apply_f32": [_U32, _U32, _P, _P, _P, _I32, _U64, _F32, _F32],
    "run_apply_f16": [_U32, _U32, _P, _P, _P, _I32, _U64, _F32, _F32],
    "run_apply_bf16": [_U32, _U32, _P, _P, _P, _I32, _U64, _F32, _F32],
    "run_apply_decayed_f32": [_U32, _U32, _P, _P, _P, _I32, _U64, _F32, _F32],
    "run_apply_decayed_f16": [_U32, _U32, _P, _P, _P, _I32, _U64, _F32, _F32],
    "run_apply_decayed_bf16": [_U32, _U32, _P, _P, _P, _I32, _U64, _F32, _F32],
    "run_lion_update_pack_f32": [_U32, _U32, _P, _P, _U64, _F32, _F32, _F32, _F32, _I32, _I32, _P, _P],
    "run_disagreement": [_U32, _U32, _U32, _P, _U32, _U64, _U64, _P, _P, _I32, _P],
}
_SUFFIX = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def compiler() -> str | None:
    """The C++ compiler used for the shim: ``$CXX`` or g++ on PATH (None if there is none)."""
    return os.environ.get("CXX") or shutil.which("g++")


@functools.lru_cache(maxsize=None)
def load() -> ctypes.CDLL:
    """Build (once per source hash) and load the shim library."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler: install g++ or set CXX to run the emulated kernels")
    h = hashlib.sha256(" ".join((cxx,) + FLAGS).encode())
    for name in SOURCES:
        h.update((HERE / name).read_bytes())
    default_cache = Path(tempfile.gettempdir()) / f"mpisign-{os.getuid()}"
    cache = Path(os.environ.get("MPISIGN_CACHE_DIR") or default_cache)
    cache.mkdir(parents=True, exist_ok=True)
    lib_path = cache / f"signs_shim_{h.hexdigest()[:16]}.so"
    if not lib_path.exists():
        tmp = lib_path.with_suffix(f".{os.getpid()}.tmp")
        cmd = [cxx, *FLAGS, "-I", str(HERE), str(HERE / "host_driver.cpp"), "-o", str(tmp)]
        log.info("building the kernel host shim: %s", " ".join(cmd))
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"building the host shim failed:\n{done.stderr}")
        os.replace(tmp, lib_path)  # atomic: concurrent builders never see half a file
    lib = ctypes.CDLL(str(lib_path))
    for name, argtypes in _ARGTYPES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, ctypes.c_int
    lib.shim_last_error.restype = ctypes.c_char_p
    return lib


def _run(name: str, *args) -> None:
    lib = load()
    if getattr(lib, name)(*args) != 0:
        raise RuntimeError(f"{name}: {lib.shim_last_error().decode()}")


def _grid(work_threads: int, threads: int, blocks: int | None) -> tuple[int, int]:
    if threads <= 0 or threads % 32 or threads > 1024:
        raise ValueError(f"threads must be a multiple of 32 in 32..1024, got {threads}")
    if blocks is None:
        blocks = min(3, -(-work_threads // threads))
    return max(1, blocks), threads


def _floats(x) -> tuple[torch.Tensor, str]:
    """A flat contiguous CPU tensor view of ``x`` (numpy array or tensor) and its kernel suffix."""
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    if t.device.type != "cpu" or t.dtype not in _SUFFIX:
        raise ValueError(f"expected a CPU float32/float16/bfloat16 array, got {t.dtype} on {t.device}")
    return t.detach().reshape(-1), _SUFFIX[t.dtype]


def _words(a, name: str, min_words: int = 0) -> np.ndarray:
    """uint64 words of a numpy array or CPU tensor, C-contiguous, no copy of uint64/int64 input."""
    a = a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    if a.dtype.itemsize != 8 or a.dtype.kind not in "iu" or not a.flags.c_contiguous:
        raise ValueError(f"{name} must be a C-contiguous array of 64-bit words, got {a.dtype}")
    a = a.view(np.uint64)
    if a.shape[-1] < min_words:
        raise ValueError(f"{name} needs >= {min_words} words, got {a.shape[-1]}")
    return a


def _guarded(shape, fill=_POISON) -> np.ndarray:
    """An output buffer filled with ``fill`` (poison, so a word the kernel skips shows), plus a guard."""
    buf = np.full(int(np.prod(shape)) + 1, fill, dtype=np.uint64)
    buf[-1] = _GUARD
    return buf


def _check_guard(buf: np.ndarray, name: str) -> None:
    if buf[-1] != _GUARD:
        raise RuntimeError(f"{name} wrote past the end of its output")


def pack(x, zero_bit: int = 0, *, threads: int = 64, blocks: int | None = None) -> np.ndarray:
    """Sign words of ``x`` (flattened), bit for bit :func:`mpisign.backends.packing.pack_signs`."""
    if zero_bit not in (0, 1):
        raise ValueError(f"zero_bit must be 0 or 1, got {zero_bit!r}")
    t, suffix = _floats(x)
    n, w = t.numel(), packing.n_words(t.numel())
    buf = _guarded(w)
    if n:
        grid, block = _grid(64 * w, threads, blocks)
        _run(f"run_pack_{suffix}", grid, block, t.data_ptr(), n, zero_bit, buf.ctypes.data)
    _check_guard(buf, "pack")
    return buf[:w]


def tally(votes, n: int, *, threads: int = 64, blocks: int | None = None):
    """Majority of ``votes`` (M x W words): ``(plus, tie)`` as :func:`mpisign.backends.packing.majority`
    of :func:`mpisign.backends.packing.tally` with ``n`` bits (tie is None for odd M)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    v = _words(votes, "votes", packing.n_words(n))
    m, w = votes_shape(v.shape)
    plus, tie = _guarded(w), _guarded(w)
    if w:
        grid, block = _grid(2 * w, threads, blocks)
        _run("run_tally_majority", grid, block, v.ctypes.data, m, 2 * w, n, plus.ctypes.data, tie.ctypes.data)
    _check_guard(plus, "tally plus")
    _check_guard(tie, "tally tie")
    return plus[:w], (tie[:w] if m % 2 == 0 else None)


def _in_place(p, what: str) -> None:
    in_place = (p.is_contiguous() if isinstance(p, torch.Tensor)
                else isinstance(p, np.ndarray) and p.flags.c_contiguous and p.flags.writeable)
    if not in_place:
        raise ValueError(f"{what} must be a contiguous, writeable array or tensor: the kernel "
                         f"works in place")


def _apply_vote(kernel: str, p, plus, tie, lr: float, x: float, threads: int, blocks):
    _in_place(p, "p")
    t, suffix = _floats(p)
    n = t.numel()
    plus_w = _words(plus, "plus", packing.n_words(n))
    tie_w = None if tie is None else _words(tie, "tie", packing.n_words(n))
    if n:
        grid, block = _grid(n, threads, blocks)
        tie_ptr = plus_w.ctypes.data if tie_w is None else tie_w.ctypes.data
        _run(f"run_{kernel}_{suffix}", grid, block, t.data_ptr(), plus_w.ctypes.data, tie_ptr,
             int(tie_w is not None), n, lr, x)
    return p


def apply(p, plus, tie, lr: float, wd: float = 0.0, *, threads: int = 64, blocks: int | None = None):
    """In place: ``p = p - lr * (v + wd * p)`` in float32 with v = +1, -1 or 0 (tie); returns p.

    ``p`` is a writeable numpy float32/float16 array or a CPU float32/float16/bfloat16 tensor.
    """
    return _apply_vote("apply", p, plus, tie, lr, wd, threads, blocks)


def apply_decayed(p, plus, tie, lr: float, decay: float, *, threads: int = 64,
                  blocks: int | None = None):
    """In place: ``p = p * decay - lr * v``, rounded as torch's ``p.mul_(decay)`` then
    ``p.add_(v, alpha=-lr)`` (the product rounded to p's dtype first); returns p."""
    return _apply_vote("apply_decayed", p, plus, tie, lr, decay, threads, blocks)


def lion_update_pack(g, m, beta1: float, alpha1: float, beta2: float, alpha2: float,
                     zero_bit: int, fused: bool, *, threads: int = 64, blocks: int | None = None):
    """Lion's local step on float32 ``g`` and ``m`` (updated in place): the words of the signs of
    ``c = m * beta1 + alpha1 * g`` (0 as ``zero_bit``), and how many entries of ``g`` were
    non-finite (taken as 0); ``m = m * beta2 + alpha2 * g``. ``fused``: each add one FMA."""
    if zero_bit not in (0, 1):
        raise ValueError(f"zero_bit must be 0 or 1, got {zero_bit!r}")
    _in_place(m, "m")
    (tg, sg), (tm, sm) = _floats(g), _floats(m)
    if (sg, sm) != ("f32", "f32") or tg.numel() != tm.numel():
        raise ValueError(f"g and m must be float32 of one size, got {tg.dtype}"
                         f"[{tg.numel()}] and {tm.dtype}[{tm.numel()}]")
    n, w = tg.numel(), packing.n_words(tg.numel())
    buf, count = _guarded(w), _guarded(1, fill=0)   # the kernel adds into a zeroed counter
    if n:
        grid, block = _grid(64 * w, threads, blocks)
        _run("run_lion_update_pack_f32", grid, block, tg.data_ptr(), tm.data_ptr(), n, beta1,
             alpha1, beta2, alpha2, int(bool(fused)), zero_bit, buf.ctypes.data, count.ctypes.data)
    _check_guard(buf, "lion_update_pack")
    _check_guard(count, "lion_update_pack's counter")
    return buf[:w], int(count[0])


def disagreement(votes, plus, tie=None, n: int | None = None, *, threads: int = 64,
                 blocks: int | None = None, rows: int | None = None) -> np.ndarray:
    """Per worker: coordinates (of the first ``n``) where its bits differ from ``plus``, ties
    excluded; an int64 array of M counts. ``rows`` caps gridDim.y (workers per pass)."""
    v = _words(votes, "votes")
    m, w = votes_shape(v.shape)
    n = bits_in(n, w)
    plus_w = _words(plus, "plus", w)
    tie_w = None if tie is None else _words(tie, "tie", w)
    counts = _guarded(m, fill=0)  # the kernel adds into zeroed counters
    if w:
        grid, block = _grid(2 * w, threads, blocks)
        gy = min(m, rows or m)
        tie_ptr = plus_w.ctypes.data if tie_w is None else tie_w.ctypes.data
        _run("run_disagreement", grid, gy, block, v.ctypes.data, m, 2 * w, n, plus_w.ctypes.data,
             tie_ptr, int(tie_w is not None), counts.ctypes.data)
    _check_guard(counts, "disagreement")
    return counts[:m].astype(np.int64)


# ---- mpisign.cuda.kernels with CPU tensors for CUDA ones ----------------------------------------

class _HostArray(np.ndarray):
    """What cupy.from_dlpack gives, on the host: an array with ``.data.ptr``."""

    @property
    def data(self):
        return type("Mem", (), {"ptr": self.ctypes.data})()


class _CupyOnHost:
    """The few CuPy names :mod:`mpisign.cuda.kernels` uses, over numpy."""

    uint16, uint32, uint64, float32 = np.uint16, np.uint32, np.uint64, np.float32

    @staticmethod
    def from_dlpack(t):
        return np.from_dlpack(t).view(_HostArray)


def _launch_on_host(device, name: str, grid: tuple, args: tuple) -> None:
    """``kernels._launch`` on the CPU: the same kernel name, grid, block and argument list."""
    from . import kernels
    lib = load()
    raw = [a.ctypes.data if isinstance(a, np.ndarray) else a.item() for a in args]
    gx, gy = (grid + (1,))[:2]
    dims = (gx, gy, kernels._THREADS) if name == "disagreement" else (gx, kernels._THREADS)
    if getattr(lib, "run_" + name)(*dims, *raw) != 0:
        raise RuntimeError(f"{name}: {lib.shim_last_error().decode()}")


@contextlib.contextmanager
def kernels_on_cpu():
    """Within: :mod:`mpisign.cuda.kernels` takes CPU tensors for CUDA ones and runs every launch
    through the host shim (the same ``signs.cu``, the same grid and arguments). Not thread-safe:
    it swaps three module attributes and puts them back on exit."""
    from . import kernels
    saved = kernels._DEVICE_TYPE, kernels._on, kernels._launch
    kernels._DEVICE_TYPE = "cpu"
    kernels._on = lambda device: contextlib.nullcontext(_CupyOnHost)
    kernels._launch = _launch_on_host
    try:
        yield kernels
    finally:
        kernels._DEVICE_TYPE, kernels._on, kernels._launch = saved
