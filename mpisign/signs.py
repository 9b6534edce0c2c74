"""The signs backend: what the optimizer and ``majority_vote`` do to packed sign words.

One small interface, :class:`Signs`, with one implementation per place the words live:

========================  =====================================================================
:class:`HostSigns`        words in host memory (numpy uint64). CPU tensors take the reference
                          kernels of :mod:`mpisign.packing`; CUDA tensors take the CuPy kernels
                          of :mod:`mpisign.cuda` with the words staged through pinned host
                          memory (:class:`mpisign.cuda.bridge.CudaSigns`), or, without working
                          kernels, the reference kernels on a host copy.
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
* ``tally(votes, n)``: the majority ``(plus, tie)`` of an M x W array of words, for the
  topologies that count raw votes (:class:`mpisign.collectives.SignVote`);
* ``apply(p, plus, tie, lr, wd)``: ``p -= lr * (v + wd * p)`` in place, ``v`` the packed vote;
* ``disagreement(words, plus, tie)``: coordinates where ``words`` lost the vote, ties excluded
  (an int, or a 1-element device tensor: read it once a step);
* ``unpack(plus, tie, n, like)``: the vote as -1 / 0 / +1 in a new tensor of ``like``'s dtype and
  device.
"""

from __future__ import annotations

import numpy as np
import torch

from . import packing

__all__ = ["Signs", "HostSigns", "host_tally", "signs_for"]


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

    def tally(self, votes, n: int):
        raise NotImplementedError

    def apply(self, p: torch.Tensor, plus, tie, lr: float, wd: float) -> None:
        raise NotImplementedError

    def disagreement(self, words, plus, tie):
        raise NotImplementedError

    def unpack(self, plus, tie, n: int, like: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _staged(t: torch.Tensor):
    """The staged GPU kernels for a CUDA tensor they take, or None (the reference path)."""
    if not t.is_cuda:
        return None
    from .cuda.bridge import CudaSigns, staged_path
    return staged_path(t.device) if CudaSigns.handles(t) else None


class HostSigns(Signs):
    """Words in host memory; scratch buffers kept across calls (one object per owner)."""

    tally = staticmethod(host_tally)

    def __init__(self):
        self._pack_scratch: torch.Tensor | None = None   # bool, the largest tensor packed
        self._apply_scratch: dict = {}                   # chunk buffers of packing.apply_signs

    def words(self, n_words: int) -> np.ndarray:
        return np.zeros(n_words, dtype=np.uint64)

    def pack(self, src: torch.Tensor, zero_bit: int, out: np.ndarray) -> None:
        gpu = _staged(src)
        if gpu is not None:
            gpu.pack(src.contiguous(), zero_bit, out)
            return
        src = src.detach().cpu()
        if self._pack_scratch is None or self._pack_scratch.numel() < src.numel():
            self._pack_scratch = torch.empty(src.numel(), dtype=torch.bool)
        packing.pack_signs(src, zero_bit, out=out, scratch=self._pack_scratch)

    def apply(self, p: torch.Tensor, plus: np.ndarray, tie: np.ndarray | None, lr: float,
              wd: float) -> None:
        if p.is_contiguous():
            gpu = _staged(p)
            if gpu is not None:
                gpu.apply(p, plus, tie, lr, wd)
                return
            if p.device.type == "cpu":
                packing.apply_signs(p, plus, tie, lr, wd, scratch=self._apply_scratch)
                return
        # Other devices and layouts: unpack, then one fused update.
        v = self.unpack(plus, tie, p.numel(), p).view_as(p)
        if wd:
            v.add_(p, alpha=wd)
        p.add_(v, alpha=-lr)

    def disagreement(self, words: np.ndarray, plus: np.ndarray, tie: np.ndarray | None) -> int:
        return packing.disagreement(words, plus, tie)

    def unpack(self, plus: np.ndarray, tie: np.ndarray | None, n: int,
               like: torch.Tensor) -> torch.Tensor:
        return packing.unpack_signs(plus, n, tie, dtype=like.dtype).to(like.device)


def signs_for(tensors: list) -> Signs:
    """The backend for a layout of ``tensors``, chosen once: device-resident words when every
    tensor is contiguous, of a kernel dtype, on one CUDA device whose MPI is CUDA-aware (and
    whose kernels passed their self-check); else words in host memory."""
    first = tensors[0] if tensors else None
    if first is not None and all(t.is_cuda and t.device == first.device and t.is_contiguous()
                                 for t in tensors):
        from .cuda.bridge import device_path
        gpu = device_path(first.device)
        if gpu is not None and gpu.resident and all(gpu.handles(t) for t in tensors):
            return gpu
    return HostSigns()
