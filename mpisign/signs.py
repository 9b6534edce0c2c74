"""The signs backend: what the optimizer and ``majority_vote`` do to packed sign words.

One small interface, :class:`Signs`, with one implementation per place the words live:

========================  =====================================================================
:class:`HostSigns`        words in host memory (numpy uint64). CPU tensors take the reference
                          kernels of :mod:`mpisign.packing`; CUDA tensors take the CuPy kernels
                          of :mod:`mpisign.cuda` with the words staged through pinned host
                          memory (:class:`mpisign.cuda.bridge.CudaSigns`), or, without working
                          kernels, the reference pack on a host copy and torch's update on the
                          device (torch's rounding, the kernels' NaN rule).
:class:`CompiledSigns`    the same, with CPU tensors on the compiled kernels of
                          :mod:`mpisign.native` (bit for bit the reference, near memory speed).
:class:`~mpisign.cuda.bridge.ResidentSigns`
                          words on the GPU (torch int64), for a CUDA-aware MPI: pack, tally,
                          apply and disagreement all run there.
========================  =====================================================================

:func:`signs_for` chooses once, from the tensors a layout holds; the optimizer and
``majority_vote`` both call it, then only call the backend's methods. A faster kernel for one
place (compiled CPU kernels, say) is one more class behind this interface.

The operations, for ``n`` coordinates in ``ceil(n / 64)`` words (wire format: see
:mod:`mpisign.packing`):

* ``words(w)``: a zeroed buffer of ``w`` words where this backend's votes travel;
* ``pack(src, zero_bit, out)``: the signs of ``src`` into ``out`` (0 and NaN as ``zero_bit``);
  a backend may also offer ``update_and_pack``: Signum's momentum update fused with the pack
  (:class:`CompiledSigns`). A pack may only be queued (the GPU paths): ``mark()`` says, without
  waiting, when queued packs are done, and ``settle()`` finishes them into their ``out``s;
* ``tally(votes, n)``: the majority ``(plus, tie)`` of an M x W array of words, for the
  topologies that count raw votes (:class:`mpisign.collectives.SignVote`);
* ``apply(p, plus, tie, lr, wd)``: ``p -= lr * (v + wd * p)`` in place, ``v`` the packed vote;
  every NaN it writes is :data:`mpisign.packing.CANONICAL_NAN`, on every path;
* ``disagreement(words, plus, tie)``: coordinates where ``words`` lost the vote, ties excluded
  (an int, or a 1-element device tensor: read it once a step);
* ``unpack(plus, tie, n, like, out=None)``: the vote as -1 / 0 / +1, of ``like``'s dtype, in
  ``out`` (``n`` elements of that dtype on ``like``'s device), or in a new tensor on ``like``'s
  device.
"""

from __future__ import annotations

import numpy as np
import torch

from . import native, packing

__all__ = ["Signs", "HostSigns", "CompiledSigns", "gpu_level", "host_array", "host_tally",
           "host_tensor", "signs_for", "unpack_by_apply"]


def host_tally(votes, n: int):
    """:func:`mpisign.packing.majority` of :func:`mpisign.packing.tally`: the default tally of
    the collectives, for numpy words and for torch words on any device (the tree adds counts
    with torch ops on the device's words)."""
    return packing.majority(packing.tally(votes), votes.shape[0], n)


class Signs:
    """The interface (see the module docstring); ``resident``: words live on the device."""

    resident = False

    def words(self, n_words: int):
        raise NotImplementedError

    def pack(self, src: torch.Tensor, zero_bit: int, out) -> None:
        raise NotImplementedError

    def mark(self):
        """Something whose ``query()`` says, without waiting, whether the packs queued so far
        are done; None when a pack is done on return (host words: MPI may take them at once)."""
        return None

    def settle(self) -> None:
        """Finish the packs queued so far into their ``out`` words, before MPI reads them (a
        backend whose pack is done on return has nothing to do)."""

    def tally(self, votes, n: int):
        raise NotImplementedError

    def apply(self, p: torch.Tensor, plus, tie, lr: float, wd: float) -> None:
        raise NotImplementedError

    def disagreement(self, words, plus, tie):
        raise NotImplementedError

    def unpack(self, plus, tie, n: int, like: torch.Tensor,
               out: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError


def host_array(n: int, dtype: torch.dtype) -> np.ndarray:
    """``n`` uninitialized elements of ``dtype``'s size in numpy's memory, which asks the kernel
    for huge pages: a fresh 100 MB result then costs a few hundred page faults, not 25,000 (5x
    faster to fill). bfloat16, which numpy lacks, as uint16 (:func:`host_tensor`)."""
    if dtype == torch.bfloat16:
        return np.empty(n, dtype=np.uint16)
    return np.empty(n, dtype=torch.empty(0, dtype=dtype).numpy().dtype)


def host_tensor(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """:func:`host_array`'s ``array`` as a ``dtype`` tensor sharing its memory."""
    t = torch.from_numpy(array)
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


def _host_empty(n: int, dtype: torch.dtype) -> torch.Tensor:
    """A new CPU tensor in numpy's memory (see :func:`host_array`)."""
    return host_tensor(host_array(n, dtype), dtype)


def _into(v: torch.Tensor, like: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """The unpacked vote ``v`` (flat, on the host) where the caller wants it: ``out`` if given
    (``v`` may already be it), else ``v`` on ``like``'s device."""
    if out is None:
        return v.to(like.device)
    if v is out:
        return out
    if out.is_contiguous():
        out.view(-1).copy_(v)
    else:
        out.copy_(v.view_as(out))
    return out


def unpack_by_apply(apply, plus, tie, n: int, like: torch.Tensor,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """The GPU paths' unpack: ``apply`` (a kernel's ``p -= lr * (v + wd * p)``) on zeros with
    lr = -1 gives ``0 + v`` exactly, so no unpack kernel is needed; into ``out`` where it can
    take the kernel's writes (contiguous, on ``like``'s device), else a new tensor there."""
    if out is not None and out.is_contiguous() and out.device == like.device:
        apply(out.view(-1).zero_(), plus, tie, -1.0, 0.0)
        return out
    v = torch.zeros(n, dtype=like.dtype, device=like.device)
    apply(v, plus, tie, -1.0, 0.0)
    return _into(v, like, out)


def _staged(t: torch.Tensor):
    """The staged GPU kernels for a CUDA tensor they take, or None (the reference path)."""
    if not t.is_cuda:
        return None
    from .cuda.bridge import CudaSigns, staged_path
    return staged_path(t.device) if CudaSigns.handles(t) else None


class _AllDone:
    """Several devices' marks as one: done when each is."""

    def __init__(self, marks: list):
        self.marks = [m for m in marks if m is not None]

    def query(self) -> bool:
        return all(m.query() for m in self.marks)


class HostSigns(Signs):
    """Words in host memory; scratch buffers kept across calls (one object per owner).
    ``gpu_kernels``: CUDA tensors take the staged GPU kernels where they work (False: the CPU
    reference on host copies, as every rank agreed when one rank's kernels failed)."""

    tally = staticmethod(host_tally)
    gpu_kernels = True

    def __init__(self):
        self._pack_scratch: torch.Tensor | None = None   # bool, the largest tensor packed
        self._apply_scratch: dict = {}                   # chunk buffers of packing.apply_signs
        self._queued_on: list = []   # staged GPU paths holding packs not yet on the host

    def _staged(self, t: torch.Tensor):
        return _staged(t) if self.gpu_kernels else None

    def words(self, n_words: int) -> np.ndarray:
        return np.zeros(n_words, dtype=np.uint64)

    def pack(self, src: torch.Tensor, zero_bit: int, out: np.ndarray) -> None:
        gpu = self._staged(src)
        if gpu is not None:
            gpu.pack(src.contiguous(), zero_bit, out)
            if gpu not in self._queued_on:
                self._queued_on.append(gpu)
            return
        src = src.detach().cpu()
        if self._pack_scratch is None or self._pack_scratch.numel() < src.numel():
            self._pack_scratch = torch.empty(src.numel(), dtype=torch.bool)
        packing.pack_signs(src, zero_bit, out=out, scratch=self._pack_scratch)

    def mark(self):
        marks = [gpu.mark() for gpu in self._queued_on]
        return _AllDone(marks) if any(m is not None for m in marks) else None

    def settle(self) -> None:
        for gpu in self._queued_on:
            gpu.settle()
        self._queued_on = []

    def apply(self, p: torch.Tensor, plus: np.ndarray, tie: np.ndarray | None, lr: float,
              wd: float) -> None:
        if p.is_contiguous():
            gpu = self._staged(p)
            if gpu is not None:
                gpu.apply(p, plus, tie, lr, wd)
                return
        if p.device.type == "cpu":   # the reference; a non-contiguous p through a copy
            flat = p if p.is_contiguous() else p.contiguous()
            packing.apply_signs(flat, plus, tie, lr, wd, scratch=self._apply_scratch)
            if flat is not p:
                p.copy_(flat)
            return
        # Other devices (no kernels there, or a non-contiguous p): unpack, then one fused update,
        # rounded as torch rounds it, not as the kernel does; the kernel's NaN rule is kept.
        v = self.unpack(plus, tie, p.numel(), p).view_as(p)   # a new tensor: no `out`
        if wd:
            v.add_(p, alpha=wd)
        p.add_(v, alpha=-lr)
        packing.canonicalize_nan_(p)

    def disagreement(self, words: np.ndarray, plus: np.ndarray, tie: np.ndarray | None) -> int:
        return packing.disagreement(words, plus, tie)

    def unpack(self, plus: np.ndarray, tie: np.ndarray | None, n: int, like: torch.Tensor,
               out: torch.Tensor | None = None) -> torch.Tensor:
        gpu = self._staged(like)
        if gpu is not None:   # on the device
            return unpack_by_apply(gpu.apply, plus, tie, n, like, out)
        return _into(packing.unpack_signs(plus, n, tie, dtype=like.dtype), like, out)


class CompiledSigns(HostSigns):
    """:class:`HostSigns` with CPU tensors packed, applied and unpacked by the compiled kernels
    (:mod:`mpisign.native`); what they do not take (CUDA tensors, half-precision apply,
    non-contiguous parameters) goes to :class:`HostSigns`. It also fuses Signum's local step
    (:meth:`update_and_pack`)."""

    def update_and_pack(self, grads: list, bufs: list, beta: float, alpha: float,
                        zero_bit: int, outs: list) -> int | None:
        """Signum's local step for several parameters, one pass each: non-finite gradient
        entries vote as 0 (returned: how many); with momentum (``bufs`` of tensors),
        ``m = m * beta + alpha * g`` exactly as torch rounds it, then the signs of ``m``; without
        (``bufs`` of None), the signs of ``g``. None, with nothing done, unless every tensor is a
        contiguous float32/float64 CPU tensor whose update the kernel rounds as torch does."""
        for g, m in zip(grads, bufs):
            if not (g.device.type == "cpu" and g.dtype in native.UPDATE_DTYPES
                    and g.is_contiguous() and not g.is_sparse):
                return None
            if m is not None and not (m.dtype == g.dtype and m.is_contiguous()
                                      and native.momentum_form(g.dtype) is not None):
                return None
        return sum(native.update_pack(g, m, beta, alpha, zero_bit, out)
                   for g, m, out in zip(grads, bufs, outs))

    def pack(self, src: torch.Tensor, zero_bit: int, out: np.ndarray) -> None:
        if src.device.type == "cpu" and src.dtype in native.DTYPES:
            native.pack(src.detach().contiguous(), zero_bit, out)
        else:
            super().pack(src, zero_bit, out)

    def apply(self, p: torch.Tensor, plus: np.ndarray, tie: np.ndarray | None, lr: float,
              wd: float) -> None:
        if p.device.type == "cpu" and p.dtype in native.APPLY_DTYPES and p.is_contiguous():
            native.apply(p.data, plus, tie, lr, wd)
        else:
            super().apply(p, plus, tie, lr, wd)

    def unpack(self, plus: np.ndarray, tie: np.ndarray | None, n: int, like: torch.Tensor,
               out: torch.Tensor | None = None) -> torch.Tensor:
        if like.device.type != "cpu" or like.dtype not in native.DTYPES:
            return super().unpack(plus, tie, n, like, out)
        direct = out is not None and out.device.type == "cpu" and out.is_contiguous()
        host = out if direct else _host_empty(n, like.dtype)
        native.unpack(plus, tie, host.view(-1))
        return _into(host, like, out)


def gpu_level(tensors: list, comm=None, timeout: float | None = None) -> int | None:
    """The GPU path that ``tensors`` may take, as a :mod:`mpisign.cuda.startup` level (None:
    no CUDA tensors here). With ``comm`` of more than one rank, a collective on every rank of
    it, with CUDA tensors or not: the most conservative level any rank can take, proven on the
    wire (:func:`mpisign.cuda.bridge.agreed_level`); None when no rank has CUDA tensors. Callers
    agree once (the optimizer at its first step, ``majority_vote`` at its first call on a
    communicator), since later layouts may change on one rank alone."""
    devices = {t.device for t in tensors if t.is_cuda}
    if not devices and (comm is None or comm.Get_size() == 1):
        return None
    from .cuda import bridge   # late: a CPU-only job loads no CUDA module before this
    return bridge.agreed_level(devices, comm, timeout)


def signs_for(tensors: list, agreed: int | None = None) -> Signs:
    """The backend for a layout of ``tensors``, chosen once: device-resident words when every
    tensor is contiguous, of a kernel dtype, on one CUDA device whose MPI is CUDA-aware (and
    whose kernels passed their self-check); else words in host memory, with the GPU kernels
    for CUDA tensors where they work. ``agreed`` (:func:`gpu_level`, with the ranks): no path
    above that level, on any device."""
    devices = {t.device for t in tensors if t.is_cuda}
    if not devices:
        return _host_signs()
    from .cuda import bridge, startup
    level = bridge.agreed_level(devices)   # this rank's own, once per device
    if agreed is not None:
        level = min(level, agreed)
    one_device = len(devices) == 1 and all(t.is_cuda and t.is_contiguous() for t in tensors)
    if level == startup.RESIDENT and one_device:
        gpu = bridge.device_path(tensors[0].device)
        if gpu.resident and all(gpu.handles(t) for t in tensors):
            return gpu
    host = _host_signs()
    # Some rank's kernels failed their self-check: the CPU reference on every rank.
    host.gpu_kernels = level >= startup.STAGED
    return host


def _host_signs() -> HostSigns:
    return CompiledSigns() if native.available() else HostSigns()
