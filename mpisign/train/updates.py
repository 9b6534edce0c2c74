"""How a run's gradients become a step: an mpisign optimizer's vote, or the fp32 baseline's
allreduce then torch's SGD. Chosen once when the run is built; the loop only calls it."""

from __future__ import annotations

import math

import torch

import mpisign

from .baseline import AllreduceMean
from .metrics import Traffic

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
        """What a step record adds: the monitor's suspects, where there is a monitor."""
        return {"suspects": self.opt.stats.suspects} if self.opt.monitor is not None else None

    def check_consistency(self) -> None:
        self.opt.check_consistency()


class AllreduceUpdate(VoteUpdate):
    """The fp32 baseline: the mean of the gradients by allreduce, then ``opt`` (torch SGD)."""

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

    def check_consistency(self) -> None:
        pass   # the same mean on every rank: nothing votes, nothing to compare


def build_update(config, comm, model):
    """The optimizer ``--optimizer`` names, and how the step feeds it."""
    if config.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                              weight_decay=config.weight_decay)
        return AllreduceUpdate(opt, AllreduceMean(model.parameters(), comm))
    opt = mpisign.Signum(model.parameters(), lr=config.lr, momentum=config.momentum,
                         weight_decay=config.weight_decay, comm=comm, topology=config.topology,
                         timeout=config.vote_timeout, check_every=config.check_every,
                         monitor=mpisign.DisagreementMonitor() if config.monitor else None,
                         elastic=config.elastic)
    return VoteUpdate(opt)
