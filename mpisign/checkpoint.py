"""Checkpoints of a data-parallel run that survive a kill at any instant.

Every rank's optimizer holds its own state (Signum's momentum differs from worker to worker),
so each rank writes its own file; rank 0 also writes the model and the run's books. A save goes
into a fresh directory, and only once every rank's file is on disk does rank 0 swap the pointer
file ``latest`` (write a temporary file, fsync, rename: atomic on POSIX). A run killed mid-save
leaves the previous checkpoint intact and still pointed at::

    OUT/checkpoints/latest                         "step-000001200"
    OUT/checkpoints/step-000001200/common.pt       model, step, epoch, config   (rank 0)
    OUT/checkpoints/step-000001200/rank-00003.pt   optimizer state, RNG states  (each rank)

Each file is a plain dict for ``torch.load``. ``OUT`` must be on a file system every rank sees.

Preemption: :class:`StopRequest` turns SIGUSR1 / SIGTERM (Slurm's ``--signal``, a time limit)
into a flag the ranks agree on after every step, so that all of them checkpoint and stop.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import torch
from mpi4py import MPI

from .collectives.base import bounded

__all__ = ["save", "latest", "load", "atomic_save", "capture_rng", "restore_rng",
           "StopRequest"]

POINTER = "latest"


def _dir(out) -> Path:
    return Path(out) / "checkpoints"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` to ``path`` through a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(out, step: int, common: dict, own: dict, comm, keep: int = 1,
         timeout: float | None = None) -> Path:
    """Collective: every rank of ``comm`` saves ``own``; rank 0 also saves ``common``.

    Returns the checkpoint directory. Older checkpoints beyond the newest ``keep`` are removed.
    A rank that has not written its file after ``timeout`` seconds (default ``$MPISIGN_TIMEOUT``
    or 300) ends the save in :class:`mpisign.collectives.VoteTimeout`; the pointer then still
    names the previous checkpoint.
    """
    rank = comm.Get_rank()
    where = _dir(out) / f"step-{step:09d}"
    where.mkdir(parents=True, exist_ok=True)
    atomic_save(own, where / f"rank-{rank:05d}.pt")
    if rank == 0:
        atomic_save(common, where / "common.pt")
    # Wait on MPI: the pointer may name this directory only once every rank's file is written.
    bounded(comm.Ibarrier(), f"checkpoint at step {step} on rank {rank}: waiting for every "
            f"rank's file", timeout)
    if rank == 0:
        _fsync_dir(where)
        tmp = _dir(out) / f".{POINTER}.tmp"
        tmp.write_text(where.name + "\n")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, _dir(out) / POINTER)
        _fsync_dir(_dir(out))
        old = sorted(p for p in _dir(out).glob("step-*") if p.is_dir() and p != where)
        for p in old[: max(0, len(old) - (keep - 1))]:
            shutil.rmtree(p, ignore_errors=True)
    return where


def latest(out) -> Path | None:
    """The directory the pointer names, or None when ``out`` holds no checkpoint."""
    pointer = _dir(out) / POINTER
    if not pointer.is_file():
        return None
    where = _dir(out) / pointer.read_text().strip()
    if not (where / "common.pt").is_file():
        raise FileNotFoundError(f"{pointer} names {where}, which holds no common.pt: the "
                                f"checkpoint directory was damaged after it was written")
    return where


def load(where: Path, rank: int, map_location="cpu") -> tuple[dict, dict]:
    """``(common, own)`` for ``rank`` from the checkpoint directory ``where``."""
    own_path = where / f"rank-{rank:05d}.pt"
    if not own_path.is_file():
        raise FileNotFoundError(f"{own_path} is missing: the checkpoint was written by fewer "
                                f"ranks than this run has")
    # weights_only=False: the files hold RNG states and config dicts written by this package.
    common = torch.load(where / "common.pt", map_location=map_location, weights_only=False)
    own = torch.load(own_path, map_location=map_location, weights_only=False)
    return common, own


def capture_rng() -> dict:
    """This process's RNG states: Python, NumPy's global generator, torch (CPU, CUDA)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class StopRequest:
    """SIGUSR1 / SIGTERM set a flag; the ranks agree on it every step with a nonblocking
    allreduce (Slurm signals the ranks at slightly different instants), so all stop together."""

    def __init__(self, comm, timeout: float | None = None):
        self.comm = comm
        self.timeout = timeout  # None: $MPISIGN_TIMEOUT or 300
        self.caught = 0
        self.send = np.zeros(1, dtype=np.int32)
        self.agreed = np.zeros(1, dtype=np.int32)
        self.req = None
        for s in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(s, self._handler)

    def _handler(self, signum, frame) -> None:
        self.caught = signum

    def post(self) -> None:
        self.send[0] = self.caught
        self.req = self.comm.Iallreduce(self.send, self.agreed, op=MPI.MAX)

    def wait(self) -> int:
        """The signal number some rank caught (0: none). Overlaps with the step."""
        # Wait on MPI: all ranks must reach the same verdict after the same step.
        bounded(self.req, f"stop-signal agreement on rank {self.comm.Get_rank()}", self.timeout)
        return int(self.agreed[0])