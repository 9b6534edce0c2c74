"""How a run's gradients become a step: an mpisign optimizer's vote (signum, signsgd, lion), or
a full-precision baseline's fp32 allreduce mean then a plain optimizer on it (sgd: torch's SGD;
adamw: torch's AdamW; lion-allreduce: Lion on the mean, "global Lion", which is
``mpisign.Lion`` on ``MPI.COMM_SELF``). Chosen once when the run is built; the loop only calls
it."""

from __future__ import annotations

import math

import torch
from mpi4py import MPI

import mpisign

from .baseline import AllreduceMean
from .metrics import Traffic
from .options import ALLREDUCE

__all__ = ["VoteUpdate", "AllreduceUpdate", "build_update"]


class VoteUpdate:
    """An mpisign optimizer: the vote travels inside ``opt.step()``."""

    def __init__(self, opt):
        self.opt = opt

    def describe(self, config) -> str:
        return config.topology

    def step(self) -> None:
        self.opt.step()

    def traffic(self) -> Traffic:
        st = self.opt.stats
        return Traffic(st.bytes_sent, st.bytes_received, st.disagreement, st.nonfinite)

    def watched(self) -> dict | None:
        """What a step record adds: the monitor's suspects, where there is a monitor; each
        rank's missed votes so far, under a quorum."""
        watched = {}
        if self.opt.monitor is not None:
            watched["suspects"] = self.opt.stats.suspects
        if self.opt.quorum is not None:
            watched["abstentions"] = self.opt.stats.abstentions
        return watched or None

    def late(self) -> bool:
        """--quorum: this rank's coming vote has closed without it (see Signum.late)."""
        return self.opt.late()

    def skip(self) -> None:
        self.opt.skip()

    def drain(self) -> None:
        self.opt.drain()

    def check_consistency(self) -> None:
        self.opt.check_consistency()


class AllreduceUpdate(VoteUpdate):
    """The fp32 baseline: the mean of the gradients by allreduce, then ``opt`` (torch's SGD or
    AdamW, or Lion on one rank), the same step on every rank."""

    def __init__(self, opt, mean: AllreduceMean):
        super().__init__(opt)
        self.mean = mean

    def describe(self, config) -> str:
        return "allreduce"

    def step(self) -> None:
        self.mean()
        self.opt.step()

    def traffic(self) -> Traffic:
        sent = self.mean.bytes_sent
        return Traffic(sent, sent, math.nan, math.nan)

    def watched(self) -> None:
        return None

    def late(self) -> bool:
        return False   # an allreduce waits for every rank

    def drain(self) -> None:
        pass

    def check_consistency(self) -> None:
        pass   # the same mean on every rank: nothing votes, nothing to compare


def build_update(config, comm, model):
    """The optimizer ``--optimizer`` names, and how the step feeds it."""
    if config.optimizer in ALLREDUCE:
        return AllreduceUpdate(_local_optimizer(config, model),
                               AllreduceMean(model.parameters(), comm))
    common = dict(comm=comm, topology=config.topology, timeout=config.vote_timeout,
                  check_every=config.check_every, elastic=config.elastic,
                  quorum=config.quorum, grace=config.grace, lag=config.lag,
                  monitor=mpisign.DisagreementMonitor() if config.monitor else None)
    if config.optimizer == "lion":
        return VoteUpdate(mpisign.Lion(model.parameters(), lr=config.lr,
                                       betas=tuple(config.betas),
                                       weight_decay=config.weight_decay, **common))
    return VoteUpdate(mpisign.Signum(model.parameters(), lr=config.lr, momentum=config.momentum,
                                     weight_decay=config.weight_decay, **common))


def _local_optimizer(config, model) -> torch.optim.Optimizer:
    """The baseline's optimizer, stepping on the mean gradient: the same on every rank."""
    params = model.parameters()
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, betas=tuple(config.betas),
                                 weight_decay=config.weight_decay)
    # lion-allreduce: a world of one, so no vote: plain Lion on the mean.
    return mpisign.Lion(params, lr=config.lr, betas=tuple(config.betas),
                        weight_decay=config.weight_decay, comm=MPI.COMM_SELF,
                        timeout=config.vote_timeout)
