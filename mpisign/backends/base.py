"""The signs backend's interface, :class:`Signs`, and what every implementation shares.

A backend is what the optimizer and ``majority_vote`` do to packed sign words, one class per
place the words live (:mod:`mpisign.backends.host` for host memory, :mod:`mpisign.cuda.bridge`
for the GPU paths); :mod:`mpisign.backends.signs` chooses one per layout. The operations, for
``n`` coordinates in ``ceil(n / 64)`` words (wire format: see :mod:`mpisign.backends.packing`):

* ``words(w)``: a zeroed buffer of ``w`` words where this backend's votes travel;
* ``pack(src, zero_bit, out)``: the signs of ``src`` into ``out`` (0 and NaN as ``zero_bit``).
  A pack may only be queued (the GPU paths): ``mark()`` says, without waiting, when queued packs
  are done, and ``settle()`` finishes them into their ``out``s;
* ``zeros(src, out)``: the zero mask of ``src`` into ``out`` (bit 1 where ``src`` is 0 or NaN: a
  coordinate that casts no vote), queued as ``pack`` is;
* ``tally(votes, n)``: the majority ``(plus, tie)`` of an M x W array of words, for the
  topologies that count raw votes (:class:`mpisign.collectives.SignVote`);
* ``apply(p, plus, tie, lr, wd)``: ``p -= lr * (v + wd * p)`` in place, ``v`` the packed vote;
  every NaN it writes is :data:`mpisign.backends.packing.CANONICAL_NAN`, on every path;
* ``apply_decayed(p, plus, tie, lr, decay)``: ``p = p * decay - lr * v`` in place (decoupled
  weight decay, Lion's and AdamW's form): ``p.mul_(decay)``, then ``apply`` without weight
  decay (``lr`` rounded to float32, as ``apply`` does; torch's own CPU ``add_(alpha=-lr)`` of
  a float16/bfloat16 tensor rounds ``lr`` to that dtype, so a rule that wants torch's bits
  passes ``lr`` so rounded, as Lion's does); a backend may do it in one pass;
* ``disagreement(words, plus, tie)``: coordinates where ``words`` lost the vote, ties excluded
  (an int, or a 1-element device tensor: read it once a step);
* ``unpack(plus, tie, n, like, out=None)``: the vote as -1 / 0 / +1, of ``like``'s dtype, in
  ``out`` (``n`` elements of that dtype on ``like``'s device), or in a new tensor on ``like``'s
  device.

A backend may also offer a rule's local step fused with its pack (``update_and_pack``: Signum's,
``lion_update_and_pack``: Lion's; :class:`mpisign.backends.host.CompiledSigns`); the rule, not
the backend, decides whether it is used (:mod:`mpisign.optim.rules`). Where such a kernel also
writes the zero mask (``zeros=``), the backend says so with ``fused_zeros = True``; where a
plan needs the mask and the backend's kernel cannot write it, the engine does not use it.
"""

from __future__ import annotations

import numpy as np
import torch

from . import packing

__all__ = ["Signs", "host_array", "host_empty", "host_tally", "host_tensor", "into",
           "unpack_by_apply"]


def host_tally(votes, n: int):
    """:func:`mpisign.backends.packing.majority` of :func:`mpisign.backends.packing.tally`: the default tally of
    the collectives, for numpy words and for torch words on any device (the tree adds counts
    with torch ops on the device's words)."""
    return packing.majority(packing.tally(votes), votes.shape[0], n)


class Signs:
    """The interface (see the module docstring); ``resident``: words live on the device."""

    resident = False
    fused_zeros = False   # whether update_and_pack / lion_update_and_pack take zeros=

    def words(self, n_words: int):
        raise NotImplementedError

    def pack(self, src: torch.Tensor, zero_bit: int, out) -> None:
        raise NotImplementedError

    def zeros(self, src: torch.Tensor, out) -> None:
        """The zero mask of ``src``: the signs of a tensor that is 1 where ``src`` is 0 or NaN
        and 0 elsewhere, by this backend's own ``pack`` (one more pass over ``src``)."""
        self.pack(((src == 0) | src.isnan()).to(torch.float32), 0, out)

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

    def apply_decayed(self, p: torch.Tensor, plus, tie, lr: float, decay: float) -> None:
        if decay != 1.0:
            p.mul_(decay)
        self.apply(p, plus, tie, lr, 0.0)

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


def host_empty(n: int, dtype: torch.dtype) -> torch.Tensor:
    """A new CPU tensor in numpy's memory (see :func:`host_array`)."""
    return host_tensor(host_array(n, dtype), dtype)


def into(v: torch.Tensor, like: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
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
    return into(v, like, out)
