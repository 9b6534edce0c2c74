"""Checkpoints of a data-parallel run that survive a kill at any instant.

Every rank's optimizer holds its own state (Signum's momentum differs from worker to worker),
so each rank writes its own file; rank 0 also writes the model and the run's books. A save goes
into a fresh directory, and only once every rank's file is on disk does rank 0 swap the pointer
file ``latest`` (write a temporary file, fsync, rename: atomic on POSIX). A run killed mid-save
leaves the previous checkpoint intact and still pointed at::

    OUT/checkpoints/latest                         "step-000001200"
    OUT/checkpoints/step-000001200/common.pt       model, step, epoch, config   (rank 0)
    OUT/checkpoints/step-000001200/rank-00003.pt   optimizer state, RNG states  (each rank)

Each file is a plain dict of tensors, numbers, strings, lists and dicts, and is loaded with
``torch.load(weights_only=True)``: a checkpoint is data, never code. A file in ``OUT`` that
someone else wrote and that holds anything else (a pickle that would call a function) is
refused with :class:`CheckpointError` naming it, and nothing of it runs. Checkpoints written
before this rule (RNG states as numpy arrays) still load: numpy's array reconstruction is the
one thing admitted beyond torch's list. ``OUT`` must be on a file system every rank sees.

Resume: :func:`resume` continues a run from the checkpoint in its ``--out``, after
:func:`load_checkpoint` has checked that the checkpoint belongs to a run like this one.

Preemption: :class:`StopRequest` turns SIGUSR1 / SIGTERM (Slurm's ``--signal``, a time limit)
into a flag the ranks agree on after every step, so that all of them checkpoint and stop.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import torch
from mpi4py import MPI

from ..mpi.comm import bounded
from ..mpi.elastic import abandon
from .metrics import Tally
from .options import ALLREDUCE, UsageError

__all__ = ["CheckpointError", "save", "latest", "load", "load_file", "atomic_save",
           "capture_rng", "restore_rng", "StopRequest", "resume", "find_checkpoint",
           "load_checkpoint", "collectively", "FIXED_ON_RESUME"]

log = logging.getLogger("mpisign.train")

#: Options that must not change on --resume: the checkpoint's state depends on them.
FIXED_ON_RESUME = ("model", "dataset", "optimizer", "batch_size", "seed", "adversaries",
                   "attack", "momentum", "betas", "layers", "width", "heads", "context")

POINTER = "latest"


class CheckpointError(ValueError):
    """A checkpoint file that is not plain data written by this package (or is damaged)."""


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
    return load_file(where / "common.pt", map_location), load_file(own_path, map_location)


def _numpy_array_globals() -> list:
    """What unpickling a plain numpy array needs (old checkpoints' RNG state): array
    reconstruction and plain numeric dtypes, never the object dtype."""
    core = getattr(np, "_core", None) or np.core
    numeric = [type(np.dtype(t)) for t in ("uint32", "int64", "float64")]
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, *numeric]


def load_file(path, map_location="cpu") -> dict:
    """One checkpoint file as a dict, loaded as data only (``weights_only=True``).

    Raises :class:`CheckpointError` naming ``path`` if the file holds anything but tensors and
    plain Python data (a pickle that would call a function: nothing of it is executed), or is
    not a dict or not a torch file at all.
    """
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 -- torch raises UnpicklingError, RuntimeError, ...
        raise CheckpointError(
            f"{path} is not a checkpoint this package can load as plain data "
            f"({_why_refused(e)}). It was "
            f"not run. A checkpoint of mpisign holds only tensors, numbers, strings, lists and "
            f"dicts; a file that asks for anything else was written by someone or something "
            f"else: remove it, or resume from another --out.") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not the dict a checkpoint "
                              f"of mpisign is")
    return obj


def capture_rng() -> dict:
    """This process's RNG states as plain data: Python's (a tuple of ints), NumPy's global
    generator (its key as an int64 tensor), torch's (byte tensors, CPU and CUDA)."""
    kind, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state = {"python": random.getstate(),
             "numpy": (kind, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss),
                       float(gauss)),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(_tuples(state["python"]))
    kind, key, *rest = state["numpy"]
    key = key.numpy() if isinstance(key, torch.Tensor) else np.asarray(key)
    np.random.set_state((kind, key.astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _why_refused(e: Exception) -> str:
    """The line of torch's weights-only error that names what the file asked for."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    named = [ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln]
    return (named or lines or [type(e).__name__])[0].rstrip(".")


def _tuples(x):
    """Python's RNG state as ``random.setstate`` wants it: tuples, even if a list came back."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


class StopRequest:
    """SIGUSR1 / SIGTERM set a flag; the ranks agree on it every step with a nonblocking
    allreduce (Slurm signals the ranks at slightly different instants), so all stop together.
    ``lag``: the agreement posted at step s is read at step s + lag (under --quorum, so that
    no step waits for a late rank); every rank still stops after the same step."""

    def __init__(self, comm, timeout: float | None = None, lag: int = 0):
        self.comm = comm
        self.timeout = timeout  # None: $MPISIGN_TIMEOUT or 300
        self.lag = lag
        self.caught = 0
        self.posted: list = []   # (request, send, agreed) of the steps not read yet
        for s in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(s, self._handler)

    def _handler(self, signum, frame) -> None:
        self.caught = signum

    def post(self) -> None:
        send, agreed = np.array([self.caught], dtype=np.int32), np.zeros(1, dtype=np.int32)
        self.posted.append((self.comm.Iallreduce(send, agreed, op=MPI.MAX), send, agreed))

    def wait(self) -> int:
        """The signal number some rank caught (0: none), as agreed ``lag`` steps ago.
        Overlaps with the step."""
        if len(self.posted) <= self.lag:
            return 0
        request, _, agreed = self.posted.pop(0)
        # Wait on MPI: all ranks must reach the same verdict after the same step.
        bounded(request, f"stop-signal agreement on rank {self.comm.Get_rank()}", self.timeout)
        return int(agreed[0])

    def abandon(self) -> int:
        """After ranks died (--elastic): the agreements still in flight on the old communicator,
        which was revoked, ended without a verdict (none is left pending); the signal this
        rank caught, for the agreement made anew over the survivors."""
        abandon(request for request, _, _ in self.posted)
        self.posted = []
        return self.caught

    def drain(self) -> int:
        """The agreements still in flight, completed (collective); the signal any caught."""
        caught = 0
        while self.posted:
            request, _, agreed = self.posted.pop(0)
            bounded(request, f"stop-signal agreement on rank {self.comm.Get_rank()}",
                    self.timeout)
            caught = caught or int(agreed[0])
        return caught


# -- resume --------------------------------------------------------------------------------------
def resume(run) -> None:
    """Continue from the checkpoint in --out, if there is one: model, optimizer, random
    generators and the books' counters, as they were when it was taken."""
    where = collectively(run.comm, find_checkpoint, run.config, run.built.out)
    if where is None:
        return
    common, own = collectively(run.comm, load_checkpoint, where, run.config, run.built.data, run.comm)
    run.built.model.load_state_dict(common["model"])
    run.opt.load_state_dict(own["optimizer"])
    if own.get("rank") != run.rank:   # a rank new to the run (see load_checkpoint)
        run.opt.state.clear()          # its momentum starts at zero
    else:
        restore_rng(own["rng"])
        run.built.attack_rng.set_state(own["attack_rng"])
        run.epoch_tally = Tally(*own["epoch_sums"])
    saved_spe = common.get("steps_per_epoch")   # in checkpoints since elastic runs
    if saved_spe and saved_spe != run.steps_per_epoch:
        # The schedule stays the first launch's (steps per epoch and in all), whatever the
        # number of ranks now or when the checkpoint was written (after an elastic shrink).
        run.steps_per_epoch = saved_spe
        run.total_steps = run.config.max_steps or run.config.epochs * saved_spe
    run.step, run.evaluated = common["step"], common["evaluated_epochs"]
    run.elapsed_before, run.epoch_started = common["elapsed"], common["epoch_started_at"]
    run.resumed_from = where
    log.info("resuming from %s at step %d", where, run.step)


def find_checkpoint(args, out: Path) -> Path | None:
    """The checkpoint to resume from; refuses to write over a run that was not asked to resume."""
    where = latest(out)
    if where is not None and not args.resume:
        raise UsageError(f"{out} already holds a checkpoint ({where.name}): pass --resume to "
                         f"continue that run, or choose another --out")
    if where is None and args.resume:
        log.warning("--resume: no checkpoint in %s, starting afresh", out)
    return where


def load_checkpoint(where: Path, args, data, comm) -> tuple[dict, dict]:
    """This rank's part of the checkpoint, after checking it belongs to a run like this one."""
    common = load_file(where / "common.pt")
    rank = comm.Get_rank()
    # A different number of ranks: those the checkpoint has load their own state; a new rank
    # takes rank 0's optimizer state (hyperparameters, step) without its momentum.
    own = load_file(where / f"rank-{rank if rank < common['world_size'] else 0:05d}.pt")
    if common["world_size"] != comm.Get_size():
        if args.optimizer in ALLREDUCE:
            raise UsageError(f"{where} was written by {common['world_size']} ranks, this job "
                             f"has {comm.Get_size()}: --optimizer {args.optimizer} resumes on "
                             f"as many ranks")
        if rank == 0:
            log.warning("resuming %d ranks' checkpoint on %d ranks: %s", common["world_size"],
                        comm.Get_size(),
                        f"ranks {common['world_size']}..{comm.Get_size() - 1} start with zero "
                        f"momentum (about 1/(1-momentum) steps to warm up)"
                        if comm.Get_size() > common["world_size"] else
                        f"the momentum of ranks {comm.Get_size()}..{common['world_size'] - 1} "
                        f"is dropped")
    saved = common["config"]
    # The data set: the one the checkpoint was written from against the one loaded now (an
    # older checkpoint's config holds None where the default chose it).
    differ = [k for k in FIXED_ON_RESUME if k != "dataset" and saved.get(k) != getattr(args, k)]
    if common["dataset"] != data.name:
        differ.append("dataset")
    if differ:
        raise UsageError(f"--resume: {', '.join(sorted(set(differ)))} differ from the run in "
                         f"{where} ({', '.join(f'{k}={saved.get(k)!r}' for k in differ)}); "
                         f"they cannot change mid-run")
    changed = {k: (saved[k], v) for k, v in vars(args).items()
               if k in saved and saved[k] != v and k not in ("resume",)}
    if changed and comm.Get_rank() == 0:
        log.info("--resume with changed options (was, now): %s", changed)
    return common, own




def collectively(comm, fn, *args):
    """Run ``fn`` on every rank; if it fails with a user error on any rank, every rank raises
    the same UsageError (instead of the others entering the next collective and waiting)."""
    try:
        result, err = fn(*args), None
    except (UsageError, FileNotFoundError, CheckpointError) as e:   # DataNotFound too
        result, err = None, str(e)
    errors = comm.allgather(err)
    failed = [r for r, e in enumerate(errors) if e]
    if failed:
        where = "" if len(failed) == comm.Get_size() else f" (on rank(s) {failed})"
        raise UsageError(errors[failed[0]] + where)
    return result
