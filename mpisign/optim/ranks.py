"""The ranks' policies of the vote engine (:mod:`mpisign.optim.engine`): what a step does
because of how many ranks there are. :class:`Solo` for one rank (no message at all),
:class:`Ensemble` for several (the step header beside the votes, the presence OR, digests), and,
in :mod:`mpisign.optim.quorate`, :class:`~mpisign.optim.quorate.Quorate` for several whose votes
close on a quorum. The engine picks one per communicator; the step never asks again.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from mpi4py import MPI

from ..backends import signs
from ..collectives import LocalVote, VoteTimeout, make_vote
from ..mpi import exchanges, rollcall
from .header import StepHeader, UNKNOWN, digest64
from .layout import Layout

__all__ = ["Solo", "Ensemble"]


class Solo:
    """The ranks' policy on a communicator of one rank: nothing to agree on, no message."""

    #: Every vote waits for every rank, so no rank is more than one step from another (an
    #: elastic recovery relies on it: mpisign.optim.recovery).
    in_step = True

    def __init__(self, engine):
        self.engine = engine

    topology = "local"   # what topology_used says before the first step

    def vote_comm(self):
        return self.engine.comm

    def voter(self, topology: str, layout: Layout, backend):
        return LocalVote(MPI.COMM_SELF)   # one rank's vote is its own: no message, any comm

    def gpu_comm(self):
        return None

    def gpu_level(self, params: list):
        """The GPU path every rank takes (:func:`mpisign.backends.signs.gpu_level`): agreed
        over :meth:`gpu_comm` at the first step."""
        return signs.gpu_level(params, self.gpu_comm(), self.engine.timeout)

    def zero_words(self, backend, words: int):
        """Where the plan keeps the zero mask of this rank's words (coordinates whose value
        is exactly 0, which cast no vote), or None where the vote needs none. One rank has no
        vote to share: a coordinate it holds at exactly 0 does not move, as in torch's own
        optimizers."""
        return backend.words(words)

    def start_all_zero(self):
        """A function giving the words' coordinates that stay where they are because every
        rank holds them at exactly 0 (a tie plane to add to the vote's), or None; started
        once the header and the presence OR are done, called before the votes are applied.
        On one rank: its own zeros."""
        zeros = self.engine.plan.zeros
        return lambda: zeros if zeros is not None and zeros.any() else None

    def judged(self, bucket, tie):
        """The coordinates of ``bucket`` that this rank's disagreement leaves out: the tie plane
        (where the vote moves nothing)."""
        return tie

    def post_header(self, absent: int = UNKNOWN) -> None:
        pass

    def check_header(self) -> None:
        pass

    def presence(self, layout: Layout, present: list, changed: bool = False):
        ids = [id(s.param) for s in layout.slots]
        return lambda: (dict(zip(ids, present)), changed)

    def record_disagreement(self) -> None:
        """One rank: its own figure of this step, at once."""
        engine = self.engine
        if engine.monitor is not None:
            engine.record_disagreement([engine.stats.disagreement],
                                       engine.books.param_groups[0]["step"])

    def record_previous(self) -> None:
        pass

    def ranks_differing(self) -> list:
        return []

    def roll_call(self, err: VoteTimeout) -> VoteTimeout:
        return err   # one rank waits on no one

    def check_roll(self) -> None:
        pass

    def after_vote(self) -> None:
        pass

    def late(self) -> bool:
        return False   # every vote waits for this rank

    def drain(self) -> None:
        pass


class Ensemble(Solo):
    """The ranks' policy on several ranks: the step header beside the votes, the presence OR
    where a gradient is missing somewhere, digests exchanged on the engine's own communicator."""

    def __init__(self, engine):
        super().__init__(engine)
        self.watch = rollcall.Watch()   # when check_roll looks for a roll call

    @property
    def topology(self) -> str:
        return self.engine.topology

    def vote_comm(self):
        return self.engine.own_comm.get()

    def voter(self, topology: str, layout: Layout, backend):
        engine = self.engine
        # The tally runs where the words are: the device's kernel, or the host reference.
        return make_vote(topology, engine.own_comm.get(), timeout=engine.timeout,
                         n_coords=layout.coordinates, tally=backend.tally)

    def gpu_comm(self):
        return self.engine.own_comm.get()

    def zero_words(self, backend, words: int):
        """An even number of ranks needs no mask: the zero bits ``(rank + step) % 2`` of a
        coordinate that is 0 on every rank split evenly, a tie. An odd number does, to find
        those coordinates."""
        if self.engine.world_size % 2 == 0:
            return None
        return backend.words(words)

    def start_all_zero(self):
        """On an odd number of ranks: the coordinates that are exactly 0 on every rank, by
        bounded ANDs on the optimizer's own communicator (two flags a word, posted after the
        header and the presence OR on every rank, so that the collectives there keep one
        order; then only the flagged words' masks: :func:`mpisign.mpi.exchanges.start_all_zero`)."""
        engine = self.engine
        zeros = engine.plan.zeros
        if zeros is None:
            return lambda: None
        step = engine.books.param_groups[0]["step"]
        resident = isinstance(zeros, torch.Tensor)   # device words: their flags go by the host
        wait = exchanges.start_all_zero(
            engine.own_comm.get(), zeros.cpu().numpy().view(np.uint64) if resident else zeros,
            engine.timeout, f"exact zeros at step {step} on rank {engine.rank}")
        if not resident:
            return wait

        def on_device():
            mask = wait()
            return (None if mask is None
                    else torch.from_numpy(mask.view(np.int64)).to(zeros.device))
        return on_device

    def post_header(self, absent: int = UNKNOWN) -> None:
        """Post this step's header: one allgather of 72 bytes a rank, beside the vote. A rank
        that has just built its layout checks it at once, before it sends any sign."""
        engine = self.engine
        check = engine.check
        if check.posted:
            return
        check.post(engine.own_comm.get(), self.header(absent))
        if check.fresh:
            self.check_header()

    def header(self, absent: int) -> StepHeader:
        """This rank's header of this step (:mod:`mpisign.optim.header`)."""
        engine = self.engine
        groups = engine.books.param_groups
        step = groups[0]["step"]
        if step == 0:
            params = digest64(engine.params_digest())
        else:   # the monitor's figure of the previous step rides along (see .header)
            voted = engine.stats.steps > 0   # a resumed optimizer has no previous figure: NaN
            params = (StepHeader.word(engine.stats.disagreement if voted else math.nan)
                      if engine.monitor is not None else 0)
        values = engine.rule.values(groups[0])
        return StepHeader(step, engine.plan.layout.digest, engine.hparams_digest(), params,
                          *(values + [0.0, 0.0, 0.0])[:3], absent, engine.stats.nonfinite)

    def check_header(self) -> None:
        """Every rank's header agrees with this one's, or every rank raises the same error."""
        engine = self.engine
        if engine.check.verified:
            return
        engine.check.check(engine.timeout, engine.rank, engine.plan.layout.summary,
                           engine.rule.value_names[:3])

    def presence(self, layout: Layout, present: list, changed: bool = False):
        """A function giving ``({id(param): has a gradient on some rank}, whether some rank's
        gradient changed after a hook started its vote)``, to call after the header check.
        Headers that counted the missing gradients: all present when every count is 0 (the
        usual step: no exchange), else an OR of one bit a parameter. A header begun by a hook
        could not count: the OR starts now, beside the votes, with one more bit, ``changed``
        (only a hook's vote can have a changed gradient, and a hook's header means an OR)."""
        engine = self.engine
        ids = [id(s.param) for s in layout.slots]

        def start_or():
            step = engine.books.param_groups[0]["step"]
            wait = exchanges.start_presence(engine.own_comm.get(), present + [changed],
                                            engine.timeout, f"gradient presence at step {step} "
                                            f"on rank {engine.rank}")

            def result():
                bits = wait()
                return dict(zip(ids, bits[:-1])), bits[-1]
            return result
        if not engine.check.absent_known:
            return start_or()
        return lambda: ((dict.fromkeys(ids, True), False) if engine.check.all_present
                        else start_or()())

    def record_disagreement(self) -> None:
        pass   # the figures travel in the next step's headers (record_previous)

    def record_previous(self) -> None:
        """The previous step's disagreement of every rank, from this step's headers, to the
        monitor, and every rank's non-finite count: after the votes, so that the root of a vote
        does not keep the others waiting while it keeps the books."""
        engine = self.engine
        headers = engine.check.headers
        if headers is not None:
            engine.record_nonfinite(headers)
        if engine.monitor is None or headers is None or headers[0].step == 0:
            return
        every = [h.previous_disagreement for h in headers]
        if not any(map(math.isnan, every)):   # NaN: a rank with no previous step (a resume)
            engine.record_disagreement(every, headers[0].step - 1)

    def drain(self) -> None:
        """The sends the votes left in flight, completed (local: see
        :meth:`mpisign.collectives.SignVote.complete_sends`)."""
        if self.engine.plan is not None:
            self.engine.plan.voter.complete_sends()

    def ranks_differing(self) -> list:
        engine = self.engine
        return exchanges.ranks_differing(engine.own_comm.get(), engine.params_digest(),
                                         engine.timeout,
                                         f"consistency check on rank {engine.rank}")

    def roll_call(self, err: VoteTimeout) -> VoteTimeout:
        """A step's wait timed out on this rank: call the roll (:mod:`mpisign.mpi.rollcall`) so
        that every rank that gave up names the same missing ranks, whatever it waited on (a
        header's allgather names nobody; a worker waiting on the root names the root, not
        the rank the root waited on). Returns the error to raise."""
        engine = self.engine
        comm = engine.own_comm.made()
        if comm is None:   # a duplicate never made: nothing voted on it yet
            return err
        return rollcall.after_timeout(comm, err, engine.books.param_groups[0]["step"],
                                      engine.timeout, self._who())

    def check_roll(self) -> None:
        """At the start of a step and before a vote moves any parameter: no rank has given up
        on a step (:func:`mpisign.mpi.rollcall.check`)."""
        engine = self.engine
        comm = engine.own_comm.made()
        if comm is not None:
            rollcall.check(comm, engine.books.param_groups[0]["step"], engine.timeout,
                           self._who(), self.watch)

    def _who(self) -> str:
        return f"{type(self.engine.books).__name__} on rank {self.engine.rank}"
