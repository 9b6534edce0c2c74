"""GPU path: CUDA kernels for packed sign votes, and CUDA-aware MPI with host staging.

- ``signs.cu``: the kernels (pack by warp ballot, bit-sliced majority tally in registers, apply
  of the vote to fp32/fp16/bf16 parameters with weight decay, popcount disagreement).
- :mod:`.kernels`: those kernels on torch CUDA tensors through CuPy (DLPack, zero copy), with a
  start-up self-check against :mod:`mpisign.packing` that falls back loudly on any mismatch.
- :mod:`.emulate`: the same ``signs.cu`` compiled by g++ through ``host_shim.h`` and run on the
  CPU, so the kernels' logic is tested on machines without a GPU.
- :mod:`.aware`: CUDA-aware MPI detection, pinned host staging, stream synchronization for MPI.
- :mod:`.bridge`: the two GPU paths of the optimizer and ``majority_vote``: words resident on
  the device for a CUDA-aware MPI, else staged through pinned host memory.

The host shim
-------------
Each CUDA thread runs as a ucontext fiber; a block's fibers take turns, and a fiber yields only
inside a warp primitive, until all 32 lanes of its warp have arrived. Kernels therefore run
unchanged (no per-warp rewriting that the GPU build would not share), ballots and shuffles see
exactly the lanes' values, and a lane that skips a warp primitive is reported as a deadlock
instead of passing silently. Threads or per-warp loops were the alternatives: OS threads would
need a barrier per primitive and bring scheduling noise for no gain in faithfulness; per-warp
loops would make the kernels a different program from the one the GPU runs.

What is verified without a GPU (tests/test_cuda_*.py)
-----------------------------------------------------
- ``signs.cu`` compiles with nvcc for every architecture it offers of sm_70/80/90 (CUDA 13 has
  dropped sm_70), with no local memory (the tally's counters stay in registers), and with
  NVRTC, the compiler CuPy uses, for sm_70 (NVRTC 12, if installed), sm_80 and sm_90.
- The kernels' logic, via the shim, agrees bit for bit with :mod:`mpisign.packing` and with
  numpy on unpacked signs: ragged lengths, M = 1..9, zeros, NaN, inf, both zero bits,
  fp32/fp16/bf16, several launch geometries (grid-stride loops), no writes past the outputs.
- The self-check's comparison (run on the emulated kernels) and its failure path.
- CUDA-aware detection for each combination of settings; staging byte counts and buffer reuse
  with CPU stand-ins for device memory.
- :mod:`.kernels`' own glue, with its launches run by the shim on CPU tensors
  (:func:`.emulate.kernels_on_cpu`), and through it both paths of :mod:`.bridge`: the
  device-resident one on real MPI ranks for every topology (tensors handed to mpi4py, the
  optimizer bit-identical to the host path), the staged one's pack, apply and staging.

What has never run on a GPU
---------------------------
Everything device-side: the kernels on real hardware (warp scheduling, memory coalescing, the
hardware's own rounding in apply, atomics), CuPy's RawModule load, DLPack exchange with torch
CUDA tensors and stream ordering, pinned-memory asynchronous copies and their events, and any
CUDA-aware MPI transfer of device memory. ``tests/gpu`` (``pytest tests/gpu -s`` on a GPU node)
checks the kernels there, times them, and runs both GPU paths over real ranks; until it has
run, the start-up self-check is the guard.
"""

from mpisign.cuda.aware import Staging, detect_cuda_aware, sync_for_mpi, use_device_buffers
from mpisign.cuda.kernels import apply, available, disagreement, pack, self_check, tally

__all__ = [
    "available", "self_check", "pack", "tally", "apply", "disagreement",
    "detect_cuda_aware", "use_device_buffers", "sync_for_mpi", "Staging",
]
