"""The ranks' policy of an optimizer whose votes close on a quorum (``quorum=``): nothing in a
step waits for every rank.

The votes go by :class:`mpisign.collectives.quorum.QuorumVote`: the root closes each one once
``quorum`` ranks have voted, and a late rank abstains. What else a step exchanges changes with it:

- **The step header** is posted every step as before, and checked ``lag`` steps later (the
  optimizer's ``lag=``, default :data:`LAG`; the first step of a layout at once, before any
  sign is sent: the layout and the parameters' digest). Every rank checks step s's headers at
  its own step s + lag, so a rank's own mistake (another layout, step or hyperparameter) is
  still raised on every rank alike, naming it, lag steps on; and a late rank may fall up to lag
  steps behind before anyone waits for it.
- **No presence OR**: under a quorum every parameter must have a gradient on every rank at every
  step. A rank without one is found by the lagged header check and every rank raises
  :class:`MissingGradient`, naming it.
- **A late rank catches up**: :meth:`late` says, without waiting, that this rank's vote of the
  coming step has already closed without it; :meth:`skip` then takes that step's result without
  computing (no local step, no momentum update), so a rank that fell behind costs the others
  nothing and comes back within a step.
"""

from __future__ import annotations

import logging
import math
from collections import deque

import numpy as np
from mpi4py import MPI

from ..backends import signs
from ..collectives import make_quorum_vote
from ..mpi.elastic import is_failure
from ..mpi.report import Agreed
from .ranks import Ensemble
from .header import verdict

__all__ = ["Quorate", "MissingGradient", "LAG", "LATE_WARNING"]

log = logging.getLogger(__name__)

#: Steps after which a step's headers are checked (and a late rank is waited for), by default.
LAG = 2
#: Votes in a row a rank must have missed before rank 0 warns that it is late at every step.
LATE_WARNING = 20


class MissingGradient(Agreed, ValueError):
    """Under a quorum, a rank stepped without a gradient for some parameter (see the module
    docstring): raised on every rank."""


class Quorate(Ensemble):
    """Several ranks, votes closed on ``engine.quorum`` of them (see the module docstring)."""

    #: A late rank may be steps behind the others (up to ``lag``), and a rank ahead may have
    #: applied votes of a step that a late one has not begun: an elastic recovery must bring
    #: every survivor to the one furthest on (mpisign.optim.recovery).
    in_step = False

    def __init__(self, engine):
        super().__init__(engine)
        self.lagged: deque = deque()   # posted header exchanges, oldest first
        self.warned: set = set()       # ranks rank 0 has warned about

    def gpu_level(self, params: list):
        """As every rank's (agreed), but at most the staged path: a quorum vote runs on host
        words (the root's standing receives and the results it keeps in flight for late ranks
        live in host memory), so CUDA tensors take the GPU kernels, their words staged
        through host memory, even where MPI is CUDA-aware."""
        return signs.staged_at_most(super().gpu_level(params))

    def zero_words(self, backend, words: int):
        """The voters of a quorum vary from step to step, and a late rank's zeros are not known
        when the vote closes: an exact 0 keeps the zero bit's rule here, so no mask is needed
        for the move. With a monitor this rank keeps its own, to leave out of its disagreement
        (see :meth:`judged`)."""
        return None if self.engine.monitor is None else backend.words(words)

    def start_all_zero(self):
        return lambda: None   # no exchange of the masks: the zero bit's rule stands

    def judged(self, bucket, tie):
        """The coordinates this rank's disagreement leaves out: the ties, and its own exact
        zeros. Where k counted ranks are odd, a coordinate that is 0 everywhere gets the bit of
        the parity with more counted ranks (the zero bit's rule), and the others would count it
        against them: on digits' MLP, whose border pixels are always 0, that took an honest
        rank from 0.13 to 0.27, and the monitor named it."""
        zeros = self.engine.plan.zeros
        if zeros is None:
            return tie
        mine = zeros[bucket.word0: bucket.word1]
        return mine if tie is None else tie | mine

    def voter(self, topology: str, layout, backend):
        engine = self.engine
        if not isinstance(layout.packed, np.ndarray):   # gpu_level stages them: a bug
            raise ValueError("quorum= runs on host words, and this layout's are on a device")
        return make_quorum_vote(topology, engine.own_comm.get(), engine.quorum, engine.grace,
                                timeout=engine.timeout, tally=backend.tally)

    def presence(self, layout, present: list, changed: bool = False):
        ids = [id(s.param) for s in layout.slots]
        return lambda: (dict.fromkeys(ids, True), False)

    def check_header(self) -> None:
        """A fresh layout's header at once; every other step's LAG steps on."""
        engine = self.engine
        check = engine.check
        if check.verified:
            return
        if check.fresh:
            super().check_header()
            self._absent(check.headers)
            return
        self.lagged.append(check.pending)
        check.pending, check.verified = None, True
        while len(self.lagged) > engine.lag:
            self._verdict(self.lagged.popleft())

    def _verdict(self, exchange) -> None:
        engine = self.engine
        headers = exchange.wait(engine.timeout)
        verdict(headers, engine.rank, engine.plan.layout.summary(),
                engine.rule.value_names[:3])
        self._absent(headers)
        engine.record_nonfinite(headers)
        every = [h.previous_disagreement for h in headers]
        if engine.monitor is not None and headers[0].step > 0 and not all(map(math.isnan, every)):
            engine.record_disagreement(every, headers[0].step - 1)   # NaN: a late rank's

    @staticmethod
    def _absent(headers) -> None:
        lacking = [r for r, h in enumerate(headers) if h.absent]
        if lacking:
            raise MissingGradient(
                f"at step {headers[0].step}, rank(s) {lacking} stepped without a gradient for "
                f"some parameter ({', '.join(str(headers[r].absent) for r in lacking)} "
                f"parameter(s)): under quorum= every optimized parameter needs a gradient on "
                f"every rank at every step (a late rank's vote is not waited for, so no rank can "
                f"ask the others which gradients they have). Freeze the parameters that get "
                f"none (requires_grad_(False)), or leave quorum= out.")

    def record_previous(self) -> None:
        pass   # the monitor's figures are recorded with their lagged headers (_verdict)

    def record_disagreement(self) -> None:
        """A rank the vote did not count (it was late) has no figure of this step, as after
        skip(): against a majority it took no part in, its signs disagree more by construction
        (a voter pulls the majority its way), and the monitor would take a slow rank for a
        bad one. Its figure travels in the next header as NaN, and the monitor leaves it out."""
        engine = self.engine
        if engine.rank not in engine.stats.counted:
            engine.stats.disagreement = math.nan

    def after_vote(self) -> None:
        """Rank 0: warn once about a rank that missed every one of the last votes."""
        engine = self.engine
        voter = engine.plan.voter
        engine.stats.abstentions = list(voter.abstained)
        engine.stats.counted = list(voter.counted)
        if engine.rank != 0:
            return
        streak = voter.late_streak
        for r, n in enumerate(streak):
            if n >= LATE_WARNING and r not in self.warned:
                self.warned.add(r)
                log.warning("rank %d was late for each of the last %d votes: it abstains "
                            "(its signs are not counted) until it keeps up; a slow node, GPU or "
                            "data loader? stats.abstentions counts each rank's", r, n)

    def late(self) -> bool:
        """Whether the vote of this rank's coming step has closed without it: its result is
        already here (a probe, no wait). Never on the root, which closes the votes."""
        engine = self.engine
        if engine.plan is None:
            return False
        try:
            return engine.plan.voter.result_waiting()
        except MPI.Exception as error:   # elastic: a dead rank; step() meets it and recovers
            if not (engine.elastic and is_failure(error, engine.own_comm.current())):
                raise
            return False

    def drain(self) -> None:
        """Collective, after the last step: the lagged headers checked, the votes' late
        messages taken (see :meth:`QuorumVote.drain`)."""
        while self.lagged:
            self._verdict(self.lagged.popleft())
        if self.engine.plan is not None:
            self.engine.plan.voter.drain()
