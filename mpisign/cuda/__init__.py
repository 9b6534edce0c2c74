"""GPU path: CUDA kernels for packed sign votes, and CUDA-aware MPI with host staging.

- ``signs.cu``: the kernels (pack by warp ballot, bit-sliced majority tally in registers, apply
  of the vote to fp32/fp16/bf16 parameters with weight decay, popcount disagreement; for Lion,
  its local step fused with the pack and the decoupled-decay apply).
- :mod:`.kernels`: those kernels on torch CUDA tensors through CuPy (DLPack, zero copy), with a
  start-up self-check against :mod:`mpisign.backends.packing` that falls back loudly on any mismatch.
- :mod:`.torch_check`: Lion's kernels against torch's own ops on the device, once per device
  (they must round as torch does there, not as the CPU reference); torch's ops where they do not.
- :mod:`.emulate`: the same ``signs.cu`` compiled by g++ through ``host_shim.h`` and run on the
  CPU, so the kernels' logic is tested on machines without a GPU (how the shim runs warps: its
  docstring).
- :mod:`.aware`: CUDA-aware MPI detection, pinned host staging, stream synchronization for MPI.
- :mod:`.bridge`: the two GPU paths of the optimizer and ``majority_vote``: words resident on
  the device for a CUDA-aware MPI, else staged through pinned host memory.

What has been verified without a GPU and what has never run on one: README.md, "GPU path".
"""

from .aware import Staging, detect_cuda_aware, sync_for_mpi, use_device_buffers
from .kernels import (apply, apply_decayed, available, disagreement, lion_update_pack, pack,
                      self_check, tally)

__all__ = [
    "available", "self_check", "pack", "tally", "apply", "disagreement", "apply_decayed",
    "lion_update_pack",
    "detect_cuda_aware", "use_device_buffers", "sync_for_mpi", "Staging",
]
