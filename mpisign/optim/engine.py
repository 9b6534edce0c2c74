"""The vote engine: everything that moves a step's signs, for any rule.

An optimizer keeps books (:mod:`mpisign.optim.books`) and holds a rule
(:mod:`mpisign.optim.rules`); the engine does the rest. A step:

1. the rule's local step for each bucket of the layout (what each parameter votes with), packed
   into the layout's words: once a step, from a gradient hook (``overlap=True``) or from here;
2. the step header, posted beside the first vote (:mod:`mpisign.optim.header`), and, where some
   rank lacks a gradient, an OR of one presence bit a parameter;
3. each bucket's vote started, over the collective of the topology;
4. once every rank's header agrees, each vote finished and the rule's ``move`` applied to every
   parameter that some rank has a gradient for, where the vote and the zero masks say so (a
   coordinate exactly 0 on every rank is a tie: the ranks' policy finds them); the rule's
   after-vote work;
5. the books: the step counter, statistics, the monitor, the consistency check.

What a step needs is decided once per layout, in a :class:`Plan`: the layout and its words, the
backend (:func:`mpisign.backends.signs.signs_for`), the collective, the rule's fused kernel for
that backend, and the ranks' policy (:mod:`mpisign.optim.ranks`): ``Ensemble`` for several
ranks (headers, presence OR, digest exchanges), ``Solo`` for one (no message at all), ``Quorate``
for several whose votes close on a quorum. The step runs the plan; nothing in it asks again how
many ranks there are, which path the words take, or which kernel to run.
Overlap is the hooks' business (:class:`mpisign.optim.overlap.BucketHooks`), a dead rank the
recovery's (:mod:`mpisign.optim.recovery`: :class:`Recovery` or :class:`Unrecovered`).
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..backends import packing, signs
from ..collectives import VoteTimeout
from ..collectives.quorum import survivors_quorum
from ..mpi import exchanges
from ..mpi.isolation import OwnComm
from .header import ParameterDivergence, StepCheck, digest64
from .layout import Bucket, Layout, build_layout, signature, trainable
from .overlap import BucketHooks, check_threads
from .grouped import Grouped, is_process_group, rank_and_size
from .quorate import Quorate
from .ranks import Ensemble, Solo
from .recovery import Recovery, Unrecovered

__all__ = ["VoteEngine", "VoteStats", "Plan", "scrubbed"]

log = logging.getLogger(__name__)


@dataclass
class VoteStats:
    """What the optimizer did, for logs and metrics. Cumulative unless said otherwise."""

    steps: int = 0
    bytes_sent: int = 0          # payload bytes this rank posted to MPI
    bytes_received: int = 0
    bytes_sent_between_nodes: int | None = None      # the part that crossed between nodes, for
    bytes_received_between_nodes: int | None = None  # topologies that know the nodes, else None
    nonfinite: int = 0           # gradient entries that were NaN or inf, replaced by 0
    nonfinite_steps: int = 0     # steps in which at least one such entry was seen
    disagreement: float = 0.0    # last step: fraction of this rank's votes against the majority
    coordinates: int = 0         # coordinates voted on per step
    overlapped: int = 0          # bucket votes started from a gradient hook (overlap=True)
    disagreement_by_rank: list = field(default_factory=list)  # see Signum's `monitor`
    # every rank's `nonfinite` as its last checked step header stated it (its previous steps')
    nonfinite_by_rank: list = field(default_factory=list)
    suspects: list = field(default_factory=list)  # ranks the monitor flags (windowed mean)
    lost_ranks: list = field(default_factory=list)  # elastic: dead ranks, by their rank in
                                                    # the communicator the optimizer was given
    # quorum=: votes each rank was not counted in; the last vote's counted ranks; steps this
    # rank skipped because its vote had closed without it (skip()).
    abstentions: list = field(default_factory=list)
    counted: list = field(default_factory=list)
    skipped: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def _all_finite_sums(tensors: list) -> list:
    """Whether each tensor's sum is finite, with one read back per device (a GPU waits once
    for all of its tensors, not once each)."""
    by_device: dict = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    finite = [True] * len(tensors)
    for indices in by_device.values():
        sums = torch.stack([tensors[i].sum().float() for i in indices])
        for i, ok in zip(indices, torch.isfinite(sums).tolist()):
            finite[i] = ok
    return finite


def scrubbed(grads: list) -> tuple[list, int]:
    """``grads`` (None where a parameter has no gradient) with NaN/inf entries replaced by 0,
    in copies of the tensors that hold any, and how many entries that was."""
    here = [i for i, g in enumerate(grads) if g is not None]
    # A sum is NaN/inf whenever an entry is (and, rarely, when finite values overflow: the
    # exact check below then finds nothing); it is about 10x cheaper than a max-norm.
    suspect = [here[j] for j, ok in enumerate(_all_finite_sums([grads[i] for i in here]))
               if not ok]
    bad = [i for i in suspect if not bool(torch.isfinite(grads[i]).all())]
    if not bad:
        return grads, 0
    grads, count = list(grads), 0
    for i in bad:
        g = grads[i] = grads[i].clone()
        count += int(g.numel() - torch.isfinite(g).sum())
        torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
    return grads, count


@dataclass
class Plan:
    """What a layout's steps run, decided once when the layout is built."""

    layout: Layout
    backend: signs.Signs   # where the words live and what packs, tallies and applies them
    voter: object          # the collective (mpisign.collectives.SignVote)
    fused: object = None   # the rule's fused local step for this backend, or None
    zeros: object = None   # the words' zero mask where the ranks' policy needs it (one rank;
                           # an odd number of them), else None


class VoteEngine:
    """The vote machinery of one optimizer (``books``: its ``param_groups``, ``state`` and
    ``grad_scale``; ``rule``: its math). See the module docstring."""

    #: Left out of a copy: the collective, the layout and the hooks belong to the original.
    _NOT_COPIED = ("books", "comm", "own_comm", "plan", "hooks", "check", "_deferred",
                   "_waiting", "recovery", "ranks", "scaler")

    def __init__(self, books, rule, comm, topology: str, timeout: float, check_every: int,
                 overlap: bool, bucket_words: int, monitor, elastic: bool, min_ranks: int,
                 quorum: int | None = None, grace: float = 0.0, lag: int = 2):
        self.books, self.rule = books, rule
        # What users tune.
        self.topology = topology
        self.timeout = timeout
        self.check_every = check_every
        self.overlap = overlap
        self.bucket_words = bucket_words
        self.monitor = monitor
        self.elastic, self.min_ranks = elastic, min_ranks
        # Votes closed on a quorum (None: all ranks), and the steps its header checks lag by.
        self.quorum, self.grace, self.lag = quorum, grace, lag
        self.stats = VoteStats()
        self._skipping = False   # skip(): this step's local step is left out
        # The GPU path every rank agreed on at the first step (mpisign.cuda.startup); a later
        # layout, which may change on one rank alone, keeps it without a collective.
        self.gpu_agreed, self.gpu_level = False, None
        self.scaler = None   # the user's GradScaler (grad_scaler=), for the hooks' unscale
        self._attach(comm)

    def _attach(self, comm, own: OwnComm | None = None) -> None:
        """Vote over ``comm`` (on a duplicate of its own, made at the first vote), with a new
        plan at the next step. What a dead rank does to a step: ends it (Unrecovered), or is
        survived (Recovery)."""
        self.comm, (self.rank, self.world_size) = comm, rank_and_size(comm)
        self.own_comm = own or OwnComm(comm, self, self.timeout, type(self.books).__name__)
        self.ranks = self._ranks_policy()
        self.plan: Plan | None = None
        self._stale = False        # the plan's layout is to be made again (forget_layout)
        self._hooks_current = None  # this step's hooks pack: decided at its first hook
        self._hook_scale = None     # this step's 1 / scale from grad_scaler=, asked once
        self.hooks = BucketHooks(self._start_from_hook,
                                 lambda: (self.rank, self.books.param_groups[0]["step"]))
        self.check = StepCheck()   # this step's header (see mpisign.optim.header)
        self._deferred: list = []  # rules' after-vote work waiting for the presence OR
        self._waiting: list = []   # (bucket, marker): packed by a hook, its device work queued
        if not hasattr(self, "recovery"):
            self.recovery = Recovery(self) if self.elastic else Unrecovered(self)

    def _ranks_policy(self) -> Solo:
        """One rank, several, or several whose votes close on a quorum: decided here, once per
        communicator."""
        if self.world_size == 1:
            return Solo(self)
        if is_process_group(self.comm):
            return Grouped(self)
        if self.quorum is not None and self.quorum < self.world_size:
            return Quorate(self)
        return Ensemble(self)

    def copy_for(self, books, memo) -> VoteEngine:
        """An engine of the same options and statistics for ``books`` (a deep copy of the
        optimizer), voting over the same ranks on a duplicate of its own."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key not in self._NOT_COPIED:
                setattr(new, key, copy.deepcopy(value, memo))
        new.books, new.scaler = books, self.scaler   # a copy steps under the same scaler
        new._attach(self.comm)
        return new

    def forget_layout(self) -> None:
        """Lay out again at the next step (``load_state_dict``), keeping the collective."""
        self._stale = True

    @property
    def topology_used(self) -> str:
        """The topology the votes travel by ("auto" resolved; known after the first step)."""
        return self.plan.voter.name if self.plan is not None else self.ranks.topology

    # -- the plan, made once per layout ------------------------------------------------------
    def ensure_plan(self) -> Plan:
        groups = self.books.param_groups
        if (self.plan is not None and not self._stale
                and self.plan.layout.signature == signature(groups)):
            return self.plan
        params = [p for _, p in trainable(groups)]
        if not self.gpu_agreed:   # at the first step, on every rank: one GPU path for all
            self.gpu_level = self.ranks.gpu_level(params)
            self.gpu_agreed = True
        backend = signs.signs_for(params, self.gpu_level)
        layout = build_layout(groups, self.overlap, self.bucket_words, backend)
        old = self.plan
        voter = (old.voter if old is not None and old.voter.tally == backend.tally
                 else self.ranks.voter(self.topology, layout, backend))
        self.plan = Plan(layout, backend, voter, self.rule.fused(backend),
                         self.ranks.zero_words(backend, layout.words))
        self._stale = False
        self.check.fresh = True   # its header is checked before any sign is sent
        self.stats.coordinates = layout.coordinates
        if self.overlap:
            check_threads(params)
            self.hooks.install(layout)
        log.debug("layout: %d parameters, %d coordinates, %d buckets, %d words per step",
                  len(layout.slots), layout.coordinates, len(layout.buckets), layout.words)
        return self.plan

    def move_to(self, comm, own) -> None:
        """After a recovery (:mod:`mpisign.optim.recovery`): go on over the survivors' ``comm``,
        voting over ``own``, a duplicate of it, with a collective of the same topology (and
        the same byte counters); the step's unapplied votes are to be started again."""
        old = self.plan
        if self.quorum is not None:   # as many ranks may still be late as before
            self.quorum = survivors_quorum(self.quorum, self.world_size, comm.Get_size())
        self.comm, self.rank, self.world_size = comm, comm.Get_rank(), comm.Get_size()
        self.own_comm.adopt(comm, own)
        self.ranks = self._ranks_policy()
        self.stats.nonfinite_by_rank = []   # the survivors are renumbered
        if self.monitor is not None:
            self.monitor.forget()
            self.stats.disagreement_by_rank, self.stats.suspects = [], []
        if old is None:
            return
        old.voter.abandon()   # its requests on the revoked communicator: none left pending
        voter = self.ranks.voter(old.voter.name, old.layout, old.backend)
        voter.traffic = old.voter.traffic
        # The zero masks packed before the failure serve the step redone now; a plan that had
        # none gets them from the next step on, if the survivors' count needs them.
        zeros = (old.zeros if old.zeros is not None
                 else self.ranks.zero_words(old.backend, old.layout.words))
        self.plan = Plan(old.layout, old.backend, voter, old.fused, zeros)
        self.check.reset()
        self.check.fresh = True   # the survivors check their layouts again, once
        for bucket in old.layout.buckets:
            if not bucket.applied:
                bucket.pending = None

    def hparams_digest(self) -> int:
        values = [self.rule.values(g) for g in self.books.param_groups]
        return digest64(np.array(values, dtype=np.float64).tobytes())

    # -- the step ---------------------------------------------------------------------------
    def step(self) -> None:
        """One voted step (see the module docstring). Every rank must take it."""
        try:
            self._step()
        except VoteTimeout as err:   # every rank that gave up names the same missing ranks
            named = self.ranks.roll_call(err)
            if named is err:
                raise
            raise named from err
        finally:   # the next step's hooks look at the layout (and the scaler) again, once
            self._hooks_current = self._hook_scale = None

    def _step(self) -> None:
        self.ranks.check_roll()   # no rank gave up on an earlier step while this one stalled
        plan = self.recovery.run(self.ensure_plan)
        layout = plan.layout
        if all(bucket.pending is None for bucket in layout.buckets):
            self.check.reset()   # no hook began this step: its header is still to come
        # skip(): no gradient is read (the local step is left out), so none counts as missing.
        present = [self._skipping or s.param.grad is not None for s in layout.slots]
        # Steps 1-4, done again among the survivors where an elastic optimizer lost a rank.
        self.recovery.run(self._vote, present)
        plan = self.plan   # a recovery may have made another collective
        self.ranks.after_vote()
        disagree = sum(int(bucket.disagree) for bucket in layout.buckets)
        self.stats.disagreement = disagree / max(1, layout.coordinates)
        traffic = plan.voter.traffic   # the collective is this optimizer's
        self.stats.bytes_sent, self.stats.bytes_received = traffic.sent, traffic.received
        self.stats.bytes_sent_between_nodes = traffic.sent_between_nodes
        self.stats.bytes_received_between_nodes = traffic.received_between_nodes
        # Step 5: the books.
        self.ranks.record_disagreement()
        groups = self.books.param_groups
        step = groups[0]["step"]
        for group in groups:
            group["step"] = step + 1
        for bucket in layout.buckets:
            bucket.next_step()
        self.check.reset()
        self.stats.steps += 1
        if self.check_every and self.stats.steps % self.check_every == 0:
            self.books.check_consistency()   # the public method (a subclass may extend it)

    def _vote(self, present: list) -> None:
        """Steps 1-4: the local steps, the header, the votes and their application, for the
        buckets whose result is not yet in the parameters (all of them, unless a recovery
        has brought some in)."""
        layout = self.plan.layout
        if layout.buckets and all(bucket.applied for bucket in layout.buckets):
            # A recovery handed this rank the whole step: nothing left to vote on. (After-vote
            # work waiting on the presence OR is dropped: it is this rank's alone.)
            self._deferred = []
            return
        # Step 1 first, so that a failure in the exchanges below never leaves a bucket's
        # local state without this step's update (see mpisign.optim.recovery).
        for bucket in layout.buckets:
            if not bucket.applied:
                self._pack_bucket(bucket)
        # Step 2: which parameters have a gradient on any rank: one that has none anywhere is
        # not updated, as in torch.optim. The headers say when every rank has every gradient;
        # when a hook began the step they cannot, and an OR of one bit each goes with the votes.
        self.ranks.post_header(absent=present.count(False))
        changed = self.hooks.changed(layout, self._inv_scale())
        anywhere = self.ranks.presence(layout, present, bool(changed))
        # Step 3: start every bucket's vote that a gradient hook has not started yet (all of
        # them without overlap; those with a parameter whose .grad is None with it).
        self._waiting = []   # packed by hooks, their device work maybe queued: started here
        for bucket in layout.buckets:
            if bucket.pending is None and not bucket.applied:
                self._start_bucket(bucket)
        # Step 4: finish each vote and apply it, once every rank's header is known to agree.
        self.ranks.check_header()
        has_grad, changed_somewhere = anywhere()
        if changed_somewhere:   # before any parameter moves, on every rank
            self.hooks.raise_changed(changed, self.books.param_groups[0]["step"],
                                     type(self.books).__name__)
        # After the presence OR, which a rank may post before the header's verdict and
        # another after it: the collectives on the engine's communicator keep one order.
        zeros_everywhere = self.ranks.start_all_zero()
        for after, params in self._deferred:   # the rules' work that waited for the OR
            after([has_grad[id(p)] for p in params])
        self._deferred = []
        ties = zeros_everywhere()   # what is exactly 0 on every rank does not move
        for bucket in layout.buckets:
            if not bucket.applied:
                self._finish_bucket(bucket, has_grad, ties)
        self.ranks.record_previous()

    def record_nonfinite(self, headers: list) -> None:
        """Every rank's non-finite count, from a step's headers, to the statistics; rank 0
        names another rank whose count grew (each rank warns about its own as it counts)."""
        every = [h.nonfinite for h in headers]
        before = self.stats.nonfinite_by_rank
        if self.rank == 0 and len(before) == len(every):
            for r, (was, now) in enumerate(zip(before, every)):
                if r != 0 and now > was:
                    log.warning("rank %d reports %d non-finite gradient entries (voted as 0) "
                                "in its steps before step %d, %d in all", r, now - was,
                                headers[0].step, now)
        self.stats.nonfinite_by_rank = every

    def record_disagreement(self, every: list, step: int) -> None:
        """Every rank's disagreement at ``step``, to the monitor and the statistics."""
        self.stats.disagreement_by_rank = list(every)
        self.stats.suspects = self.monitor.record(np.array(every), step, verbose=self.rank == 0)

    def _start_from_hook(self, bucket: Bucket) -> None:
        """A bucket whose gradients are all in: its local step and pack now; its vote too,
        unless the pack is still queued on a device (``mark()`` of the backend): then from a
        later hook, or from step(), once the device has done it. MPI needs the words finished,
        and waiting for them here would stall autograd's thread, which launches the backward
        kernels of the layers still to come.

        A layout that changed since the hooks were installed (``add_param_group``,
        ``requires_grad_`` toggled, ``load_state_dict``) packs nothing here: step() lays out
        again and packs every bucket once, so no momentum is updated twice."""
        if self._hooks_current is None:   # once a step: a signature reads every parameter
            self._hooks_current = (not self._stale and self.plan.layout.signature
                                   == signature(self.books.param_groups))
        if not self._hooks_current:
            return
        self.recovery.attempt(self._pack_from_hook, bucket)

    def _pack_from_hook(self, bucket: Bucket) -> None:
        self._pack_bucket(bucket)
        self.hooks.saw(bucket, self._inv_scale())
        self._waiting.append((bucket, self.plan.backend.mark()))
        for waiting in list(self._waiting):
            done = waiting[1]
            if done is not None and not done.query():
                continue   # its device work is still running: a later hook looks again
            self._waiting.remove(waiting)
            self._start_bucket(waiting[0])
            self.stats.overlapped += 1

    def _start_bucket(self, bucket: Bucket) -> None:
        """The local step and pack of one bucket's parameters (once a step), then its vote."""
        plan = self.plan
        step = self.books.param_groups[0]["step"]
        self._pack_bucket(bucket)
        self.ranks.post_header()   # the step header, once a step, beside the first vote
        plan.backend.settle()  # queued packs (staged GPU path) into the words: one wait for all
        words = plan.layout.packed[bucket.word0: bucket.word1]
        bucket.pending = plan.voter.start(words, words.shape[0] * packing.WORD_BITS,
                                          step=step, bucket=bucket.index)

    def _pack_bucket(self, bucket: Bucket) -> None:
        """The rule's local step for one bucket's parameters, packed into the layout's words:
        once a step (a gradient hook, or the step itself, may come first)."""
        if bucket.packed:
            return
        if self._skipping:   # skip(): no local step; the words go, and the root drops them
            bucket.packed = True
            return
        plan, books = self.plan, self.books
        zero_bit = (self.rank + books.param_groups[0]["step"]) % 2
        scale = self._inv_scale()
        by_group: dict = {}
        for slot in bucket.slots:
            by_group.setdefault(slot.group, []).append(slot)
        for gi, slots in by_group.items():
            group = books.param_groups[gi]
            params = [s.param for s in slots]
            outs = [plan.layout.packed[s.word0: s.word0 + s.words] for s in slots]
            zeros = (None if plan.zeros is None
                     else [plan.zeros[s.word0: s.word0 + s.words] for s in slots])
            # A fused kernel that cannot write the zero mask the plan needs is not used.
            fused = (plan.fused if zeros is None or plan.backend.fused_zeros else None)
            bad = (None if fused is None
                   else fused(params, [p.grad for p in params], books.state, group, scale,
                              zero_bit, outs, zeros))
            if bad is None:   # no fused kernel for these tensors: the rule, then the pack
                sources, after = self.rule.send(params, self._clean_grads(params),
                                                books.state, group, scale)
                if after is not None:
                    self._deferred.append((after, params))
                for i, (src, out) in enumerate(zip(sources, outs)):
                    plan.backend.pack(src, zero_bit, out)
                    if zeros is not None:
                        plan.backend.zeros(src, zeros[i])
            elif bad:
                self._count_nonfinite(bad)
        bucket.packed = True

    def _finish_bucket(self, bucket: Bucket, has_grad: dict, ties=None) -> None:
        """Finish one bucket's vote and move each parameter that has a gradient somewhere by
        the rule; keeps this rank's disagreement count on the bucket."""
        plan = self.plan
        plus, tie = plan.voter.finish(bucket.pending)
        self.ranks.check_roll()   # no rank has given up on this step
        if ties is not None:   # the coordinates exactly 0 on every rank: no step there
            extra = ties[bucket.word0: bucket.word1]
            tie = extra if tie is None else tie | extra
        mine = plan.layout.packed[bucket.word0: bucket.word1]
        bucket.disagree = plan.backend.disagreement(mine, plus, self.ranks.judged(bucket, tie))
        for slot in bucket.slots:
            if not has_grad[id(slot.param)]:
                continue
            lo, hi = slot.word0 - bucket.word0, slot.word0 - bucket.word0 + slot.words
            self.rule.move(plan.backend, slot.param, plus[lo:hi],
                           None if tie is None else tie[lo:hi],
                           self.books.param_groups[slot.group])
        bucket.pending, bucket.applied = None, True

    def _inv_scale(self) -> float:
        """Under torch.amp.GradScaler, gradients arrive scaled (``_step_supports_amp_scaling``
        of the books): the rule takes them unscaled, as it would after scaler.unscale_(opt).
        ``scaler.step(opt)`` sets ``grad_scale`` for the step; a gradient hook runs before it,
        in backward, and asks the scaler the optimizer was given (``grad_scaler=``) for the
        scale its loss was multiplied by: the same float, so overlap is bit for bit."""
        if not hasattr(self.books, "grad_scale"):   # not inside scaler.step(): a hook, or
            if self._hook_scale is None:            # opt.step() called by the user. Asked
                scaler = self.scaler                # once a step: get_scale() waits for the
                self._hook_scale = (1.0 / scaler.get_scale()   # device, and the scale stays
                                    if scaler is not None and scaler.is_enabled() else 1.0)
            return self._hook_scale
        scale = self.books.grad_scale
        return 1.0 if scale is None else 1.0 / float(scale)

    def _count_nonfinite(self, count: int) -> None:
        self.stats.nonfinite += count
        self.stats.nonfinite_steps += 1
        done = self.books.param_groups[0]["step"]
        log.warning("rank %d: %d non-finite gradient entries in step() call %d (after %d "
                    "completed steps: param_groups[0]['step'] == %d), voted as 0", self.rank,
                    count, done + 1, done, done)

    def _clean_grads(self, params: list) -> list:
        """Each parameter's gradient, None where it has none here, with NaN/inf entries
        replaced by 0 (in copies) and counted in the stats."""
        grads = [p.grad for p in params]
        for g in grads:
            if g is not None and g.is_sparse:
                raise ValueError(f"{type(self.books).__name__} does not take sparse gradients; "
                                 f"use dense embeddings")
        grads, count = scrubbed(grads)
        if count:
            self._count_nonfinite(count)
        return grads

    # -- a quorum's late rank ------------------------------------------------------------------
    def late(self) -> bool:
        """With ``quorum=``: whether the vote of this rank's coming step has already closed
        without it (see :mod:`mpisign.optim.quorate`); otherwise False."""
        return self.plan is not None and not self._stale and self.ranks.late()

    def skip(self) -> None:
        """The coming step without a local step: this rank takes the closed vote's result and
        moves its parameters by it, as every rank does, but computes nothing (its momentum
        stays as it is). Only where :meth:`late` is True: its signs could no longer count."""
        if not self.late():
            raise ValueError(f"skip() is for a rank whose vote has already closed without it "
                             f"(late() is True); rank {self.rank} is not late: call step()")
        self._skipping = True
        try:
            self.step()
        finally:
            self._skipping = False
        self.stats.skipped += 1
        self.stats.disagreement = math.nan   # it sent no signs of its own: nothing to judge

    def drain(self) -> None:
        """Nothing left in flight (see :meth:`mpisign.optim.books.SignOptimizer.drain`)."""
        self.ranks.drain()

    # -- consistency ------------------------------------------------------------------------
    def params_digest(self) -> bytes:
        """A 16-byte hash of every optimized parameter's bytes on this rank."""
        return exchanges.params_digest(p for g in self.books.param_groups for p in g["params"])

    def check_consistency(self) -> None:
        """Raise :class:`ParameterDivergence` on every rank unless all hold identical parameters.
        With ``elastic``, a dead rank met here is recovered from, and the recovery's own
        comparison of the survivors' parameters stands in for this one."""
        self.recovery.run(self._check_consistency, redo=False)

    def _check_consistency(self) -> None:
        differ = self.ranks.ranks_differing()
        if differ:
            raise ParameterDivergence(
                f"after step {self.stats.steps} rank(s) {differ} hold parameters that differ "
                f"from rank 0's; something other than the optimizer changed them")

    def private_comm(self):
        """The communicator this engine's own collectives outside the vote use (state
        gathering): its duplicate on several ranks, the user's on one."""
        return self.ranks.vote_comm()
