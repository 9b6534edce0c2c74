"""The vote over a ``torch.distributed`` process group: the second transport.

A job launched by ``torchrun`` (or Lightning, Accelerate, a DDP script under ``srun``) has a
process group and may have no MPI at all. The classes here vote over it with the same packed
words (:mod:`mpisign.backends.packing`), the same tally and so the same bits as the MPI
topologies, one class a topology behind :class:`ProcessGroupVote`'s interface
(:func:`make_group_vote` picks it):

- ``"server"``: a ``gather`` of every rank's words to the group's first rank, which tallies
  them, and a ``broadcast`` of the result (the "+" plane, and the tie plane when the number of
  ranks is even): 1 bit a coordinate up, 1 or 2 down; the root receives ``M - 1`` times that.
- ``"allgather"``: an ``all_gather`` of the words; every rank tallies for itself. One round;
  each rank receives ``M - 1`` bits a coordinate.
- ``"sharded"``: an ``all_to_all_single`` gives rank ``j`` shard ``j`` of every rank's words,
  it tallies that shard, and an ``all_gather`` gives every rank every voted shard. The shards
  are ``ceil(W / M)`` words each (the last ones padded with zero words, which the tally never
  counts), so that both calls move equal pieces, which every backend takes.
- ``"tree"``: the binomial tree of :mod:`mpisign.collectives.tree` over the group's tagged
  ``isend``/``irecv``: every rank adds its children's bit-sliced counts to its own vote and
  passes the sum to its parent, the group's first rank takes the majority, and the result goes
  back down the same edges.

``"hierarchical"`` needs the ranks split by node into groups of their own, which
``torch.distributed.new_group`` makes only as a collective of the whole default group: it is
refused at construction (vote over MPI for it, or use ``"sharded"`` or ``"tree"``).

NCCL needs the words on the GPU: with an NCCL group they travel as a CUDA tensor on the
current device (never run here: no GPU). A group's own timeout (``init_process_group(timeout=
...)``) bounds each call.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from ..backends import packing
from ..backends.signs import host_tally
from ..mpi.exchanges import zero_flags, zero_mask
from .base import TAG_BASE, Traffic, result_planes
from .tree import subtree_count, tree_children, tree_parent

__all__ = ["ProcessGroupVote", "GroupServer", "GroupAllgather", "GroupSharded", "GroupTree",
           "GROUP_TOPOLOGIES", "check_group_topology", "make_group_vote"]

#: torch 2.14 names the all-gather into one tensor all_gather_single (the old name warns).
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

#: The tree's message tags: in the block the MPI votes use (above a user's small tags), on the
#: group's own channel (NCCL ignores tags; its messages between two ranks keep their order).
COUNTS, RESULT = TAG_BASE, TAG_BASE + 1


class ProcessGroupVote:
    """The majority of every rank's packed words over a process group (see the module
    docstring): ``vote(words, n) -> (plus, tie)``, the same on every rank, ``tie`` None when
    the number of ranks is odd. ``group=None``: the default group. A topology's class
    implements :meth:`_vote`; this base also serves the step's small exchanges (the header,
    the ORs and ANDs), whatever the topology."""

    name = "?"

    def __init__(self, group=None, tally=None):
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized: call "
                               "torch.distributed.init_process_group first, or vote over MPI")
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.size = dist.get_world_size(self.group)
        self.root = dist.get_global_rank(self.group, 0)   # the group's first rank, globally
        self.tally = host_tally if tally is None else tally
        self.device = (torch.device("cuda", torch.cuda.current_device())
                       if dist.get_backend(self.group) == "nccl" else torch.device("cpu"))
        self.planes = result_planes(self.size)   # 2 (plus, tie) when a tie is possible
        self.traffic = Traffic()

    def complete_sends(self) -> None:
        """Nothing is left in flight: every vote waits for its own messages (SignVote's
        interface)."""

    def ranks_differing(self, digest: bytes) -> list:
        """All-gather every rank's ``digest`` (its first 8 bytes); the ranks whose digest
        differs from the first rank's."""
        every = self.all_gather(np.frombuffer(digest[:8], dtype=np.uint64))[:, 0].tolist()
        return [r for r in range(self.size) if every[r] != every[0]]

    def all_gather(self, words: np.ndarray) -> np.ndarray:
        """Every rank's ``words`` (uint64, the same count on every rank; a few: they are
        copied), a row a rank."""
        mine = self._tensor(np.array(words, dtype=np.uint64))
        every = torch.empty(self.size * mine.numel(), dtype=torch.int64, device=self.device)
        _all_gather(every, mine, group=self.group)
        return _words(every).reshape(self.size, -1)

    def any_of(self, bits: np.ndarray) -> np.ndarray:
        """The OR over the ranks of ``bits`` (0/1 bytes): a MAX, which every backend reduces."""
        every = torch.from_numpy(np.ascontiguousarray(bits, dtype=np.uint8)).to(self.device)
        dist.all_reduce(every, op=dist.ReduceOp.MAX, group=self.group)
        return every.cpu().numpy()

    def start(self, words, n: int, step: int | None = None, bucket: int = 0):
        """SignVote's interface: the group's calls are waited for within the vote, so the
        vote is taken here, and :meth:`finish` hands its result on. Every rank starts its votes
        in one order (the optimizer's buckets')."""
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
        return self._vote(self._tensor(words), n)

    def _vote(self, mine: torch.Tensor, n: int):
        raise NotImplementedError

    # -- helpers for the topologies ----------------------------------------------------------
    def _tensor(self, words: np.ndarray) -> torch.Tensor:
        """Numpy words as int64 on the group's device (the same 64 bits a word)."""
        return torch.from_numpy(np.ascontiguousarray(words).view(np.int64)).to(self.device)

    def _moved(self, sent_words: int, received_words: int) -> None:
        self.traffic.sent += 8 * sent_words
        self.traffic.received += 8 * received_words
        self.traffic.votes += 1


def _words(t: torch.Tensor) -> np.ndarray:
    """int64 words (on any device) as numpy uint64 words."""
    return t.cpu().numpy().view(np.uint64)


class GroupServer(ProcessGroupVote):
    """Gather to the group's first rank, tally there, broadcast the result."""

    name = "server"

    def _vote(self, mine, n):
        w, k, m = mine.numel(), self.planes, self.size
        result = torch.empty(k * w, dtype=torch.int64, device=self.device)
        if self.rank == 0:
            every = [torch.empty_like(mine) for _ in range(m)]
            dist.gather(mine, every, dst=self.root, group=self.group)
            plus, tie = self.tally(_words(torch.stack(every)), n)
            result[:w] = self._tensor(plus)
            if tie is not None:
                result[w:] = self._tensor(tie)
            self._moved(k * w * (m - 1), w * (m - 1))
        else:
            dist.gather(mine, None, dst=self.root, group=self.group)
            self._moved(w, k * w)
        dist.broadcast(result, src=self.root, group=self.group)
        words = _words(result)
        return words[:w], (words[w:] if k == 2 else None)


class GroupAllgather(ProcessGroupVote):
    """Every rank gathers every rank's words and tallies them itself."""

    name = "allgather"

    def _vote(self, mine, n):
        w, m = mine.numel(), self.size
        every = torch.empty(m * w, dtype=torch.int64, device=self.device)
        _all_gather(every, mine, group=self.group)
        self._moved(w * (m - 1), w * (m - 1))
        return self.tally(_words(every).reshape(m, w), n)


class GroupSharded(ProcessGroupVote):
    """An all-to-all of the words' shards, a tally of this rank's shard, an all-gather of the
    voted shards (see the module docstring)."""

    name = "sharded"

    def _vote(self, mine, n):
        w, k, m, r = mine.numel(), self.planes, self.size, self.rank
        s = -(-w // m)   # words a shard; the padding past w is zero words, never counted
        padded = torch.zeros(m * s, dtype=torch.int64, device=self.device)
        padded[:w] = mine
        shards = torch.empty_like(padded)   # row j: rank j's words of this rank's shard
        dist.all_to_all_single(shards, padded, group=self.group)
        real = max(0, min(w - s * r, s))   # this shard's words before the padding
        voted = torch.zeros((k, s), dtype=torch.int64, device=self.device)
        if real:
            rows = np.ascontiguousarray(_words(shards).reshape(m, s)[:, :real])
            plus, tie = self.tally(rows, min(n - 64 * s * r, 64 * real))
            voted[0, :real] = self._tensor(plus)
            if tie is not None:
                voted[1, :real] = self._tensor(tie)
        every = torch.empty(m * k * s, dtype=torch.int64, device=self.device)
        _all_gather(every, voted.view(-1), group=self.group)
        self._moved((1 + k) * s * (m - 1), (1 + k) * s * (m - 1))
        words = _words(every.view(m, k, s).transpose(0, 1).contiguous().view(k, m * s))
        return words[0, :w], (words[1, :w] if k == 2 else None)


class GroupTree(ProcessGroupVote):
    """The binomial tree's counts up to the group's first rank and its result back down, over
    tagged point-to-point messages (see the module docstring)."""

    name = "tree"

    def __init__(self, group=None, tally=None):
        super().__init__(group, tally)
        self.children = tree_children(self.rank, self.size)   # (child, subtree size)
        self.parent = tree_parent(self.rank)

    def _vote(self, mine, n):
        w, k = mine.numel(), self.planes
        counts = [(torch.empty((packing.count_planes(s), w), dtype=torch.int64,
                               device=self.device), s) for _, s in self.children]
        self._wait([dist.irecv(buf, group=self.group, group_src=child, tag=COUNTS)
                    for (child, _), (buf, _) in zip(self.children, counts)])
        count = subtree_count(_words(mine), [(_words(buf), s) for buf, s in counts])
        result = torch.empty((k, w), dtype=torch.int64, device=self.device)
        received = sum(buf.numel() for buf, _ in counts)
        if self.parent is None:
            plus, tie = packing.majority(count, self.size, n)
            result[0] = self._tensor(plus)
            if tie is not None:
                result[1] = self._tensor(tie)
            sent = 0
        else:
            up = self._tensor(np.ascontiguousarray(count))
            self._wait([dist.isend(up, group=self.group, group_dst=self.parent, tag=COUNTS),
                        dist.irecv(result, group=self.group, group_src=self.parent,
                                   tag=RESULT)])
            sent, received = up.numel(), received + k * w
        # The largest subtree first: its chain to the leaves is the longest.
        self._wait([dist.isend(result, group=self.group, group_dst=child, tag=RESULT)
                    for child, _ in reversed(self.children)])
        self._moved(sent + k * w * len(self.children), received)
        words = _words(result)
        return words[0], (words[1] if k == 2 else None)

    @staticmethod
    def _wait(works) -> None:
        for work in works:
            work.wait()


#: Topology name -> its class over a process group.
GROUP_VOTES: dict[str, type[ProcessGroupVote]] = {
    cls.name: cls for cls in (GroupServer, GroupAllgather, GroupSharded, GroupTree)}

#: The topologies a process group can carry.
GROUP_TOPOLOGIES = tuple(GROUP_VOTES)


def check_group_topology(topology: str, where: str = "mpisign") -> None:
    """ValueError (its text starting with ``where``) unless a process group can carry
    ``topology``."""
    if topology not in GROUP_VOTES:
        raise ValueError(
            f"{where}: topology must be one of {GROUP_TOPOLOGIES}, got {topology!r}: it cannot "
            f"run over a torch.distributed process group (\"hierarchical\" needs groups split "
            f"by node, which only the whole default group can make, and \"auto\" a measured "
            f"link): vote over MPI for it")


def make_group_vote(group=None, topology: str = "server", tally=None) -> ProcessGroupVote:
    """The vote for ``topology`` over ``group`` (None: the default group)."""
    check_group_topology(topology)
    return GROUP_VOTES[topology](group, tally)
