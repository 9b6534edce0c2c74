"""The ranks' policy over a ``torch.distributed`` process group: ``Signum(comm=process_group)``
for a job that has torch.distributed and no MPI (``torchrun``, gloo or NCCL).

The step is :class:`~mpisign.optim.ranks.Ensemble`'s, with the group's collectives
(:mod:`mpisign.collectives.torchdist`) for MPI's: the same 72-byte step header (one
all-gather, checked by the same verdict, so the same errors on every rank), the same presence
OR where some rank lacks a gradient (a MAX of 0/1 bytes), the same ANDs for the coordinates
exactly 0 on every rank (odd ranks), the same vote (``"server"``, ``"allgather"``,
``"sharded"`` or ``"tree"``), and so the same bits as over MPI. A group's vote is waited for
within the call: nothing travels beside the backward pass, and the group's own timeout
(``init_process_group(timeout=...)``) bounds each call.

What needs MPI is refused when the optimizer is made (:func:`check_group_options`): elastic
recovery (ULFM), a quorum (messages a late rank leaves unanswered), overlap (votes started from
gradient hooks, beside the group's own traffic), the hierarchical topology (its groups split by
node would have to be made by the whole default group) and ``"auto"``. Device-resident words need a CUDA-aware MPI:
over a group the words stay on the host (the GPU's kernels still pack and apply).
"""

from __future__ import annotations

import numpy as np
import torch.distributed as dist

from ..backends import signs
from ..collectives import VoteTimeout
from ..collectives.torchdist import check_group_topology, make_group_vote
from .header import Gathered, StepHeader, UNKNOWN, digest64
from .layout import Layout
from .ranks import Ensemble

__all__ = ["Grouped", "is_process_group", "rank_and_size", "check_group_options"]


def is_process_group(comm) -> bool:
    return isinstance(comm, dist.ProcessGroup)


def rank_and_size(comm) -> tuple[int, int]:
    """This process's rank in ``comm`` (an mpi4py communicator or a process group), and its
    size."""
    if is_process_group(comm):
        return dist.get_rank(comm), dist.get_world_size(comm)
    return comm.Get_rank(), comm.Get_size()


def check_group_options(name: str, topology: str, elastic: bool, quorum, overlap: bool) -> None:
    """ValueError, before any communication, for what a process group cannot carry."""
    where = f"{name}(comm=process_group)"
    check_group_topology(topology, where)
    for given, what in ((elastic, "elastic=True needs MPI's ULFM"),
                        (quorum is not None, "quorum= needs messages that a late rank can "
                                             "leave unanswered"),
                        (overlap, "overlap=True starts votes from gradient hooks, beside the "
                                  "group's own traffic")):
        if given:
            raise ValueError(f"{where}: {what}; over a process group it is not supported: "
                             f"vote over MPI (an mpi4py communicator) for it")


class Grouped(Ensemble):
    """:class:`~mpisign.optim.ranks.Ensemble` over a process group (see the module docstring)."""

    def __init__(self, engine):
        super().__init__(engine)
        self.side = make_group_vote(engine.comm, engine.topology)   # the header, the ORs

    def vote_comm(self):
        return self.engine.comm

    def voter(self, topology: str, layout: Layout, backend):
        return make_group_vote(self.engine.comm, topology, tally=backend.tally)

    def gpu_comm(self):
        return None

    def gpu_level(self, params: list):
        """This rank's own GPU path, at most the staged one: the words travel from the host."""
        level = signs.gpu_level(params)
        if level is None:
            return None
        from ..cuda import startup
        return min(level, startup.STAGED)

    def start_all_zero(self):
        zeros = self.engine.plan.zeros
        if zeros is None:
            return lambda: None
        mask = self.side.all_zero(zeros)
        return lambda: mask

    def post_header(self, absent: int = UNKNOWN) -> None:
        """This step's header, all-gathered over the group (done at once), then checked as
        over MPI."""
        check = self.engine.check
        if check.posted:
            return
        mine = self.header(absent)
        every = self.side.all_gather(mine.pack())
        check.posted_as(Gathered([StepHeader.unpack(row) for row in every]), mine)
        if check.fresh:
            self.check_header()

    def presence(self, layout: Layout, present: list, changed: bool = False):
        """As :meth:`Ensemble.presence`, with the OR a MAX over the group, taken at the same
        point of the step on every rank."""
        engine = self.engine
        ids = [id(s.param) for s in layout.slots]

        def any_of():
            bits = self.side.any_of(np.array(present + [changed], dtype=np.uint8))
            return dict(zip(ids, bits[:-1].astype(bool).tolist())), bool(bits[-1])
        if not engine.check.absent_known:
            found = any_of()
            return lambda: found
        return lambda: ((dict.fromkeys(ids, True), False) if engine.check.all_present
                        else any_of())

    def ranks_differing(self) -> list:
        return self.side.ranks_differing(
            digest64(self.engine.params_digest()).to_bytes(8, "little"))

    def roll_call(self, err: VoteTimeout) -> VoteTimeout:
        return err   # the group's own timeout ends its calls; MPI's roll call has no part

    def check_roll(self) -> None:
        pass
