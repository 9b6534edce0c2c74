"""Open MPI's tool interface (MPI_T) through ctypes: force an allreduce algorithm on one
communicator, and read the bytes each rank hands to the PML (exact traffic of MPI collectives).

mpi4py does not wrap MPI_T, so this calls ``libmpi`` directly; every function returns None (and
says why in ``.why``) where the library is not Open MPI or the variable does not exist.

* ``forced_allreduce_comm(comm, 4)``: sets the control variables ``coll_tuned_use_dynamic_rules``
  and ``coll_tuned_allreduce_algorithm`` (Open MPI 5: 1 basic linear, 2 nonoverlapping,
  3 recursive doubling, 4 ring, 5 segmented ring, 6 rabenseifner), duplicates ``comm`` (coll/tuned
  reads them when a communicator is made), then puts them back: one run holds the library's
  default on ``comm`` and the ring on the duplicate. Same as exporting
  ``OMPI_MCA_coll_tuned_use_dynamic_rules=1 OMPI_MCA_coll_tuned_allreduce_algorithm=4``, for
  one communicator only.
* ``PmlMonitor``: the performance variable ``pml_monitoring_messages_size`` (bytes sent to each
  peer). Needs ``OMPI_MCA_pml_monitoring_enable=1`` in the environment at launch.
"""

from __future__ import annotations

import ctypes
import ctypes.util

import numpy as np
from mpi4py import MPI

__all__ = ["ALLREDUCE_RING", "forced_allreduce_comm", "PmlMonitor", "why"]

ALLREDUCE_RING = 4   # coll_tuned_allreduce_algorithm in Open MPI 5 (checked with ompi_info)
_PVAR_CLASS_SIZE = 2  # MPI_T_PVAR_CLASS_SIZE in Open MPI's mpi.h
why = {"lib": None}

_lib = None


def _libmpi():
    """libmpi with the MPI_T symbols, initialised once for this process, or None."""
    global _lib
    if _lib is not None:
        return _lib or None
    _lib = False
    if "Open MPI" not in MPI.Get_library_version():
        why["lib"] = "not Open MPI"
        return None
    for name in ("libmpi.so.40", ctypes.util.find_library("mpi")):
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
            break
        except OSError:
            continue
    else:
        why["lib"] = "libmpi not found by ctypes"
        return None
    provided = ctypes.c_int()
    if lib.MPI_T_init_thread(MPI.THREAD_SINGLE, ctypes.byref(provided)) != 0:
        why["lib"] = "MPI_T_init_thread failed"
        return None
    _lib = lib
    return lib


def _cvar(lib, name):
    index, handle, count = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_int()
    if lib.MPI_T_cvar_get_index(name.encode(), ctypes.byref(index)) != 0:
        return None
    if lib.MPI_T_cvar_handle_alloc(index, None, ctypes.byref(handle), ctypes.byref(count)) != 0:
        return None
    return handle


def _cvar_rw(lib, handle, value=None) -> int:
    v = ctypes.c_int()
    lib.MPI_T_cvar_read(handle, ctypes.byref(v))
    if value is not None:
        if lib.MPI_T_cvar_write(handle, ctypes.byref(ctypes.c_int(value))) != 0:
            raise RuntimeError("MPI_T_cvar_write failed")
    return v.value


def forced_allreduce_comm(comm, algorithm: int = ALLREDUCE_RING):
    """A duplicate of ``comm`` whose MPI_Allreduce uses coll/tuned's ``algorithm``, or None.

    Collective over ``comm``. The other communicators keep the library's own choice.
    """
    lib = _libmpi()
    ok = lib is not None
    handles = None
    if ok:
        handles = (_cvar(lib, "coll_tuned_use_dynamic_rules"),
                   _cvar(lib, "coll_tuned_allreduce_algorithm"))
        ok = None not in handles
        if not ok:
            why["lib"] = "coll/tuned control variables not found"
    # Every rank must take the same branch: Dup is collective.
    if not comm.allreduce(ok, op=MPI.LAND):
        return None
    old = [_cvar_rw(lib, h) for h in handles]
    _cvar_rw(lib, handles[0], 1)
    _cvar_rw(lib, handles[1], algorithm)
    try:
        forced = comm.Dup()
    finally:
        for h, v in zip(handles, old):
            _cvar_rw(lib, h, v)
    return forced


class PmlMonitor:
    """Bytes this rank has sent to each peer of ``MPI_COMM_WORLD`` through the PML, cumulative.

    ``PmlMonitor.open()`` returns None unless Open MPI's pml/monitoring is on
    (``OMPI_MCA_pml_monitoring_enable=1`` at launch). Counts all point-to-point traffic of the
    process, collectives' included, as payload bytes (no headers).
    """

    def __init__(self, lib, session, handle, count):
        self._lib, self._session, self._handle = lib, session, handle
        self._buf = (ctypes.c_size_t * count)()

    @classmethod
    def open(cls, comm=MPI.COMM_WORLD):
        """Collective over ``comm``: a monitor on every rank, or None on every rank."""
        monitor = cls._try_open()
        counting = monitor is not None
        if counting and comm.Get_size() > 1:
            # The variable exists even with monitoring off: check that it counts.
            before = monitor.read().sum()
            comm.allgather(0)
            counting = bool(monitor.read().sum() > before)
            if not counting:
                why["pml"] = "pml/monitoring is not counting (OMPI_MCA_pml_monitoring_enable=1)"
        return monitor if comm.allreduce(counting, op=MPI.LAND) else None

    @classmethod
    def _try_open(cls):
        lib = _libmpi()
        if lib is None:
            return None
        index = ctypes.c_int()
        if lib.MPI_T_pvar_get_index(b"pml_monitoring_messages_size", _PVAR_CLASS_SIZE,
                                    ctypes.byref(index)) != 0:
            why["pml"] = "pml_monitoring_messages_size not found"
            return None
        session, handle, count = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_int()
        world = ctypes.c_void_p(MPI._handleof(MPI.COMM_WORLD))
        if lib.MPI_T_pvar_session_create(ctypes.byref(session)) != 0 or \
                lib.MPI_T_pvar_handle_alloc(session, index, ctypes.byref(world),
                                            ctypes.byref(handle), ctypes.byref(count)) != 0:
            why["pml"] = "could not allocate the pvar handle"
            return None
        if lib.MPI_T_pvar_start(session, handle) != 0:
            why["pml"] = "could not start the pvar"
            return None
        return cls(lib, session, handle, count.value)

    def read(self) -> np.ndarray:
        """Bytes sent so far to each world rank."""
        if self._lib.MPI_T_pvar_read(self._session, self._handle, self._buf) != 0:
            raise RuntimeError("MPI_T_pvar_read failed")
        return np.frombuffer(self._buf, dtype=np.uint64).astype(np.int64)
