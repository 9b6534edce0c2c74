"""The step header: what each rank states about its step, checked on every rank before a vote.

A mistake one rank makes alone (a parameter group added on rank 0 only, a learning rate that a
scheduler fed with that rank's own loss lowered, a resume from another step's file, models
initialised apart) used to end in a ``VoteTimeout`` minutes later, or in ranks that drift apart
without a word. Every step of a multi-rank optimizer therefore begins with one allgather of a
fixed 9-word (72-byte) header from each rank:

====  ============================================================================
word  what
====  ============================================================================
0     the step (``param_groups[0]["step"]``)
1     a digest of the layout: parameter shapes, dtypes, groups, overlap, buckets
2     a digest of every group's hyperparameters (those the rule names, e.g. ``lr``,
      ``momentum``, ``weight_decay`` for Signum; see :mod:`mpisign.optim.rules`)
3     at step 0, a digest of the parameters' values; later, with a monitor, this rank's
      disagreement with the previous step's vote (float64); else 0
4-6   group 0's first three hyperparameters of the rule (float64), to name them in errors
7     how many parameters have no gradient on this rank (all ones: not known yet)
8     the non-finite gradient entries this rank has voted as 0 so far (its
      ``stats.nonfinite`` when it posts the header: its previous steps')
====  ============================================================================

Word 3 spares the monitor (:class:`mpisign.optim.detection.DisagreementMonitor`) an exchange of its
own, which cost a quarter of a small model's step: each rank's disagreement travels in the next
step's header. Word 8 does the same for the non-finite counts, so that every rank, rank 0's log
included, learns which rank's gradients broke (``stats.nonfinite_by_rank``), not only that rank. Word 7 spares the usual step a second exchange: when every rank has every gradient, every
parameter is updated. Otherwise one bit a parameter is OR-ed over the ranks
(:mod:`mpisign.optim.engine`), and a parameter with no gradient anywhere is left alone.

The header travels beside the vote (posted just before it, checked before the vote is applied),
so it adds no round trip to a step; only a rank that has just built its layout (the first step,
``add_param_group``) waits for the headers before it sends any sign, so that ranks whose layouts
differ never exchange signs of different lengths. Every rank then holds every header and
reaches the same verdict, so all of them raise the same error at the same step, before any
parameter moves: :class:`LayoutMismatch`,
:class:`StepMismatch`, :class:`HyperparameterMismatch` or :class:`ParameterDivergence`. The
header is a fixed size whatever the layout, so ranks that disagree about the layout still
complete the exchange that tells them so.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from ..mpi.comm import bounded
from ..mpi.report import Agreed

__all__ = ["LayoutMismatch", "ParameterDivergence", "HyperparameterMismatch", "StepMismatch",
           "StepHeader", "StepCheck", "Exchange", "Gathered", "digest64", "post", "finish",
           "exchange", "verdict"]

WORDS = 9
#: Word 7 when the count of missing gradients is not known yet (a vote begun by a hook).
UNKNOWN = 2**64 - 1


class LayoutMismatch(Agreed, ValueError):
    """Ranks disagree about the parameters (shapes, dtypes, groups) they vote on."""


class ParameterDivergence(Agreed, RuntimeError):
    """Ranks hold different parameters (at the first step, or after a step), which majority
    vote never produces from identical ones."""


class HyperparameterMismatch(Agreed, ValueError):
    """Ranks step with different hyperparameters (``lr``, ``momentum``, ``weight_decay``...)."""


class StepMismatch(Agreed, RuntimeError):
    """Ranks' optimizers count different steps (e.g. a resume of another step's state)."""


def digest64(data: bytes) -> int:
    """A 64-bit digest of ``data`` (never 0, which word 3 keeps for "not computed")."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") or 1


@dataclass(frozen=True)
class StepHeader:
    step: int
    layout: int
    hparams: int
    params: int          # step 0: the parameters' values; later: the previous disagreement
    value0: float        # group 0's first three hyperparameters, in the rule's order
    value1: float
    value2: float
    absent: int = UNKNOWN  # parameters without a gradient on this rank
    nonfinite: int = 0     # non-finite gradient entries voted as 0 so far (previous steps)

    @property
    def values(self) -> tuple:
        return self.value0, self.value1, self.value2

    def pack(self) -> np.ndarray:
        words = np.zeros(WORDS, dtype=np.uint64)
        words[:4] = [self.step, self.layout, self.hparams, self.params]
        words[4:7] = np.array(self.values, dtype=np.float64).view(np.uint64)
        words[7] = self.absent
        words[8] = self.nonfinite
        return words

    @property
    def previous_disagreement(self) -> float:
        """Word 3 after step 0: the sender's disagreement with the previous step's vote."""
        return float(np.array([self.params], dtype=np.uint64).view(np.float64)[0])

    @staticmethod
    def word(value: float) -> int:
        """A float64 as word 3 carries it."""
        return int(np.array([value], dtype=np.float64).view(np.uint64)[0])

    @classmethod
    def unpack(cls, words: np.ndarray) -> StepHeader:
        values = words[4:7].copy().view(np.float64).tolist()
        return cls(*(int(w) for w in words[:4]), *values, int(words[7]), int(words[8]))


@dataclass
class Exchange:
    """A header exchange in flight: every rank's header lands in ``every``."""

    request: MPI.Request
    every: np.ndarray
    mine: np.ndarray        # kept alive until the exchange completes
    what: str

    def wait(self, timeout: float) -> list[StepHeader]:
        return finish(self, timeout)


@dataclass
class Gathered:
    """A header exchange already complete: a torch.distributed group's all-gather returns
    done (:mod:`mpisign.optim.grouped`)."""

    headers: list

    def wait(self, timeout: float) -> list[StepHeader]:
        return self.headers


def post(comm: MPI.Intracomm, header: StepHeader) -> Exchange:
    """Start the exchange of ``header`` with every rank of ``comm`` (collective)."""
    mine = header.pack()
    every = np.empty((comm.Get_size(), WORDS), dtype=np.uint64)
    return Exchange(comm.Iallgather(mine, every), every, mine,
                    f"step header at step {header.step} on rank {comm.Get_rank()}")


def finish(exchange: Exchange, timeout: float) -> list[StepHeader]:
    """Every rank's header, in rank order (bounded by ``timeout``)."""
    # Wait on MPI: no sign may be applied (or, after a layout change, sent) before every
    # rank's header is known to agree.
    bounded(exchange.request, exchange.what, timeout)
    return [StepHeader.unpack(row) for row in exchange.every]


def exchange(comm: MPI.Intracomm, header: StepHeader, timeout: float) -> list[StepHeader]:
    """Every rank's header, in rank order (collective, bounded by ``timeout``)."""
    return finish(post(comm, header), timeout)


def every_gradient_everywhere(headers: list[StepHeader]) -> bool:
    """True when every rank said it has every gradient (no OR of presence bits needed)."""
    return all(h.absent == 0 for h in headers)


def _differ(headers: list[StepHeader], field: str) -> list[int]:
    first = getattr(headers[0], field)
    return [r for r, h in enumerate(headers) if getattr(h, field) != first]


def verdict(headers: list[StepHeader], rank: int, describe: str,
            names: tuple = ("lr", "momentum", "weight_decay")) -> None:
    """Raise the same error on every rank if the headers disagree. ``describe``: this rank's
    layout in words, for the layout error; ``names``: what words 4-6 hold, for the
    hyperparameters' error."""
    differ = _differ(headers, "layout")
    if differ:
        raise LayoutMismatch(
            f"ranks disagree about the parameters to optimize at step {headers[rank].step}: "
            f"rank(s) {differ} differ from rank 0 (this rank {rank}: {describe}). Build the "
            f"same model, with the same parameter groups (add_param_group on every rank) and "
            f"options, on every rank.")
    differ = _differ(headers, "step")
    if differ:
        steps = {r: headers[r].step for r in [0, *differ]}
        raise StepMismatch(
            f"ranks' optimizers are at different steps: {steps} (rank: step). Each rank must "
            f"call step() as often as the others and load the state of the same step "
            f"(mpisign.scatter_state_dict hands every rank its own).")
    differ = _differ(headers, "hparams")
    if differ:
        values = {r: dict(zip(names, headers[r].values)) for r in [0, *differ]}
        raise HyperparameterMismatch(
            f"at step {headers[rank].step}, rank(s) {differ} step with hyperparameters that "
            f"differ from rank 0's (group 0 on each: {values}; other groups may differ too). "
            f"Set them alike on every rank: feed ReduceLROnPlateau a loss averaged over the "
            f"ranks, and write param_groups on every rank, not on one.")
    checked = [h.params for h in headers]   # the parameters' digests, at step 0 only
    if headers[0].step == 0 and any(checked) and len(set(checked)) > 1:
        differ = [r for r in range(len(headers)) if checked[r] != checked[0]]
        raise ParameterDivergence(
            f"at step {headers[rank].step}, rank(s) {differ} start from parameter values that "
            f"differ from rank 0's: majority vote keeps identical parameters identical, it does "
            f"not make different ones agree. Seed every rank alike before building the model, "
            f"or call mpisign.broadcast_parameters(model, comm) before training (as DDP does "
            f"at construction).")


class StepCheck:
    """One optimizer's header bookkeeping: posted once a step, checked once, then reset.

    ``fresh``: the layout was built since the last verdict, so this rank checks the headers as
    soon as it posts its own, before it sends any sign."""

    def __init__(self):
        self.fresh = False
        self.reset()

    def reset(self) -> None:
        """A new step: nothing posted, nothing known."""
        self.pending: Exchange | None = None
        self.headers: list[StepHeader] | None = None   # every rank's, once checked
        self.verified = False
        self.absent_known = False  # the headers count each rank's missing gradients
        self.all_present = False   # ... and every count is 0

    @property
    def posted(self) -> bool:
        return self.verified or self.pending is not None

    def post(self, comm: MPI.Intracomm, mine: StepHeader) -> None:
        self.posted_as(post(comm, mine), mine)

    def posted_as(self, exchange, mine: StepHeader) -> None:
        """``mine`` went out in ``exchange`` (an :class:`Exchange`, or :class:`Gathered`)."""
        self.pending = exchange
        self.absent_known = mine.absent != UNKNOWN

    def check(self, timeout: float, rank: int, describe, names: tuple) -> None:
        """Wait for every rank's header and reach the verdict (at most once a step);
        ``describe()`` gives this rank's layout for the errors, ``names`` the rule's first
        three hyperparameters."""
        if self.verified:
            return
        headers = self.pending.wait(timeout)
        self.pending = None
        verdict(headers, rank, describe(), names)
        self.headers, self.verified, self.fresh = headers, True, False
        self.all_present = every_gradient_everywhere(headers)
