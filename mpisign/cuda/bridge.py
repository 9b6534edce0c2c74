"""CUDA tensors in the optimizer and ``majority_vote``: the two GPU paths.

Both pack signs with the ``pack`` kernel on the tensor's device and update parameters with the
``apply`` kernel, in place, with no float temporary. They differ in where the packed words live
while the vote travels, which :func:`mpisign.cuda.aware.use_device_buffers` decides once and logs:

* :class:`ResidentSigns`, when MPI is CUDA-aware: the packed words, the topologies' work
  buffers, the tally (the ``tally`` kernel, or torch bitwise ops for the tree's counts) and the
  result stay on the device; mpi4py is handed device tensors (CUDA array interface / DLPack) and
  the stream is synchronized once per phase of a vote before MPI touches them
  (:meth:`mpisign.collectives.base.SignVote._ready`). Nothing crosses the PCIe bus but what MPI
  moves itself (GPUDirect RDMA where the fabric has it).
* :class:`CudaSigns`, when it is not: the packed words (1/32 of an fp32 gradient) are staged
  through host memory, where the topologies move and tally them, and the packed result is
  copied back for the apply kernel. Only packed words cross the bus.

The budget of host-device waits a step, for a vote of k phases (the posts between two waits:
1 for allgather, 2 for sharded (M with its ring gather), at most 3 for server and tree, 4 for
hierarchical), counted by tests/mpi/resident_check.py and tests/test_cuda_aware.py:

==========================  ===========================  ====================================
                            resident words               staged words
==========================  ===========================  ====================================
non-finite check            1 per bucket's group         1 per bucket's group
                            (the sums read back once)
before MPI                  1 per phase: k per vote      1 (:meth:`CudaSigns.settle`) per
                            (later posts of a phase      vote start, all queued packs at once
                            only query the stream)       (1 a step without overlap)
result back to the device   none                         none (copies queued; a staging slot's
                                                         reuse waits on the copy 4 applies back)
monitor                     1 per step                   none (host words)
overlap hooks               none (CUDA events queried)   none (CUDA events queried)
==========================  ===========================  ====================================

Kernels are looked up and CuPy's view of torch's stream is made once each, not per call.

Lion's rule has two kernels of its own on both paths: ``lion_update_and_pack`` (its local step
fused with the pack, one pass a parameter; its non-finite count is read back once a call, one
wait, as the torch path's non-finite check waits once) and ``apply_decayed``. Both round as
torch does on the device, which :mod:`mpisign.cuda.torch_check` checks there once; where it
does not, the rule keeps torch's ops.

:func:`device_path` runs the kernels' self-check once per device and returns None when CuPy is
missing or the check fails (logged as an error by the check): callers then take the CPU
reference path, which moves the tensor to the host first. Given the communicator, the ranks
first agree on one path, the most conservative any of them can take, and prove device words on
the wire before the first vote (:mod:`mpisign.cuda.startup`).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..backends.base import Signs, unpack_by_apply
from ..backends.packing import n_words
from ..mpi.comm import default_timeout

__all__ = ["CudaSigns", "ResidentSigns", "StagedSigns", "agreed_level", "device_path",
           "local_level", "staged_path"]

log = logging.getLogger(__name__)

_paths: dict = {}
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _kernels():
    from . import kernels
    return kernels


def _as_words(t: torch.Tensor) -> torch.Tensor:
    """A kernel's uint64 output as the int64 words the collectives take (same bits, no copy)."""
    return t.view(torch.int64)


def _torch_check():
    from . import torch_check
    return torch_check


def _lion_tensors(g, m, device: torch.device) -> bool:
    """Whether Lion's kernel takes gradient ``g`` and momentum ``m``: dense, contiguous float32
    of one shape on ``device``."""
    return all(isinstance(t, torch.Tensor) and t.layout == torch.strided and t.device == device
               and t.dtype == torch.float32 and t.is_contiguous() for t in (g, m)) \
        and g.shape == m.shape


def _lion_launch(kernels, device, form: str, grads: list, bufs: list, hparams: tuple,
                 zero_bit: int, outs: list, words_for=None) -> int:
    """Lion's kernel on each parameter, into ``outs`` (device words, or ``words_for(out)``,
    taken just before its launch), one counter for all; returns the non-finite count."""
    nonfinite = torch.zeros(1, dtype=torch.int64, device=device)
    for g, m, out in zip(grads, bufs, outs):
        kernels.lion_update_pack(g.detach(), m, *hparams, zero_bit, form == "fused",
                                 out=out if words_for is None else words_for(out),
                                 nonfinite=nonfinite)
    # Reading the count waits for the device: once a call (a bucket's parameters of one
    # group), as the torch path's non-finite check (_all_finite_sums) waits once for them.
    return int(nonfinite.item())


class CudaSigns:
    """Staged path: pack on the device, words through pinned host buffers, apply on the device.

    Device word buffers and the pinned host buffers (:class:`mpisign.cuda.aware.Staging`) are
    allocated once, at the largest size asked for, and reused for every parameter and step.
    ``kernels`` and ``pin_memory`` are for the tests' CPU stand-ins.

    Synchronizations: packs only queue their kernels, into consecutive device words;
    :meth:`settle` copies them all to the host at once and waits once, before a vote starts (one
    wait a step when the step packs every bucket first). The result goes back to the device
    through :data:`APPLY_SLOTS` rotating buffers, so a parameter's copy waits only for the copy
    :data:`APPLY_SLOTS` parameters back, not for the previous parameter's apply."""

    resident = False
    APPLY_SLOTS = 4

    def __init__(self, device: torch.device, kernels=None, pin_memory: bool | None = None):
        from .aware import Staging
        self.device = torch.device(device)
        self.kernels = _kernels() if kernels is None else kernels
        self.staging = Staging(pin_memory)
        self._device_words: dict[str, torch.Tensor] = {}
        self._queued: list = []   # host outs of the packs not yet on the host, in word order
        self._queued_words = 0    # their words, at the start of the device "pack" buffer
        self._applies = 0
        log.info("GPU path on %s: CuPy kernels pack and apply; packed signs are staged through "
                 "pinned host memory for the vote (the tally runs on the host)", self.device)

    @staticmethod
    def handles(t: torch.Tensor) -> bool:
        return t.is_cuda and t.dtype in _KERNEL_DTYPES

    @staticmethod
    def words(n_words: int) -> np.ndarray:
        """A zeroed word buffer in host memory, where this path's votes travel."""
        return np.zeros(n_words, dtype=np.uint64)

    def _on_device(self, slot: str, w: int) -> torch.Tensor:
        """``w`` words of the slot's device buffer (grown, never shrunk)."""
        buf = self._device_words.get(slot)
        if buf is None or buf.numel() < w:
            buf = self._device_words[slot] = torch.empty(w, dtype=torch.int64, device=self.device)
        return buf[:w]

    def _queue(self, out: np.ndarray) -> torch.Tensor:
        """Device words for ``out`` (host uint64 words), queued: :meth:`settle` copies them
        there."""
        start, end = self._queued_words, self._queued_words + out.size
        buf = self._device_words.get("pack")
        if buf is None or buf.numel() < end:
            self.settle()   # growing the buffer would drop the queued words: take them first
            # Doubled: a step's packs fit after a few steps, however their sizes come.
            self._on_device("pack", max(end, 2 * (0 if buf is None else buf.numel())))
            start, end = 0, out.size
        self._queued.append(out)
        self._queued_words = end
        return self._on_device("pack", end)[start:end]

    def pack(self, src: torch.Tensor, zero_bit: int, out: np.ndarray) -> None:
        """Queue the signs of ``src`` for ``out`` (host uint64 words): they are there after
        :meth:`settle`, which the caller runs before MPI reads ``out``."""
        self.kernels.pack(src, zero_bit, out=self._queue(out))

    def lion_takes(self, grads: list, bufs: list, outs: list) -> bool:
        """Whether :meth:`lion_update_and_pack` takes these tensors: float32 on this device,
        host words of their exact size, and a kernel form that rounds as torch does here."""
        return len(grads) == len(bufs) == len(outs) and all(
            _lion_tensors(g, m, self.device) and isinstance(out, np.ndarray)
            and out.dtype == np.uint64 and out.ndim == 1 and out.size == n_words(g.numel())
            for g, m, out in zip(grads, bufs, outs)) \
            and _torch_check().lion_form(self.device, self.kernels) is not None

    def lion_update_and_pack(self, grads: list, bufs: list, beta1: float, alpha1: float,
                             beta2: float, alpha2: float, zero_bit: int, outs: list) -> int | None:
        """Lion's local step on this device, one kernel pass a parameter, its signs queued for
        the host words ``outs`` as :meth:`pack` queues them; the non-finite count (one wait),
        or None, with nothing done, unless :meth:`lion_takes` them."""
        if not self.lion_takes(grads, bufs, outs):
            return None
        form = _torch_check().lion_form(self.device, self.kernels)
        # Each out is queued just before its launch: queuing may settle (and so copy) the
        # words queued before it, which must be written by then.
        return _lion_launch(self.kernels, self.device, form, grads, bufs,
                            (beta1, alpha1, beta2, alpha2), zero_bit, outs, self._queue)

    def mark(self):
        """A CUDA event after the queued packs (None on CPU stand-ins)."""
        return _event_after(self.device)

    def settle(self) -> None:
        """The queued packs' words into their ``out``s: one copy to pinned host memory and one
        wait for all of them."""
        if not self._queued:
            return
        # to_host synchronizes the stream: the pack kernels are done, the words on the host.
        host = self.staging.to_host(self._on_device("pack", self._queued_words), "send")
        start = 0
        for out in self._queued:
            out[:] = host[start: start + out.size].view(np.uint64)
            start += out.size
        self._queued, self._queued_words = [], 0

    def _vote_on_device(self, plus: np.ndarray, tie: np.ndarray | None) -> list:
        """The host vote ``(plus, tie)`` copied to device words through pinned buffers, queued
        on the current stream; nothing waited for but the copy that last used these buffers."""
        k = self._applies % self.APPLY_SLOTS
        self._applies += 1
        device_words = []
        for name, words in (("plus", plus), ("tie", tie)):
            if words is None:
                device_words.append(None)
                continue
            slot = f"{name}{k}"
            self.staging.host(slot, words.size, torch.int64)[:] = words.view(np.int64)
            device_words.append(self.staging.to_device(slot, self._on_device(slot, words.size)))
        return device_words

    def apply(self, p: torch.Tensor, plus: np.ndarray, tie: np.ndarray | None, lr: float,
              wd: float) -> None:
        """The host vote to the device (:meth:`_vote_on_device`), then the apply kernel."""
        self.kernels.apply(p.data, *self._vote_on_device(plus, tie), lr, wd)

    def apply_decayed(self, p: torch.Tensor, plus: np.ndarray, tie: np.ndarray | None,
                      lr: float, decay: float) -> None:
        """``p = p * decay - lr * v``: the vote to the device, then the apply_decayed kernel
        where it rounds as torch does here; else torch's own two ops."""
        lr_k = _torch_check().decayed_lr(self.device, p.dtype, lr, self.kernels)
        if lr_k is None:
            v = unpack_by_apply(self.apply, plus, tie, p.numel(), p)
            _torch_check().torch_apply_decayed(p.data, v, lr, decay)
        else:
            self.kernels.apply_decayed(p.data, *self._vote_on_device(plus, tie), lr_k, decay)


class _AllDone:
    """Several devices' marks as one: done when each is."""

    def __init__(self, marks: list):
        self.marks = [m for m in marks if m is not None]

    def query(self) -> bool:
        return all(m.query() for m in self.marks)


class StagedSigns(Signs):
    """A layout with CUDA tensors whose words live in host memory: each CUDA tensor the kernels
    take is packed and applied by :class:`CudaSigns` of its device (the staged path); every
    other tensor, and the words' tally and disagreement, by ``host`` (a
    :class:`mpisign.backends.host.HostSigns`). ``gpu_kernels`` False: no staged path at all (some
    rank's kernels failed their self-check, and every rank agreed on the CPU reference)."""

    def __init__(self, host, gpu_kernels: bool = True):
        self.host = host
        self.gpu_kernels = gpu_kernels
        self.tally = host.tally
        self._queued_on: list = []   # staged paths holding packs not yet on the host

    def _staged(self, t: torch.Tensor):
        """The staged kernels for ``t``, or None (``host`` takes it)."""
        if not (self.gpu_kernels and t.is_cuda and CudaSigns.handles(t)):
            return None
        return staged_path(t.device)

    def words(self, n_words: int) -> np.ndarray:
        return self.host.words(n_words)

    def pack(self, src: torch.Tensor, zero_bit: int, out: np.ndarray) -> None:
        gpu = self._staged(src)
        if gpu is None:
            self.host.pack(src, zero_bit, out)
            return
        gpu.pack(src.contiguous(), zero_bit, out)
        if gpu not in self._queued_on:
            self._queued_on.append(gpu)

    def update_and_pack(self, *args):
        """The host backend's fused local step, for the CPU tensors of a mixed layout (None:
        it does not take these tensors, or it has none)."""
        fused = getattr(self.host, "update_and_pack", None)
        return None if fused is None else fused(*args)

    def lion_update_and_pack(self, grads: list, bufs: list, beta1: float, alpha1: float,
                             beta2: float, alpha2: float, zero_bit: int, outs: list) -> int | None:
        """Lion's fused local step: the host backend's where no gradient is a CUDA tensor; the
        staged kernels where every one is and each device's take theirs (one wait a device,
        for the non-finite count); else None, with nothing done."""
        hparams = (beta1, alpha1, beta2, alpha2, zero_bit)
        if not any(g.is_cuda for g in grads):
            fused = getattr(self.host, "lion_update_and_pack", None)
            return None if fused is None else fused(grads, bufs, *hparams, outs)
        by_gpu: dict = {}
        for i, g in enumerate(grads):
            gpu = self._staged(g)
            if gpu is None:
                return None
            by_gpu.setdefault(gpu, []).append(i)
        parts = {gpu: [[seq[i] for i in idx] for seq in (grads, bufs, outs)]
                 for gpu, idx in by_gpu.items()}
        if not all(gpu.lion_takes(*part) for gpu, part in parts.items()):
            return None   # checked for every device first: nothing is done unless all take it
        count = 0
        for gpu, (g, m, out) in parts.items():
            count += gpu.lion_update_and_pack(g, m, *hparams, out)
            if gpu not in self._queued_on:
                self._queued_on.append(gpu)
        return count

    def mark(self):
        marks = [gpu.mark() for gpu in self._queued_on]
        return _AllDone(marks) if any(m is not None for m in marks) else None

    def settle(self) -> None:
        for gpu in self._queued_on:
            gpu.settle()
        self._queued_on = []

    def apply(self, p: torch.Tensor, plus: np.ndarray, tie: np.ndarray | None, lr: float,
              wd: float) -> None:
        gpu = self._staged(p) if p.is_contiguous() else None
        if gpu is None:
            self.host.apply(p, plus, tie, lr, wd)
        else:
            gpu.apply(p, plus, tie, lr, wd)

    def apply_decayed(self, p: torch.Tensor, plus: np.ndarray, tie: np.ndarray | None,
                      lr: float, decay: float) -> None:
        gpu = self._staged(p) if p.is_contiguous() else None
        if gpu is None:
            self.host.apply_decayed(p, plus, tie, lr, decay)
        else:
            gpu.apply_decayed(p, plus, tie, lr, decay)

    def disagreement(self, words: np.ndarray, plus: np.ndarray, tie: np.ndarray | None) -> int:
        return self.host.disagreement(words, plus, tie)

    def unpack(self, plus: np.ndarray, tie: np.ndarray | None, n: int, like: torch.Tensor,
               out: torch.Tensor | None = None) -> torch.Tensor:
        gpu = self._staged(like)
        if gpu is None:
            return self.host.unpack(plus, tie, n, like, out)
        return unpack_by_apply(gpu.apply, plus, tie, n, like, out)   # on the device


def _event_after(device: torch.device):
    """A CUDA event after the work queued so far on ``device``'s current stream: its
    ``query()`` says, without waiting, whether that work is done. None for a CPU stand-in."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


class ResidentSigns(Signs):
    """CUDA-aware path: packed words, tally and result all stay on ``device``.

    Words are int64 tensors (the wire format's uint64 bits, in the dtype torch's bitwise ops and
    mpi4py take everywhere). ``kernels`` is :mod:`mpisign.cuda.kernels` (the default); the tests
    pass the same module with its launches routed to the emulated kernels, on CPU tensors.
    """

    resident = True

    def __init__(self, device: torch.device, kernels=None):
        self.device = torch.device(device)
        self.kernels = _kernels() if kernels is None else kernels
        log.info("GPU path on %s: packed signs stay on the device and go straight to CUDA-aware "
                 "MPI; CuPy kernels pack, tally and apply", self.device)

    def handles(self, t: torch.Tensor) -> bool:
        return t.device == self.device and t.dtype in _KERNEL_DTYPES

    def words(self, n_words: int) -> torch.Tensor:
        """A zeroed word buffer on the device (:class:`mpisign.backends.signs.Signs`' interface)."""
        return torch.zeros(n_words, dtype=torch.int64, device=self.device)

    def pack(self, src: torch.Tensor, zero_bit: int, out: torch.Tensor) -> None:
        """Sign words of ``src`` into ``out`` (a slice of device words), on the current stream."""
        self.kernels.pack(src.contiguous(), zero_bit, out=out)

    def mark(self):
        """A CUDA event after the packs queued so far (None on CPU stand-ins): MPI may take
        the words once it is done. Nothing to settle: the collectives synchronize the stream
        once per phase before MPI touches device words."""
        return _event_after(self.device)

    def tally(self, votes: torch.Tensor, n: int):
        """The ``tally`` kernel as a :class:`mpisign.collectives.SignVote` tally."""
        plus, tie = self.kernels.tally(votes, n)
        return _as_words(plus), (None if tie is None else _as_words(tie))

    def apply(self, p: torch.Tensor, plus: torch.Tensor, tie: torch.Tensor | None, lr: float,
              wd: float) -> None:
        self.kernels.apply(p.data, plus, tie, lr, wd)

    def apply_decayed(self, p: torch.Tensor, plus: torch.Tensor, tie: torch.Tensor | None,
                      lr: float, decay: float) -> None:
        """``p = p * decay - lr * v`` in one kernel pass where it rounds as torch's
        ``p.mul_(decay)``, ``p.add_(v, alpha=-lr)`` do here (checked once); else those two
        ops themselves."""
        lr_k = _torch_check().decayed_lr(self.device, p.dtype, lr, self.kernels)
        if lr_k is None:
            v = self.unpack(plus, tie, p.numel(), p)
            _torch_check().torch_apply_decayed(p.data, v, lr, decay)
        else:
            self.kernels.apply_decayed(p.data, plus, tie, lr_k, decay)

    def lion_update_and_pack(self, grads: list, bufs: list, beta1: float, alpha1: float,
                             beta2: float, alpha2: float, zero_bit: int, outs: list) -> int | None:
        """Lion's local step for several parameters, one kernel pass each, its signs into the
        device words ``outs``: the number of non-finite gradient entries (voted as 0; reading
        it is one wait), or None, with nothing done, unless every gradient and momentum is a
        contiguous float32 tensor of this device and the kernel rounds as torch does here."""
        takes = len(grads) == len(bufs) == len(outs) and all(
            _lion_tensors(g, m, self.device) and isinstance(out, torch.Tensor)
            and out.device == self.device and out.dtype in (torch.int64, torch.uint64)
            and out.dim() == 1 and out.is_contiguous() and out.numel() >= n_words(g.numel())
            for g, m, out in zip(grads, bufs, outs))
        form = _torch_check().lion_form(self.device, self.kernels) if takes else None
        if form is None:
            return None
        return _lion_launch(self.kernels, self.device, form, grads, bufs,
                            (beta1, alpha1, beta2, alpha2), zero_bit, outs)

    def disagreement(self, words: torch.Tensor, plus: torch.Tensor, tie: torch.Tensor | None,
                     n: int | None = None) -> torch.Tensor:
        """Coordinates where ``words`` differ from the vote, ties excluded: a 1-element tensor
        on the device (read it once per step, not per bucket: reading it waits for the GPU)."""
        return self.kernels.disagreement(words.reshape(1, -1), plus, tie, n)

    def unpack(self, plus: torch.Tensor, tie: torch.Tensor | None, n: int, like: torch.Tensor,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """-1 / 0 / +1 of ``n`` coordinates, of ``like``'s dtype, on the device (in ``out`` if
        given), by the apply kernel (:func:`mpisign.backends.signs.unpack_by_apply`)."""
        return unpack_by_apply(self.apply, plus, tie, n, like, out)


def _kernels_work(device: torch.device) -> bool:
    """CUDA, CuPy and the kernels' self-check on ``device`` (checked once; an ERROR if not)."""
    key = ("ok", str(device))
    if key not in _paths:
        _paths[key] = _kernels().available(device)
        if not _paths[key]:
            log.error("GPU kernels unavailable on %s: using the CPU reference path (tensors are "
                      "copied to the host every step)", device)
        elif device.type == "cuda" and torch.cuda.is_available():
            _torch_check().check(device)   # Lion's kernels against torch there, logged
    return _paths[key]


def local_level(device: torch.device) -> int:
    """What ``device`` allows on this rank alone (once each): a :mod:`.startup` level."""
    key = ("level", str(device))
    if key not in _paths:
        from mpi4py import MPI

        from . import aware, startup
        if not _kernels_work(device):
            usable = not torch.cuda.is_available() or startup.device_usable(device)
            _paths[key] = startup.HOST if usable else startup.FAULTED
        elif aware.use_device_buffers(MPI):  # logs, once, which path and why
            _paths[key] = startup.RESIDENT
        else:
            _paths[key] = startup.STAGED
    return _paths[key]


def staged_path(device: torch.device) -> CudaSigns | None:
    """:class:`CudaSigns` for ``device`` (words in host memory), or None without kernels."""
    key = ("staged", str(device))
    if key not in _paths:
        _paths[key] = CudaSigns(device) if _kernels_work(device) else None
    return _paths[key]


def _resident_path(device: torch.device) -> ResidentSigns:
    key = ("resident", str(device))
    if key not in _paths:
        _paths[key] = ResidentSigns(device)
    return _paths[key]


def agreed_level(devices, comm=None, timeout: float | None = None) -> int | None:
    """The level this rank votes at: what its CUDA ``devices`` allow (resident words only on
    one device), and with ``comm`` (a collective on every rank of it, those without CUDA
    tensors included, with ``devices`` empty) the most conservative level of every rank's,
    proven on the wire (:func:`mpisign.cuda.startup.agree`). None: no CUDA tensors here
    (without ``comm``) or on any rank (with it). A faulted device raises
    :class:`mpisign.cuda.startup.DeviceFault` (on every rank, with ``comm``)."""
    from . import startup
    devices = sorted(set(devices), key=str)
    level = None
    if devices:
        level = min(local_level(d) for d in devices)
        if len(devices) > 1:
            level = min(level, startup.STAGED)
    if comm is None or comm.Get_size() == 1:
        if level == startup.FAULTED:
            raise startup.DeviceFault(f"CUDA device {devices[0]} failed its kernels' self-check "
                                      f"and is no longer usable; see the log")
        return level
    timeout = default_timeout() if timeout is None else timeout
    if level == startup.RESIDENT:
        device = devices[0]
        key = ("proven", str(device))
        level = startup.agree(comm, level, _paths.get(key, False),
                              _resident_path(device).words, timeout)
        _paths[key] = _paths.get(key, False) or level == startup.RESIDENT
        return level
    return startup.agree(comm, level, True, CudaSigns.words, timeout)


def device_path(device: torch.device):
    """The GPU path for ``device`` on this rank (the ranks' agreement is
    :func:`agreed_level`'s): :class:`ResidentSigns` if MPI is CUDA-aware, else
    :class:`CudaSigns`; None if the kernels are unavailable or fail their self-check."""
    from . import startup
    level = agreed_level([device])
    if level == startup.RESIDENT:
        return _resident_path(device)
    return staged_path(device) if level == startup.STAGED else None
