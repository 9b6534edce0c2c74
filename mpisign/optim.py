r"""Signum and signSGD with majority vote over MPI.

Bernstein, Zhao, Azizzadenesheli, Anandkumar, "signSGD with majority vote is communication
efficient and fault tolerant", ICLR 2019, Algorithm 1, in the authors' own form:

.. math::
    m_i &\leftarrow \beta m_i + (1 - \beta) g_i           && \text{on each worker } i \\
    v   &\leftarrow \operatorname{sign}\Big(\sum_i \operatorname{sign}(m_i)\Big)
                                                           && \text{majority vote, 0 on a tie} \\
    p   &\leftarrow p - \eta\,(v + \lambda p)

Books kept here: a layout giving each parameter whole uint64 words of one packed message, laid
out once and checked across ranks at the first step; one message per step (one per bucket with
``overlap=True``); momentum buffers in ``state[p]["momentum_buffer"]`` as in ``torch.optim.SGD``.

Documented rules:

* A ``.grad`` that is None counts as a zero gradient on that rank, so every rank always sends
  the same layout and no rank waits for a message that never comes. Parameters with
  ``requires_grad=False`` are left out of the layout (and never updated).
* A zero (or NaN) momentum coordinate is sent as ``(rank + step) % 2`` (see
  :mod:`mpisign.packing`): coordinates that are zero on every rank do not drift.
* Non-finite gradient entries (NaN, +-inf) are replaced by 0 before the momentum update and
  counted in ``stats.nonfinite``: a rank with a broken gradient keeps at most its one vote, and
  no NaN or inf ever enters the momentum or the weights.
"""

from __future__ import annotations

import copy
import logging
import math
import numbers
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from mpi4py import MPI
from torch.optim import Optimizer

from . import exchanges, header, packing, signs
from .collectives import LocalVote, check_comm, check_topology, default_timeout, make_vote
from .detection import DisagreementMonitor
from .header import (HyperparameterMismatch, LayoutMismatch, ParameterDivergence, StepCheck,
                     StepHeader, StepMismatch, digest64)
from .isolation import OwnComm
from .layout import Bucket, Layout, build_layout, signature, trainable
from .overlap import BucketHooks, check_threads
from .recovery import Recovery, TooFewRanks, Unrecovered

__all__ = ["Signum", "SignSGD", "LayoutMismatch", "ParameterDivergence",
           "HyperparameterMismatch", "StepMismatch", "TooFewRanks", "VoteStats"]

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
    suspects: list = field(default_factory=list)  # ranks the monitor flags (windowed mean)
    lost_ranks: list = field(default_factory=list)  # elastic: dead ranks, by their rank in
                                                    # the communicator the optimizer was given

    def as_dict(self) -> dict:
        return asdict(self)


def _number(value) -> float | None:
    """``value`` as a float if torch would take it as a hyperparameter: a real number, a numpy
    scalar or a one-element tensor (a scheduler may write either); else None."""
    if type(value) is float or type(value) is int:
        return float(value)   # the usual case, read about 25 times a step: no ABC check
    if isinstance(value, bool):
        return None
    if isinstance(value, torch.Tensor):
        return float(value) if value.numel() == 1 and not value.is_complex() else None
    if isinstance(value, (numbers.Real, np.floating, np.integer)):
        return float(value)
    return None


def _check_hparams(lr, momentum, weight_decay, where: str = "") -> None:
    """Raise ValueError unless 0 <= lr < inf, 0 <= momentum < 1, 0 <= weight_decay < inf."""
    lr_, beta, wd = _number(lr), _number(momentum), _number(weight_decay)
    if lr_ is None or not math.isfinite(lr_) or lr_ < 0:
        raise ValueError(f"{where}lr must be a finite number >= 0, got {lr!r}")
    if beta is None or not 0.0 <= beta < 1.0:
        raise ValueError(f"{where}momentum must be in [0, 1), got {momentum!r}")
    if wd is None or not math.isfinite(wd) or wd < 0:
        raise ValueError(f"{where}weight_decay must be a finite number >= 0, got "
                         f"{weight_decay!r}")


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


class Signum(Optimizer):
    """Signum (momentum sign descent) with a majority vote of the signs over ``comm``.

    Args:
        params: parameters or param groups, as for any ``torch.optim.Optimizer``.
        lr: step size (every coordinate moves by exactly ``lr`` or 0, plus weight decay).
        momentum: beta of the local momentum, in [0, 1); 0 gives signSGD.
        weight_decay: lambda, applied as ``p -= lr * (v + lambda * p)``, outside the vote.
        comm: mpi4py intracommunicator; None means ``MPI.COMM_WORLD``. On a communicator of
            size 1 this is plain single-worker Signum with no MPI traffic.
        topology: how the vote travels, a key of :data:`mpisign.TOPOLOGIES`: ``"server"`` (the
            paper's), ``"tree"``, ``"sharded"``, ``"allgather"``, ``"hierarchical"`` (exact
            counts inside each node, far fewer bytes between nodes); or ``"auto"``: the cost
            model's choice for this model's size, the number of ranks and the measured link
            (measured at the first step, logged once; see ``topology_used``).
        timeout: seconds a vote waits on its peers before raising ``VoteTimeout``
            (default ``$MPISIGN_TIMEOUT`` or 300).
        check_every: every this many steps, check that all ranks hold identical parameters
            (:meth:`check_consistency`); 0 turns it off.
        overlap: start each bucket's vote from a gradient hook as soon as the backward pass has
            produced all of the bucket's gradients, so communication overlaps the rest of the
            backward pass. Needs exactly one backward pass per ``step()`` (no gradient
            accumulation). Results are bit-identical to ``overlap=False``.
        bucket_mb: with ``overlap``, the size of a bucket in MiB of fp32 gradient (as DDP's
            ``bucket_cap_mb``); without it, all parameters travel as one message.
        monitor: a :class:`mpisign.detection.DisagreementMonitor`: every step, the ranks
            exchange their disagreement fractions (one float each) into
            ``stats.disagreement_by_rank``, and the monitor flags outliers (``stats.suspects``).
            On several ranks the fractions travel in the next step's header, at no cost of
            their own: after step k, ``disagreement_by_rank`` holds step k-1's (on one rank,
            step k's).
        elastic: survive dead ranks (needs ULFM: Open MPI 5 started with ``mpirun --with-ft
            ulfm``; else :class:`mpisign.elastic.ElasticUnavailable` here). When a rank dies
            during a vote, the survivors shrink the communicator, agree on what each of them
            already applied, and redo the step's vote among themselves: no step is lost and
            their parameters stay bit-identical. ``opt.comm`` becomes the survivors'
            communicator and ``stats.lost_ranks`` names the dead (see :mod:`mpisign.recovery`).
        min_ranks: with ``elastic``, the fewest survivors to carry on with (default 1: a vote
            has no quorum); below it every survivor raises :class:`TooFewRanks`.
    """

    #: torch.amp.GradScaler's protocol: ``scaler.step(opt)`` always calls :meth:`step`, which
    #: unscales the momentum update itself. A sign does not care about the scale, and an
    #: inf/NaN gradient entry is already at most one vote, so no rank skips a step and all
    #: stay in unison (a skipped step on one rank would leave it a step behind the others).
    _step_supports_amp_scaling = True

    def __init__(self, params, lr: float = 1e-4, momentum: float = 0.9,
                 weight_decay: float = 0.0, comm=None, topology: str = "server", *,
                 timeout: float | None = None, check_every: int = 0, overlap: bool = False,
                 bucket_mb: float = 25.0, monitor: DisagreementMonitor | None = None,
                 elastic: bool = False, min_ranks: int = 1):
        # Validate everything before any communication, so every rank raises the same error.
        _check_hparams(lr, momentum, weight_decay)
        check_topology(topology)
        comm = check_comm(MPI.COMM_WORLD if comm is None else comm)
        if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
        if not isinstance(check_every, int) or check_every < 0:
            raise ValueError(f"check_every must be an int >= 0, got {check_every!r}")
        if not isinstance(bucket_mb, (int, float)) or not bucket_mb > 0:
            raise ValueError(f"bucket_mb must be > 0, got {bucket_mb!r}")
        if monitor is not None and not isinstance(monitor, DisagreementMonitor):
            raise ValueError(f"monitor must be a DisagreementMonitor, got {monitor!r}")
        if not isinstance(min_ranks, int) or min_ranks < 1:
            raise ValueError(f"min_ranks must be an int >= 1, got {min_ranks!r}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        # What users tune.
        self.comm = comm
        self.topology = topology
        self.timeout = default_timeout() if timeout is None else float(timeout)
        self.check_every = check_every
        self.overlap = bool(overlap)
        self.bucket_words = max(1, int(bucket_mb * 2**20 / 4) // packing.WORD_BITS)
        self.monitor = monitor
        self.rank = comm.Get_rank()
        self.world_size = comm.Get_size()
        self.stats = VoteStats()
        # Made at the first step (and again when the parameters change): the layout, the signs
        # backend chosen for it, the collective and the overlap hooks. The votes travel on a
        # duplicate of comm of this optimizer's own, also made at the first step.
        self._own_comm = OwnComm(comm, self, self.timeout, type(self).__name__)
        self._forget_layout()
        self._check = StepCheck()  # this step's header (see mpisign.header)
        self._deferred: list = []  # momentum decays waiting for the gradient-presence OR
        self._waiting: list = []   # (bucket, marker): packed by a hook, its device work queued
        # The GPU path every rank agreed on at the first step (mpisign.cuda.startup); a later
        # layout, which may change on one rank alone, keeps it without a collective.
        self._gpu_agreed, self._gpu_level = False, None
        # What a dead rank does to a step: ends it (Unrecovered), or is survived (Recovery).
        self.elastic, self.min_ranks = bool(elastic), min_ranks
        self._recovery = Recovery(self) if self.elastic else Unrecovered()

    def _forget_layout(self) -> None:
        self._layout: Layout | None = None
        self._signs: signs.Signs | None = None
        self._voter = None
        self._hooks = BucketHooks(self._start_from_hook,
                                  lambda: (self.rank, self.param_groups[0]["step"]))

    # -- what torch.optim users expect of an optimizer object ---------------------------------
    def __repr__(self) -> str:
        head, _, rest = super().__repr__().partition("\n")
        return (f"{head}\n    topology: {self.topology_used}, ranks: {self.world_size}, "
                f"overlap: {self.overlap}\n{rest}")

    #: Left out of a copy: the collective, the layout and the hooks belong to the original.
    _NOT_COPIED = ("comm", "_own_comm", "_layout", "_signs", "_voter", "_hooks", "_check",
                   "_deferred", "_recovery")

    def __deepcopy__(self, memo):
        """A working optimizer over copies of the parameters (or of the model copied with it:
        ``deepcopy((model, opt))``), with copies of the momentum and statistics. Communicators
        are not copied: the copy votes over the same ranks, on a duplicate of its own made at
        its first step, which every rank must then take too. Copying is local."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key not in self._NOT_COPIED:
                setattr(new, key, copy.deepcopy(value, memo))
        new.comm = self.comm
        new._own_comm = OwnComm(self.comm, new, self.timeout, type(self).__name__)
        new._forget_layout()
        new._check, new._deferred = StepCheck(), []
        new._recovery = Recovery(new) if new.elastic else Unrecovered()
        return new

    def __getstate__(self):
        raise TypeError(
            f"a {type(self).__name__} cannot be pickled: it holds an MPI communicator, which "
            f"means nothing in another process. Save opt.state_dict() (this rank's momentum "
            f"and step) and load it into a new optimizer; copy.deepcopy(opt) works in-process.")

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("step", 0)
            group.setdefault("weight_decay", 0.0)
        self._layout = None

    def _check_groups(self) -> None:
        """The hyperparameters in ``param_groups`` (a scheduler or the user may write them)."""
        for i, group in enumerate(self.param_groups):
            _check_hparams(group["lr"], group["momentum"], group["weight_decay"],
                           f"param_groups[{i}]: ")

    def add_param_group(self, param_group: dict) -> None:
        _check_hparams(param_group.get("lr", self.defaults["lr"]),
                       param_group.get("momentum", self.defaults["momentum"]),
                       param_group.get("weight_decay", self.defaults["weight_decay"]))
        param_group.setdefault("step", 0)
        super().add_param_group(param_group)

    @property
    def topology_used(self) -> str:
        """The topology the votes travel by ("auto" resolved; known after the first step)."""
        if self._voter is not None:
            return self._voter.name
        return "local" if self.world_size == 1 else self.topology

    # -- layout, backend and collective, chosen once ------------------------------------------
    def _ensure_layout(self) -> Layout:
        if self._layout is not None and self._layout.signature == signature(self.param_groups):
            return self._layout
        params = [p for _, p in trainable(self.param_groups)]
        if not self._gpu_agreed:   # at the first step, on every rank: one GPU path for all
            self._gpu_level = signs.gpu_level(
                params, None if self.world_size == 1 else self._own_comm.get(), self.timeout)
            self._gpu_agreed = True
        self._signs = signs.signs_for(params, self._gpu_level)
        self._layout = build_layout(self.param_groups, self.overlap, self.bucket_words,
                                    self._signs)
        self._check.fresh = True   # its header is checked before any sign is sent
        self.stats.coordinates = self._layout.coordinates
        if self.world_size == 1 or self._voter is None or self._voter.tally != self._signs.tally:
            self._voter = self._make_voter(self.topology)
        if self.overlap:
            check_threads([s.param for s in self._layout.slots])
            self._hooks.install(self._layout)
        log.debug("layout: %d parameters, %d coordinates, %d buckets, %d words per step",
                  len(self._layout.slots), self._layout.coordinates,
                  len(self._layout.buckets), self._layout.words)
        return self._layout

    def _make_voter(self, topology: str):
        if self.world_size == 1:
            return LocalVote(self.comm)
        # The tally runs where the words are: the device's kernel, or the host reference.
        return make_vote(topology, self._own_comm.get(), timeout=self.timeout,
                         n_coords=self._layout.coordinates, tally=self._signs.tally)

    def _move_to(self, comm, own) -> None:
        """After a recovery (:mod:`mpisign.recovery`): go on over the survivors' ``comm``,
        voting over ``own``, a duplicate of it, with a collective of the same topology (and
        the same byte counters); the step's unapplied votes are to be started again."""
        old = self._voter
        self.comm, self.rank, self.world_size = comm, comm.Get_rank(), comm.Get_size()
        self._own_comm.adopt(comm, own)
        if self.monitor is not None:
            self.monitor.forget()
            self.stats.disagreement_by_rank, self.stats.suspects = [], []
        if self._layout is None:
            self._voter = None
            return
        self._voter = self._make_voter(self.topology if old is None else old.name)
        if old is not None:
            self._voter.traffic = old.traffic
        self._check.reset()
        self._check.fresh = True   # the survivors check their layouts again, once
        for bucket in self._layout.buckets:
            if not bucket.applied:
                bucket.pending = None

    # -- the step header (mpisign.header) ----------------------------------------------------
    def _hparams_digest(self) -> int:
        values = [(_number(g["lr"]), _number(g["momentum"]), _number(g["weight_decay"]))
                  for g in self.param_groups]
        return digest64(np.array(values, dtype=np.float64).tobytes())

    def _post_header(self, absent: int = header.UNKNOWN) -> None:
        """Post this step's header: one allgather of 64 bytes a rank, beside the vote. A rank
        that has just built its layout checks it at once, before it sends any sign."""
        if self.world_size == 1 or self._check.posted:
            return
        step, g0 = self.param_groups[0]["step"], self.param_groups[0]
        if step == 0:
            params = digest64(self.params_digest())
        else:   # the monitor's figure of the previous step rides along (see mpisign.header)
            voted = self.stats.steps > 0   # a resumed optimizer has no previous figure: NaN
            params = (StepHeader.word(self.stats.disagreement if voted else math.nan)
                      if self.monitor is not None else 0)
        mine = StepHeader(step, self._layout.digest, self._hparams_digest(), params,
                          _number(g0["lr"]), _number(g0["momentum"]),
                          _number(g0["weight_decay"]), absent)
        self._check.post(self._own_comm.get(), mine)
        if self._check.fresh:
            self._check_header()

    def _check_header(self) -> None:
        """Every rank's header agrees with this one's, or every rank raises the same error."""
        if self.world_size == 1 or self._check.verified:
            return
        self._check.check(self.timeout, self.rank, self._layout.summary)

    def _record_previous(self) -> None:
        """The previous step's disagreement of every rank, from this step's headers, to the
        monitor: after the votes, so that the root of a vote does not keep the others waiting
        while it keeps the books."""
        headers = self._check.headers
        if self.monitor is None or headers is None or headers[0].step == 0:
            return
        every = [h.previous_disagreement for h in headers]
        if not any(map(math.isnan, every)):   # NaN: a rank with no previous step (a resume)
            self._record_disagreement(every, headers[0].step - 1)

    # -- the step ---------------------------------------------------------------------------
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure=None):
        """One voted step. Every rank of ``comm`` must call it the same number of times.

        ``torch.compile(opt.step)`` runs it as it is (excluded from compilation: MPI calls and
        data-dependent packing do not trace), so a compiled training step keeps working.
        """
        # Before any communication, so that a bad value raises the same error on every rank.
        self._check_groups()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        layout = self._recovery.run(self._ensure_layout)
        if all(bucket.pending is None for bucket in layout.buckets):
            self._check.reset()   # no hook began this step: its header is still to come
        present = [s.param.grad is not None for s in layout.slots]
        # Steps 1-3, done again among the survivors where an elastic optimizer lost a rank.
        self._recovery.run(self._vote, layout, present)
        disagree = sum(int(bucket.disagree) for bucket in layout.buckets)
        self.stats.disagreement = disagree / max(1, layout.coordinates)
        self.stats.bytes_sent = self._voter.traffic.sent   # the collective is this optimizer's
        self.stats.bytes_received = self._voter.traffic.received
        self.stats.bytes_sent_between_nodes = self._voter.traffic.sent_between_nodes
        self.stats.bytes_received_between_nodes = self._voter.traffic.received_between_nodes
        # Step 4: the books.
        step = self.param_groups[0]["step"]
        if self.monitor is not None and self.world_size == 1:
            self._record_disagreement([self.stats.disagreement], step)
        for group in self.param_groups:
            group["step"] = step + 1
        for bucket in layout.buckets:
            bucket.next_step()
        self._check.reset()
        self.stats.steps += 1
        if self.check_every and self.stats.steps % self.check_every == 0:
            self.check_consistency()
        return loss

    def _vote(self, layout: Layout, present: list) -> None:
        """Steps 1-3 of :meth:`step`: the header, the votes and their application, for the
        buckets whose result is not yet in the parameters (all of them, unless a recovery
        has brought some in)."""
        if all(bucket.applied for bucket in layout.buckets):
            # A recovery handed this rank the whole step: nothing left to vote on. (A decay of
            # momentum waiting on the presence OR is dropped: it is this rank's alone.)
            self._deferred = []
            return
        # The local step first, so that a failure in the exchanges below never leaves a
        # bucket's momentum without this step's update (see mpisign.recovery).
        for bucket in layout.buckets:
            if not bucket.applied:
                self._pack_bucket(bucket)
        self._post_header(absent=present.count(False))
        # Step 1: which parameters have a gradient on any rank: one that has none anywhere is
        # not updated, as in torch.optim. The headers say when every rank has every gradient;
        # when a hook began the step they cannot, and an OR of one bit each goes with the votes.
        anywhere = self._presence(layout, present)
        # Step 2: pack and start every bucket's vote that a gradient hook has not started yet
        # (all of them without overlap; those with a parameter whose .grad is None with it).
        self._waiting = []   # packed by hooks, their device work maybe queued: started here
        for bucket in layout.buckets:
            if bucket.pending is None and not bucket.applied:
                self._start_bucket(bucket)
        # Step 3: finish each vote and apply it: p <- p - lr * (v + weight_decay * p), once
        # every rank's header is known to agree.
        self._check_header()
        has_grad = anywhere()
        for slot_param, buf, beta in self._deferred:   # see _local_update
            if has_grad[id(slot_param)]:
                buf.mul_(beta)
        self._deferred = []
        for bucket in layout.buckets:
            if not bucket.applied:
                self._finish_bucket(bucket, has_grad)
        self._record_previous()

    def _presence(self, layout: Layout, present: list):
        """A function giving ``{id(param): has a gradient on some rank}``, to call after the
        header check. One rank: its own. Headers that counted the missing gradients: all
        present when every count is 0 (the usual step: no exchange), else an OR of one bit a
        parameter. A header begun by a hook could not count: the OR starts now, beside the
        votes."""
        ids = [id(s.param) for s in layout.slots]
        if self.world_size == 1:
            return lambda: dict(zip(ids, present))

        def start_or():
            step = self.param_groups[0]["step"]
            wait = exchanges.start_presence(self._own_comm.get(), present, self.timeout,
                                            f"gradient presence at step {step} on rank "
                                            f"{self.rank}")
            return lambda: dict(zip(ids, wait()))
        if not self._check.absent_known:
            return start_or()
        return lambda: (dict.fromkeys(ids, True) if self._check.all_present else start_or()())

    def _record_disagreement(self, every: list, step: int) -> None:
        """Every rank's disagreement at ``step``, to the monitor and the statistics."""
        self.stats.disagreement_by_rank = list(every)
        self.stats.suspects = self.monitor.record(np.array(every), step, verbose=self.rank == 0)

    def _start_from_hook(self, bucket: Bucket) -> None:
        """A bucket whose gradients are all in: its local step and pack now; its vote too,
        unless the pack is still queued on a device (``mark()`` of the backend): then from a
        later hook, or from step(), once the device has done it. MPI needs the words finished,
        and waiting for them here would stall autograd's thread, which launches the backward
        kernels of the layers still to come."""
        self._recovery.attempt(self._pack_from_hook, bucket)

    def _pack_from_hook(self, bucket: Bucket) -> None:
        self._pack_bucket(bucket)
        self._waiting.append((bucket, self._signs.mark()))
        for waiting in list(self._waiting):
            done = waiting[1]
            if done is not None and not done.query():
                continue   # its device work is still running: a later hook looks again
            self._waiting.remove(waiting)
            self._start_bucket(waiting[0])
            self.stats.overlapped += 1

    def _start_bucket(self, bucket: Bucket) -> None:
        """Momentum update and packing of one bucket's parameters (once a step), then start
        its vote."""
        step = self.param_groups[0]["step"]
        self._pack_bucket(bucket)
        self._post_header()   # the step header, once a step, beside the first vote
        self._signs.settle()  # queued packs (staged GPU path) into the words: one wait for all
        words = self._layout.packed[bucket.word0: bucket.word1]
        bucket.pending = self._voter.start(words, words.shape[0] * packing.WORD_BITS,
                                           step=step, bucket=bucket.index)

    def _pack_bucket(self, bucket: Bucket) -> None:
        """The local step of one bucket's parameters, packed into the layout's words: once a
        step (a gradient hook, or the step itself, may come first)."""
        if bucket.packed:
            return
        zero_bit = (self.rank + self.param_groups[0]["step"]) % 2
        packed = self._layout.packed
        by_group: dict = {}
        for slot in bucket.slots:
            by_group.setdefault(slot.group, []).append(slot)
        for gi, slots in by_group.items():
            beta = _number(self.param_groups[gi]["momentum"])
            params = [s.param for s in slots]
            outs = [packed[s.word0: s.word0 + s.words] for s in slots]
            if not self._update_and_pack(params, beta, zero_bit, outs):
                for src, out in zip(self._local_update(params, beta), outs):
                    self._signs.pack(src, zero_bit, out)
        bucket.packed = True

    def _finish_bucket(self, bucket: Bucket, has_grad: dict) -> None:
        """Finish one bucket's vote and apply it to each parameter that has a gradient
        somewhere; keeps this rank's disagreement count on the bucket."""
        plus, tie = self._voter.finish(bucket.pending)
        mine = self._layout.packed[bucket.word0: bucket.word1]
        bucket.disagree = self._signs.disagreement(mine, plus, tie)
        for slot in bucket.slots:
            if not has_grad[id(slot.param)]:
                continue
            group = self.param_groups[slot.group]
            lo, hi = slot.word0 - bucket.word0, slot.word0 - bucket.word0 + slot.words
            self._signs.apply(slot.param, plus[lo:hi], None if tie is None else tie[lo:hi],
                              _number(group["lr"]), _number(group["weight_decay"]))
        bucket.pending, bucket.applied = None, True

    def _update_and_pack(self, params: list, beta: float, zero_bit: int, outs: list) -> bool:
        """The local step and the pack in one pass of the backend, where it fuses them
        (:meth:`mpisign.signs.CompiledSigns.update_and_pack`: the same bits as
        :meth:`_local_update` then ``pack``) and every parameter has its gradient here. False:
        nothing was done."""
        fused = getattr(self._signs, "update_and_pack", None)
        if fused is None or any(p.grad is None for p in params):
            return False
        bufs = [self._momentum_buffer(p) for p in params] if beta else [None] * len(params)
        bad = fused([p.grad for p in params], bufs, beta, (1 - beta) * self._inv_scale(),
                    zero_bit, outs)
        if bad is None:
            return False
        if bad:
            self._count_nonfinite(bad)
        return True

    def _momentum_buffer(self, p: torch.Tensor) -> torch.Tensor:
        st = self.state[p]
        if "momentum_buffer" not in st:
            st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        return st["momentum_buffer"]

    def _inv_scale(self) -> float:
        """Under torch.amp.GradScaler, gradients arrive scaled (see _step_supports_amp_scaling):
        the momentum takes them unscaled, as it would after scaler.unscale_(opt)."""
        scale = getattr(self, "grad_scale", None)
        return 1.0 if scale is None else 1.0 / float(scale)

    def _count_nonfinite(self, count: int) -> None:
        self.stats.nonfinite += count
        self.stats.nonfinite_steps += 1
        log.warning("rank %d: %d non-finite gradient entries at step %d, treated as 0",
                    self.rank, count, self.param_groups[0]["step"])

    def _local_update(self, params: list, beta: float) -> list:
        """What each parameter votes with: its cleaned gradient, or the updated momentum.

        ``.grad`` None votes as a zero gradient (with momentum: ``beta * m``, and ``m`` decays
        only once step() knows that some rank has this gradient); NaN/inf entries become 0 and
        are counted.
        """
        absent = [p.grad is None for p in params]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        for g in grads:
            if g.is_sparse:
                raise ValueError("Signum does not take sparse gradients; use dense embeddings")
        grads = self._scrub_nonfinite(grads)
        if not beta:
            return grads   # the sign of a scaled gradient is the sign of the gradient
        bufs = [self._momentum_buffer(p) for p in params]
        here = [i for i, a in enumerate(absent) if not a]
        if here:
            torch._foreach_mul_([bufs[i] for i in here], beta)
            torch._foreach_add_([bufs[i] for i in here], [grads[i] for i in here],
                                alpha=(1 - beta) * self._inv_scale())
        # No gradient here: vote with beta * m, but decay m only once step() knows that some
        # rank has this gradient (if none has, the parameter and its momentum stay as they are).
        sources = list(bufs)
        for i in (i for i, a in enumerate(absent) if a):
            sources[i] = bufs[i] * beta
            self._deferred.append((params[i], bufs[i], beta))
        return sources

    def _scrub_nonfinite(self, grads: list) -> list:
        """``grads`` with NaN/inf entries replaced by 0 (in copies), counted in the stats."""
        # A sum is NaN/inf whenever an entry is (and, rarely, when finite values overflow: the
        # exact check below then finds nothing); it is about 10x cheaper than a max-norm.
        suspect = [i for i, ok in enumerate(_all_finite_sums(grads)) if not ok]
        bad = [i for i in suspect if not bool(torch.isfinite(grads[i]).all())]
        if not bad:
            return grads
        grads = list(grads)
        count = 0
        for i in bad:
            g = grads[i] = grads[i].clone()
            count += int(g.numel() - torch.isfinite(g).sum())
            torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
        self._count_nonfinite(count)
        return grads

    # -- consistency ------------------------------------------------------------------------
    def params_digest(self) -> bytes:
        """A 16-byte hash of every optimized parameter's bytes on this rank."""
        return exchanges.params_digest(p for g in self.param_groups for p in g["params"])

    def check_consistency(self) -> None:
        """Raise :class:`ParameterDivergence` on every rank unless all hold identical parameters.
        With ``elastic``, a dead rank met here is recovered from, and the recovery's own
        comparison of the survivors' parameters stands in for this one."""
        self._recovery.run(self._check_consistency, redo=False)

    def _check_consistency(self) -> None:
        if self.world_size == 1:
            return
        differ = exchanges.ranks_differing(self._own_comm.get(), self.params_digest(),
                                           self.timeout, f"consistency check on rank {self.rank}")
        if differ:
            raise ParameterDivergence(
                f"after step {self.stats.steps} rank(s) {differ} hold parameters that differ "
                f"from rank 0's; something other than the optimizer changed them")


class SignSGD(Signum):
    """signSGD with majority vote: :class:`Signum` with ``momentum=0``."""

    def __init__(self, params, lr: float = 1e-4, weight_decay: float = 0.0, comm=None,
                 topology: str = "server", **options):
        super().__init__(params, lr=lr, momentum=0.0, weight_decay=weight_decay, comm=comm,
                         topology=topology, **options)

    def _check_groups(self) -> None:
        super()._check_groups()
        for i, group in enumerate(self.param_groups):
            if _number(group["momentum"]) != 0.0:
                raise ValueError(
                    f"SignSGD has no momentum, but param_groups[{i}]['momentum'] is "
                    f"{group['momentum']!r}: something wrote it (OneCycleLR and CyclicLR do, "
                    f"unless cycle_momentum=False). Use Signum for momentum, or "
                    f"cycle_momentum=False.")
