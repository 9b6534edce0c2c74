"""Backends whose words live in host memory (numpy uint64): :class:`HostSigns`, the numpy
reference of :mod:`mpisign.backends.packing`, and :class:`CompiledSigns`, the same bits from the
compiled kernels of :mod:`mpisign.backends.native` at near memory speed.

Tensors on a device without kernels here (a CUDA tensor whose kernels failed their self-check)
are packed from a host copy and updated by torch on their device (torch's rounding, the
kernels' NaN rule). The GPU kernels for CUDA tensors are :mod:`mpisign.cuda.bridge`'s business.
"""

from __future__ import annotations

import numpy as np
import torch

from . import native, packing
from .base import Signs, host_empty, host_tally, into

__all__ = ["HostSigns", "CompiledSigns", "host_signs"]


class HostSigns(Signs):
    """Words in host memory; scratch buffers kept across calls (one object per owner)."""

    tally = staticmethod(host_tally)

    def __init__(self):
        self._pack_scratch: torch.Tensor | None = None   # bool, the largest tensor packed
        self._apply_scratch: dict = {}                   # chunk buffers of packing.apply_signs

    def words(self, n_words: int) -> np.ndarray:
        return np.zeros(n_words, dtype=np.uint64)

    def pack(self, src: torch.Tensor, zero_bit: int, out: np.ndarray) -> None:
        src = src.detach().cpu()
        if self._pack_scratch is None or self._pack_scratch.numel() < src.numel():
            self._pack_scratch = torch.empty(src.numel(), dtype=torch.bool)
        packing.pack_signs(src, zero_bit, out=out, scratch=self._pack_scratch)

    def zeros(self, src: torch.Tensor, out: np.ndarray) -> None:
        """The zero mask in one numpy pass over a bool tensor: bit 1 where ``src`` is 0 or
        NaN, packed little-endian as the wire format's words (padding bits 0)."""
        flat = src.detach().cpu().reshape(-1)
        mask = np.packbits(((flat == 0) | flat.isnan()).numpy(), bitorder="little")
        view = out.view(np.uint8)
        view[: mask.size] = mask
        view[mask.size: 8 * packing.n_words(flat.numel())] = 0

    def apply(self, p: torch.Tensor, plus: np.ndarray, tie: np.ndarray | None, lr: float,
              wd: float) -> None:
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
        return into(packing.unpack_signs(plus, n, tie, dtype=like.dtype), like, out)


class CompiledSigns(HostSigns):
    """:class:`HostSigns` with CPU tensors packed, applied and unpacked by the compiled kernels
    (:mod:`mpisign.backends.native`); what they do not take (other devices, half-precision apply,
    non-contiguous parameters) goes to :class:`HostSigns`. It also fuses Signum's local step
    (:meth:`update_and_pack`) and Lion's (:meth:`lion_update_and_pack`), each with the zero
    mask of what it packs where it is asked for one."""

    fused_zeros = True

    @staticmethod
    def _fusable(grads: list, bufs: list) -> bool:
        """Whether the fused kernels take these gradients and buffers (None: no buffer):
        contiguous float32/float64 CPU tensors whose update the kernel rounds as torch does."""
        for g, m in zip(grads, bufs):
            if not (g.device.type == "cpu" and g.dtype in native.UPDATE_DTYPES
                    and g.is_contiguous() and not g.is_sparse):
                return False
            if m is not None and not (m.dtype == g.dtype and m.is_contiguous()
                                      and native.momentum_form(g.dtype) is not None):
                return False
        return True

    def update_and_pack(self, grads: list, bufs: list, beta: float, alpha: float,
                        zero_bit: int, outs: list, zeros: list | None = None) -> int | None:
        """Signum's local step for several parameters, one pass each: non-finite gradient
        entries vote as 0 (returned: how many); with momentum (``bufs`` of tensors),
        ``m = m * beta + alpha * g`` exactly as torch rounds it, then the signs of ``m``; without
        (``bufs`` of None), the signs of ``g``. None, with nothing done, unless every tensor is a
        contiguous float32/float64 CPU tensor whose update the kernel rounds as torch does."""
        if not self._fusable(grads, bufs):
            return None
        zeros = zeros or [None] * len(outs)
        return sum(native.update_pack(g, m, beta, alpha, zero_bit, out, z)
                   for g, m, out, z in zip(grads, bufs, outs, zeros))

    def lion_update_and_pack(self, grads: list, bufs: list, beta1: float, alpha1: float,
                             beta2: float, alpha2: float, zero_bit: int,
                             outs: list, zeros: list | None = None) -> int | None:
        """Lion's local step for several parameters, one pass each
        (:func:`mpisign.backends.native.lion_update_pack`): the signs of ``m * beta1 + alpha1 *
        g`` packed, then ``m = m * beta2 + alpha2 * g``, non-finite gradient entries as 0
        (returned: how many). None, with nothing done, unless :meth:`_fusable`."""
        if not self._fusable(grads, bufs):
            return None
        zeros = zeros or [None] * len(outs)
        return sum(native.lion_update_pack(g, m, (beta1, beta2), (alpha1, alpha2), zero_bit, out,
                                           z)
                   for g, m, out, z in zip(grads, bufs, outs, zeros))

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

    def apply_decayed(self, p: torch.Tensor, plus: np.ndarray, tie: np.ndarray | None,
                      lr: float, decay: float) -> None:
        if p.device.type == "cpu" and p.dtype in native.APPLY_DTYPES and p.is_contiguous():
            native.apply_decayed(p.data, plus, tie, lr, decay)
        else:
            super().apply_decayed(p, plus, tie, lr, decay)

    def unpack(self, plus: np.ndarray, tie: np.ndarray | None, n: int, like: torch.Tensor,
               out: torch.Tensor | None = None) -> torch.Tensor:
        if like.device.type != "cpu" or like.dtype not in native.DTYPES:
            return super().unpack(plus, tie, n, like, out)
        direct = out is not None and out.device.type == "cpu" and out.is_contiguous()
        host = out if direct else host_empty(n, like.dtype)
        native.unpack(plus, tie, host.view(-1))
        return into(host, like, out)


def host_signs() -> HostSigns:
    """The fastest host backend here: the compiled kernels where they were built."""
    return CompiledSigns() if native.available() else HostSigns()
