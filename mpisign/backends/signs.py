"""Choosing the signs backend of a layout: the one module that knows both the host backends
(:mod:`mpisign.backends.host`) and the GPU paths (:mod:`mpisign.cuda.bridge`).

:func:`signs_for` chooses once per layout, from the tensors it holds; the optimizer and
``majority_vote`` both call it, then only call the backend's methods (:class:`Signs`, see
:mod:`mpisign.backends.base`). A CPU-only layout gets a host backend that never asks about CUDA.
"""

from __future__ import annotations

from .base import Signs, host_array, host_tally, host_tensor, unpack_by_apply
from .host import CompiledSigns, HostSigns, host_signs

__all__ = ["Signs", "HostSigns", "CompiledSigns", "gpu_level", "host_array", "host_tally",
           "host_tensor", "signs_for", "staged_at_most", "unpack_by_apply"]


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
    from ..cuda import bridge  # late: a CPU-only job loads no CUDA module before this
    return bridge.agreed_level(devices, comm, timeout)


def staged_at_most(level: int | None) -> int | None:
    """``level`` (:func:`gpu_level`) capped at the staged path (GPU kernels, words in host
    memory), for a vote whose words must be in host memory (a quorum's); None stays None."""
    if level is None:
        return None
    from ..cuda import startup
    return min(level, startup.STAGED)


def signs_for(tensors: list, agreed: int | None = None) -> Signs:
    """The backend for a layout of ``tensors``, chosen once: device-resident words when every
    tensor is contiguous, of a kernel dtype, on one CUDA device whose MPI is CUDA-aware (and
    whose kernels passed their self-check); else words in host memory, with the GPU kernels
    for CUDA tensors where they work. ``agreed`` (:func:`gpu_level`, with the ranks): no path
    above that level, on any device."""
    devices = {t.device for t in tensors if t.is_cuda}
    if not devices:
        return host_signs()
    from ..cuda import bridge, startup
    level = bridge.agreed_level(devices)   # this rank's own, once per device
    if agreed is not None:
        level = min(level, agreed)
    one_device = len(devices) == 1 and all(t.is_cuda and t.is_contiguous() for t in tensors)
    if level == startup.RESIDENT and one_device:
        gpu = bridge.device_path(tensors[0].device)
        if gpu.resident and all(gpu.handles(t) for t in tensors):
            return gpu
    # Words in host memory; CUDA tensors on the staged kernels unless some rank's kernels failed
    # their self-check (then the CPU reference on every rank).
    return bridge.StagedSigns(host_signs(), gpu_kernels=level >= startup.STAGED)
