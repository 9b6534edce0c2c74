"""CUDA-aware MPI: detect it, or stage device buffers through pinned host memory.

:func:`detect_cuda_aware` decides whether device buffers may go straight to mpi4py; the first
rule that speaks wins:

1. the user: ``MPISIGN_CUDA_AWARE=1`` or ``0``;
2. the MPI library's own answer, final when there is one: ``MPIX_Query_cuda_support()``
   (``MPI.Query_cuda_support()`` where mpi4py has it, else the symbol looked up in the libmpi
   this process has loaded; Open MPI and MPICH 4.1+ have it). Open MPI answers 0 for some
   UCX builds that do move device memory (open-mpi/ompi#7963, #11070): those take the staged
   path unless the user says ``MPISIGN_CUDA_AWARE=1``, because a wrong yes crashes;
3. settings of the library that is running, for libraries that do not answer (the library
   from ``MPI.Get_library_version()``):

   ============  ================================================================
   Cray MPICH    ``MPICH_GPU_SUPPORT_ENABLED=1`` / ``0``
   MVAPICH2      ``MV2_USE_CUDA=1`` / ``0``
   Open MPI      ``OMPI_MCA_opal_cuda_support=true`` / ``false``
   MPICH         ``MPIR_CVAR_ENABLE_GPU=0`` only (its default, 1, means nothing in a build
                 without GPU support)
   ============  ================================================================

   and UCX's own (``UCX_TLS`` naming or excluding a cuda transport, ``UCX_MEMTYPE_CACHE=n``)
   only when this process has loaded UCX (``libucp``), so a job script that exports every
   MPI's settings (``slurm/multinode.sbatch``) does not make another MPI look CUDA-aware;
4. otherwise: not aware.

A wrong yes crashes (MPI dereferences a device pointer on the host), a wrong no only costs
copies; hence only the library's word and its own explicit settings count.
:func:`use_device_buffers` logs the decision and its reason once, as a WARNING when staging, so
a slow path is never silent. :class:`Staging` holds the host buffers, allocated once per slot
and reused.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

import numpy as np
import torch

__all__ = ["OVERRIDE_ENV", "detect_cuda_aware", "library_of", "use_device_buffers",
           "sync_for_mpi", "Staging"]

log = logging.getLogger(__name__)

OVERRIDE_ENV = "MPISIGN_CUDA_AWARE"
_TRUE = {"1", "true", "yes", "on", "y", "enabled"}
_FALSE = {"0", "false", "no", "off", "n", "disabled"}
# The running library -> its switch: (variable, what it is, whether its "on" counts).
_SWITCHES = {
    "cray-mpich": ("MPICH_GPU_SUPPORT_ENABLED", "Cray MPICH GPU support", True),
    "mvapich": ("MV2_USE_CUDA", "MVAPICH2 CUDA support", True),
    "openmpi": ("OMPI_MCA_opal_cuda_support", "Open MPI CUDA support", True),
    "mpich": ("MPIR_CVAR_ENABLE_GPU", "MPICH GPU support", False),
}
_logged: set[tuple[bool, str]] = set()


def _loaded_libraries(library_part: str) -> set[str]:
    """Paths of the shared libraries this process has loaded whose path contains
    ``library_part`` (empty where /proc/self/maps cannot be read)."""
    try:
        with open("/proc/self/maps") as maps:
            return {line.split()[-1] for line in maps if library_part in line and "/" in line}
    except OSError:
        return set()


def _loaded_symbol(library_part: str, symbol: str):
    """``symbol`` from an already loaded shared library whose path contains ``library_part``."""
    for path in sorted(_loaded_libraries(library_part)):
        try:
            return getattr(ctypes.CDLL(path), symbol)
        except (OSError, AttributeError):
            continue
    return None


def _query_library(mpi) -> int | None:
    """MPIX_Query_cuda_support(): 1, 0, or None when there is no answer."""
    if mpi is None:
        return None
    try:
        if hasattr(mpi, "Query_cuda_support"):
            return int(mpi.Query_cuda_support())
        if getattr(mpi, "__name__", "") == "mpi4py.MPI" and mpi.Is_initialized():
            fn = _loaded_symbol("libmpi", "MPIX_Query_cuda_support")
            if fn is not None:
                fn.restype, fn.argtypes = ctypes.c_int, []
                return int(fn())
    except Exception as exc:  # an odd binding must not stop training: no answer
        log.debug("MPIX_Query_cuda_support failed: %s", exc)
    return None


def _ucx_tls(value: str) -> bool | None:
    """What ``UCX_TLS`` says about CUDA memory: True, False or None (nothing)."""
    items = [s.strip().lower() for s in value.split(",") if s.strip()]
    if not items:
        return None
    if items[0].startswith("^"):  # an exclusion list
        items[0] = items[0][1:]
        return False if {"cuda", "cuda_copy"} & set(items) else None
    if "all" in items:
        return None
    return any(s.startswith("cuda") for s in items)


def library_of(mpi) -> str | None:
    """The MPI library mpi4py runs on: "openmpi", "cray-mpich", "mvapich", "mpich", "intel",
    or None when there is no module or no answer (``MPI_Get_library_version`` needs no init)."""
    try:
        version = mpi.Get_library_version()
    except Exception:   # no module, a stand-in without it, an odd binding
        return None
    for mark, name in (("Open MPI", "openmpi"), ("CRAY MPICH", "cray-mpich"),
                       ("MVAPICH", "mvapich"), ("Intel(R) MPI", "intel"), ("MPICH", "mpich")):
        if mark.lower() in version.lower():
            return name
    return None


def _ucx_loaded() -> bool:
    return bool(_loaded_libraries("libucp"))


def detect_cuda_aware(mpi_module=None, environ=None, ucx=None) -> tuple[bool, str]:
    """Whether MPI can take device buffers, and why (see the module docstring for the rules).

    ``mpi_module`` defaults to mpi4py.MPI if it is already imported (this never initializes
    MPI); ``environ`` defaults to ``os.environ``; ``ucx`` (whether MPI runs on UCX) to whether
    this process has loaded ``libucp``.
    """
    env = os.environ if environ is None else environ
    # Step 1: the user's word.
    if OVERRIDE_ENV in env:
        value = env[OVERRIDE_ENV].strip().lower()
        if value not in _TRUE | _FALSE:
            raise ValueError(f"{OVERRIDE_ENV}={env[OVERRIDE_ENV]!r}: expected 1 or 0")
        return value in _TRUE, f"{OVERRIDE_ENV}={env[OVERRIDE_ENV]} (user override)"
    # Step 2: the library's answer.
    mpi = sys.modules.get("mpi4py.MPI") if mpi_module is None else mpi_module
    answer = _query_library(mpi)
    if answer in (0, 1):
        return bool(answer), (f"MPIX_Query_cuda_support() = {answer}, the MPI library's own "
                              f"answer" + ("" if answer else f" (set {OVERRIDE_ENV}=1 if it is "
                                                             f"wrong)"))
    # Step 3: the running library's settings, then UCX's if it runs on UCX; offs first.
    library = library_of(mpi)
    said = []
    if library in _SWITCHES:
        var, what, on_counts = _SWITCHES[library]
        value = env.get(var, "").strip().lower()
        if value in _FALSE:
            return False, f"{var}={env[var]} turns off {what}"
        if value in _TRUE and on_counts:
            said.append((True, f"{var}={env[var]} turns on {what}"))
    if _ucx_loaded() if ucx is None else ucx:
        tls = _ucx_tls(env.get("UCX_TLS", ""))
        if tls is False:
            return False, f"UCX_TLS={env['UCX_TLS']} leaves out UCX's cuda transports"
        if tls:
            said.append((True, f"UCX_TLS={env['UCX_TLS']} names a cuda transport"))
        if env.get("UCX_MEMTYPE_CACHE", "").strip().lower() in _FALSE:
            said.append((True, f"UCX_MEMTYPE_CACHE={env['UCX_MEMTYPE_CACHE']} (a CUDA-aware "
                               f"UCX setting)"))
    if said:
        return said[0]
    # Step 4.
    where = f"{library or 'an unknown MPI library'} gives no answer and "
    return False, where + f"no setting of its own marks it CUDA-aware (set {OVERRIDE_ENV}=1 if it is)"


def use_device_buffers(mpi_module=None, environ=None) -> bool:
    """:func:`detect_cuda_aware`, logging the path taken once per process (per decision)."""
    aware, reason = detect_cuda_aware(mpi_module, environ)
    if (aware, reason) not in _logged:
        _logged.add((aware, reason))
        if aware:
            log.info("CUDA-aware MPI: device buffers go straight to MPI (%s)", reason)
        else:
            log.warning("MPI is not known to be CUDA-aware: staging device buffers through pinned "
                        "host memory, which costs two copies per message (%s)", reason)
    return aware


def sync_for_mpi(device, settled: bool = False) -> None:
    """Wait for the work queued on ``device``'s current CUDA stream (no-op for the CPU).

    MPI reads and writes device memory outside any CUDA stream, so a buffer that a kernel is
    still producing must be finished before it is handed to MPI. ``settled``: the stream was
    synchronized earlier in the same phase of a vote; then a query, which does not block,
    decides, and the stream is synchronized again only if work was queued since.
    """
    device = torch.device(device)
    if device.type == "cuda":
        stream = torch.cuda.current_stream(device)
        if settled and stream.query():
            return
        stream.synchronize()  # SYNC: MPI is about to touch the buffer


def _numpy(t: torch.Tensor) -> np.ndarray:
    """numpy view of a CPU tensor; dtypes numpy lacks (bfloat16) as same-size integers."""
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy()


class Staging:
    """Host buffers through which device buffers reach an MPI that is not CUDA-aware.

    One buffer per named slot ("send", "recv", ...), allocated at first use and again only when
    a larger one is asked for, never per call. Usage per message::

        send = staging.to_host(packed_words)                 # device -> host, synchronized
        recv = staging.host("recv", (m, words))              # host array for MPI to fill
        comm.Allgather(send, recv)
        staging.to_device("recv", all_words)                 # host -> device, asynchronous
    """

    def __init__(self, pin_memory: bool | None = None):
        # What users choose: page-locked buffers (fast, asynchronous DMA); False for CPU stand-ins.
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        # Internal: slot -> uint8 host tensor; slot -> event of a copy still reading that buffer.
        self._buffers: dict[str, torch.Tensor] = {}
        self._pending: dict[str, torch.cuda.Event] = {}
        # Statistics: allocations stay flat in steady state; bytes staged each way.
        self.allocations = 0
        self.bytes_to_host = 0
        self.bytes_to_device = 0

    def _wait(self, slot: str) -> None:
        event = self._pending.pop(slot, None)
        if event is not None:
            event.synchronize()  # SYNC: a host-to-device copy still reads this buffer; the CPU writes next

    def buffer(self, slot: str, nbytes: int) -> torch.Tensor:
        """The slot's host buffer as ``nbytes`` uint8, grown (reallocated) only if too small."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        self._wait(slot)
        buf = self._buffers.get(slot)
        if buf is None or buf.numel() < nbytes:
            buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin_memory)
            self._buffers[slot] = buf
            self.allocations += 1
            log.debug("staging slot %r: %d bytes (pinned=%s)", slot, nbytes, self.pin_memory)
        return buf[:nbytes]

    def host(self, slot: str, shape, dtype: torch.dtype = torch.uint64) -> np.ndarray:
        """A host array of ``shape`` and ``dtype`` in the slot's buffer, e.g. for MPI to fill."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        numel = int(np.prod(shape, dtype=np.int64))
        t = self.buffer(slot, numel * torch.empty(0, dtype=dtype).element_size()).view(dtype)
        return _numpy(t.view(shape))

    def to_host(self, t: torch.Tensor, slot: str = "send") -> np.ndarray:
        """Copy ``t`` into the slot's buffer and return it as a numpy array of t's shape."""
        if not t.is_contiguous():
            raise ValueError("to_host needs a contiguous tensor (one copy, no gather)")
        nbytes = t.numel() * t.element_size()
        host = self.buffer(slot, nbytes).view(t.dtype).view(t.shape)
        host.copy_(t, non_blocking=self.pin_memory and t.is_cuda)
        if t.is_cuda:
            torch.cuda.current_stream(t.device).synchronize()  # SYNC: MPI reads the host copy next
        self.bytes_to_host += nbytes
        return _numpy(host)

    def to_device(self, slot: str, out: torch.Tensor) -> torch.Tensor:
        """Copy the first ``out``-sized bytes of the slot's buffer into ``out``; returns ``out``.

        On a pinned buffer the copy is asynchronous on the current stream; the next use of the
        slot from the CPU (:meth:`host`, :meth:`to_host`, :meth:`buffer`) waits for it.
        """
        if not out.is_contiguous():
            raise ValueError("to_device needs a contiguous output tensor")
        nbytes = out.numel() * out.element_size()
        buf = self._buffers.get(slot)
        if buf is None or buf.numel() < nbytes:
            raise ValueError(f"slot {slot!r} holds {0 if buf is None else buf.numel()} bytes, "
                             f"out needs {nbytes}")
        self._wait(slot)
        src = buf[:nbytes].view(out.dtype).view(out.shape)
        asynchronous = self.pin_memory and out.is_cuda
        out.copy_(src, non_blocking=asynchronous)
        if asynchronous:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(out.device))
            self._pending[slot] = event
        self.bytes_to_device += nbytes
        return out
