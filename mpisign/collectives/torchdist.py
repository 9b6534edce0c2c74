"""The vote over a ``torch.distributed`` process group: the second transport.

A job launched by ``torchrun`` (or Lightning, Accelerate, a DDP script under ``srun``) has a
process group and may have no MPI at all. :class:`ProcessGroupVote` votes over it with the same
packed words (:mod:`mpisign.backends.packing`), the same tally and so the same bits as the MPI
topologies, through the group's collectives, which every backend has (gloo, NCCL, MPI):

- ``"server"``: a ``gather`` of every rank's words to the group's first rank, which tallies
  them, and a ``broadcast`` of the result (the "+" plane, and the tie plane when the number of
  ranks is even): 1 bit a coordinate up, 1 or 2 down; the root receives ``M - 1`` times that.
- ``"allgather"``: an ``all_gather`` of the words; every rank tallies for itself. One round;
  each rank receives ``M - 1`` bits a coordinate.

``"tree"``, ``"sharded"`` and ``"hierarchical"`` post point-to-point messages of their own
design, several in flight at once under their tags, which a process group's collectives do not
express: they are refused at construction (use them over MPI).

NCCL needs the words on the GPU: with an NCCL group they travel as a CUDA tensor on the
current device. A group's own timeout (``init_process_group(timeout=...)``) bounds each call.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from ..backends.signs import host_tally
from ..mpi.exchanges import zero_flags, zero_mask
from .base import Traffic

__all__ = ["ProcessGroupVote", "GROUP_TOPOLOGIES"]

#: torch 2.14 names the all-gather into one tensor all_gather_single (the old name warns).
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

#: The topologies a process group can carry.
GROUP_TOPOLOGIES = ("server", "allgather")


class ProcessGroupVote:
    """The majority of every rank's packed words over a process group (see the module
    docstring): ``vote(words, n) -> (plus, tie)``, the same on every rank, ``tie`` None when
    the number of ranks is odd. ``group=None``: the default group."""

    def __init__(self, group=None, topology: str = "server", tally=None):
        if topology not in GROUP_TOPOLOGIES:
            raise ValueError(
                f"topology {topology!r} cannot run over a torch.distributed process group: "
                f"it needs several point-to-point messages in flight under tags of its own; "
                f"over a process group use one of {GROUP_TOPOLOGIES}, or vote over MPI")
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized: call "
                               "torch.distributed.init_process_group first, or vote over MPI")
        self.group = group if group is not None else dist.group.WORLD
        self.name = topology
        self.rank = dist.get_rank(self.group)
        self.size = dist.get_world_size(self.group)
        self.root = dist.get_global_rank(self.group, 0)   # the group's first rank, globally
        self.tally = host_tally if tally is None else tally
        self.device = (torch.device("cuda", torch.cuda.current_device())
                       if dist.get_backend(self.group) == "nccl" else torch.device("cpu"))
        self.traffic = Traffic()

    def complete_sends(self) -> None:
        """Nothing is left in flight: the group's collectives return when done (SignVote's
        interface)."""

    def ranks_differing(self, digest: bytes) -> list:
        """All-gather every rank's ``digest`` (its first 8 bytes); the ranks whose digest
        differs from the first rank's."""
        every = self.all_gather(np.frombuffer(digest[:8], dtype=np.uint64))[:, 0].tolist()
        return [r for r in range(self.size) if every[r] != every[0]]

    def all_gather(self, words: np.ndarray) -> np.ndarray:
        """Every rank's ``words`` (uint64, the same count on every rank; a few: they are
        copied), a row a rank."""
        mine = torch.from_numpy(np.array(words, dtype=np.uint64).view(np.int64)).to(self.device)
        every = torch.empty(self.size * mine.numel(), dtype=torch.int64, device=self.device)
        _all_gather(every, mine, group=self.group)
        return every.cpu().numpy().view(np.uint64).reshape(self.size, -1)

    def any_of(self, bits: np.ndarray) -> np.ndarray:
        """The OR over the ranks of ``bits`` (0/1 bytes): a MAX, which every backend reduces."""
        every = torch.from_numpy(np.ascontiguousarray(bits, dtype=np.uint8)).to(self.device)
        dist.all_reduce(every, op=dist.ReduceOp.MAX, group=self.group)
        return every.cpu().numpy()

    def start(self, words, n: int, step: int | None = None, bucket: int = 0):
        """SignVote's interface: the group's collectives return done, so the vote is taken
        here, and :meth:`finish` hands its result on. Every rank starts its votes in one order
        (the optimizer's buckets')."""
        return self.vote(words, n, step, bucket)

    def finish(self, pending):
        return pending

    def all_zero(self, zeros: np.ndarray) -> np.ndarray | None:
        """The coordinates exactly 0 on every rank, from each rank's zero mask ``zeros``
        (words), as :func:`mpisign.mpi.exchanges.all_zero` finds them over MPI: two flags a
        word first, then only the words every rank flagged. A MIN of 0/1 bytes is an AND that every
        backend reduces (NCCL has no bitwise AND), so the masks travel unpacked, one byte a
        coordinate of the shared words. None where no word is flagged by every rank."""
        if zeros.size == 0:
            return None
        flags = torch.from_numpy(zero_flags(zeros)).to(self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=self.group)

        def and_words(words: np.ndarray) -> np.ndarray:
            bits = torch.from_numpy(np.unpackbits(words.view(np.uint8), bitorder="little"))
            bits = bits.to(self.device)
            dist.all_reduce(bits, op=dist.ReduceOp.MIN, group=self.group)
            return np.packbits(bits.cpu().numpy(), bitorder="little").view(np.uint64)
        return zero_mask(zeros, flags.cpu().numpy(), and_words)

    def vote(self, words: np.ndarray, n: int, step: int | None = None, bucket: int = 0):
        """Majority of every rank's ``words`` (``n`` packed bits): ``(plus, tie)`` as numpy
        words. ``step`` and ``bucket`` are accepted for the SignVote interface."""
        mine = torch.from_numpy(np.ascontiguousarray(words).view(np.int64)).to(self.device)
        w = mine.numel()
        if self.name == "allgather":
            every = torch.empty(self.size * w, dtype=torch.int64, device=self.device)
            _all_gather(every, mine, group=self.group)
            self.traffic.sent += 8 * w * (self.size - 1)
            self.traffic.received += 8 * w * (self.size - 1)
            return self.tally(every.cpu().numpy().view(np.uint64).reshape(self.size, w), n)
        return self._server(mine, w, n)

    def _server(self, mine: torch.Tensor, w: int, n: int):
        planes = 1 if self.size % 2 else 2
        result = torch.empty(planes * w, dtype=torch.int64, device=self.device)
        if self.rank == 0:
            every = [torch.empty_like(mine) for _ in range(self.size)]
            dist.gather(mine, every, dst=self.root, group=self.group)
            plus, tie = self.tally(torch.stack(every).cpu().numpy().view(np.uint64), n)
            result[:w] = torch.from_numpy(np.ascontiguousarray(plus).view(np.int64))
            if tie is not None:
                result[w:] = torch.from_numpy(np.ascontiguousarray(tie).view(np.int64))
            self.traffic.received += 8 * w * (self.size - 1)
            self.traffic.sent += 8 * planes * w * (self.size - 1)
        else:
            dist.gather(mine, None, dst=self.root, group=self.group)
            self.traffic.sent += 8 * w
            self.traffic.received += 8 * planes * w
        dist.broadcast(result, src=self.root, group=self.group)
        words = result.cpu().numpy().view(np.uint64)
        return words[:w], (words[w:] if planes == 2 else None)
