"""The same start on every rank, and every rank's optimizer state in one file.

Majority vote keeps the ranks' parameters identical only if they start identical; and each
rank's Signum momentum is its own, so a checkpoint of ``opt.state_dict()`` from one rank does
not resume the others. These helpers are collective over ``comm``, bounded by ``timeout``
(default ``$MPISIGN_TIMEOUT`` or 300 s): a rank that does not take part raises ``VoteTimeout``
on the others instead of hanging them.

* :func:`broadcast_parameters`: root's parameters (and a module's buffers) on every rank, as
  DDP does at construction (Horovod: ``broadcast_parameters``).
* :func:`gather_state_dict` / :func:`scatter_state_dict`: every rank's ``opt.state_dict()``
  gathered to ``root`` as one plain dict, for a checkpoint that ``root`` alone writes, and
  handed back rank by rank on resume. The dict is data: tensors, numbers, lists and dicts, as
  ``torch.load(weights_only=True)`` takes them.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from mpi4py import MPI

from ..mpi.comm import bounded, check_comm, wait_all
from .grouped import is_process_group

__all__ = ["broadcast_parameters", "gather_state_dict", "scatter_state_dict"]

#: Tag of the state messages (on the optimizer's own communicator: no clash with votes).
_STATE_TAG = 0x0F00


def broadcast_parameters(model_or_params, comm=None, root: int = 0,
                         timeout: float | None = None) -> None:
    """Give every rank ``root``'s values of a module's parameters and buffers (its
    ``state_dict()`` tensors), or of an iterable of tensors, in place."""
    comm = check_comm(MPI.COMM_WORLD if comm is None else comm)
    if isinstance(model_or_params, torch.nn.Module):
        tensors = list(model_or_params.state_dict().values())
    else:
        tensors = list(model_or_params)
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        raise ValueError("broadcast_parameters takes a torch.nn.Module or tensors")
    for t in tensors:
        host = t.detach().cpu().contiguous()
        bounded(comm.Ibcast(host.reshape(-1).view(torch.uint8).numpy(), root=root),
                f"broadcast of rank {root}'s parameters on rank {comm.Get_rank()}", timeout)
        if host.data_ptr() != t.data_ptr():
            with torch.no_grad():
                t.copy_(host)


def _encode(obj) -> np.ndarray:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return np.frombuffer(buf.getbuffer(), dtype=np.uint8).copy()


def _decode(data: np.ndarray):
    return torch.load(io.BytesIO(data.tobytes()), map_location="cpu", weights_only=True)


def _own_comm(opt):
    engine = getattr(opt, "engine", None)
    if engine is None:
        raise ValueError(f"expected an mpisign optimizer (Signum, SignSGD), got "
                         f"{type(opt).__name__}")
    comm = engine.private_comm()
    if is_process_group(comm):
        raise ValueError(f"{type(opt).__name__} votes over a torch.distributed process group: "
                         f"gathering and scattering its state go over MPI, not supported "
                         f"there yet; save opt.state_dict() on every rank (one file a rank)")
    return comm


def gather_state_dict(opt, root: int = 0) -> dict | None:
    """Collective: ``{"world_size": M, "ranks": [state_dict of rank 0, ..., of rank M-1]}`` on
    ``root``, None on the other ranks."""
    comm = _own_comm(opt)
    rank, size = comm.Get_rank(), comm.Get_size()
    timeout = opt.timeout
    mine = _encode(opt.state_dict())
    sizes = np.zeros(size, dtype=np.int64)
    # Wait on MPI: root sizes its receive buffers from every rank's length.
    length = np.array([mine.size], dtype=np.int64)   # a name: alive until MPI is done
    bounded(comm.Igather(length, sizes, root=root), f"gather_state_dict: lengths on rank {rank}",
            timeout)
    if rank != root:
        req = comm.Isend(mine, dest=root, tag=_STATE_TAG)
        wait_all([req], [root], timeout, f"gather_state_dict: rank {rank} sending to {root}")
        return None
    parts = [mine if r == root else np.empty(int(sizes[r]), dtype=np.uint8) for r in range(size)]
    others = [r for r in range(size) if r != root]
    reqs = [comm.Irecv(parts[r], source=r, tag=_STATE_TAG) for r in others]
    wait_all(reqs, others, timeout, f"gather_state_dict on rank {root}")
    return {"world_size": size, "ranks": [_decode(p) for p in parts]}


def scatter_state_dict(opt, state: dict | None, root: int = 0) -> None:
    """Collective: each rank loads its own entry of ``state`` (as :func:`gather_state_dict`
    made it; only ``root``'s argument is read) into ``opt``. Every rank raises ValueError if
    ``state`` was gathered from a different number of ranks."""
    comm = _own_comm(opt)
    rank, size = comm.Get_rank(), comm.Get_size()
    timeout = opt.timeout
    verdict = np.zeros(1, dtype=np.int64)
    if rank == root:
        ok = (isinstance(state, dict) and isinstance(state.get("ranks"), list)
              and state.get("world_size") == len(state["ranks"]))
        verdict[0] = state["world_size"] if ok else -1
    # Wait on MPI: every rank learns whether root's state fits, before any of it moves.
    bounded(comm.Ibcast(verdict, root=root), f"scatter_state_dict: check on rank {rank}",
            timeout)
    if verdict[0] != size:
        got = "not a gather_state_dict result" if verdict[0] < 0 else f"{verdict[0]} ranks"
        raise ValueError(f"scatter_state_dict: the state on rank {root} is {got}, this "
                         f"communicator has {size} ranks")
    parts = [_encode(s) for s in state["ranks"]] if rank == root else None
    sizes = np.array([p.size for p in parts], dtype=np.int64) if rank == root else None
    mine = np.zeros(1, dtype=np.int64)
    # Wait on MPI: each rank sizes its receive buffer from root's figure.
    bounded(comm.Iscatter(sizes, mine, root=root), f"scatter_state_dict: lengths on rank "
            f"{rank}", timeout)
    if rank == root:
        others = [r for r in range(size) if r != root]
        reqs = [comm.Isend(parts[r], dest=r, tag=_STATE_TAG) for r in others]
        # Wait on MPI: the parts must be out before their buffers go.
        wait_all(reqs, others, timeout, f"scatter_state_dict on rank {root}")
        opt.load_state_dict(state["ranks"][root])
        return
    data = np.empty(int(mine[0]), dtype=np.uint8)
    req = comm.Irecv(data, source=root, tag=_STATE_TAG)
    wait_all([req], [root], timeout, f"scatter_state_dict on rank {rank}")
    opt.load_state_dict(_decode(data))
