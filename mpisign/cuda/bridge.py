"""CUDA tensors in the optimizer and ``majority_vote``: pack and apply on the device.

The signs of a CUDA tensor are packed by the ``pack`` kernel on its device; the packed words
(1/32 of an fp32 gradient) go to host memory, where the topologies of
:mod:`mpisign.collectives` move and tally them; the packed result comes back and the ``apply``
kernel updates the parameters in place, with no float temporary. Only packed words ever cross
the PCIe bus. Whether the MPI library is CUDA-aware is detected and logged once
(:func:`mpisign.cuda.aware.use_device_buffers`); this version's topologies tally on the host
either way, so device buffers are not yet handed to MPI directly.

:func:`device_path` runs the kernels' self-check once per device and returns None when CuPy is
missing or the check fails (logged as an error by the check): callers then take the CPU
reference path, which moves the tensor to the host first.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

__all__ = ["CudaSigns", "device_path"]

log = logging.getLogger(__name__)

_paths: dict = {}
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class CudaSigns:
    """Pack on the device into host words; apply host words to device parameters."""

    def __init__(self, device: torch.device):
        from mpi4py import MPI

        from . import aware
        self.device = device
        aware.use_device_buffers(MPI)  # logs, once, whether MPI could take device buffers
        log.info("GPU path on %s: CuPy kernels pack and apply; packed signs are staged through "
                 "host memory for the vote (the tally runs on the host)", device)

    @staticmethod
    def handles(t: torch.Tensor) -> bool:
        return t.is_cuda and t.dtype in _KERNEL_DTYPES

    def pack(self, src: torch.Tensor, zero_bit: int, out: np.ndarray) -> None:
        from . import kernels
        words = kernels.pack(src, zero_bit)
        # SYNC: .cpu() waits for the pack kernel on the current stream; MPI reads `out` next.
        out[:] = words.cpu().numpy()

    def apply(self, p: torch.Tensor, plus: np.ndarray, tie: np.ndarray | None, lr: float,
              wd: float) -> None:
        from . import kernels
        # Host-to-device copies on the current stream, ordered before the apply kernel.
        plus_d = torch.from_numpy(np.ascontiguousarray(plus)).to(p.device)
        tie_d = None if tie is None else torch.from_numpy(np.ascontiguousarray(tie)).to(p.device)
        kernels.apply(p.data, plus_d, tie_d, lr, wd)


def device_path(device: torch.device) -> CudaSigns | None:
    """The GPU path for ``device`` if its kernels pass their self-check, else None (once each)."""
    key = str(device)
    if key not in _paths:
        from . import kernels
        _paths[key] = CudaSigns(device) if kernels.available(device) else None
        if _paths[key] is None:
            log.error("GPU kernels unavailable on %s: using the CPU reference path (tensors are "
                      "copied to the host every step)", device)
    return _paths[key]
