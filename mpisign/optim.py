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
import hashlib
import logging
import math
import numbers
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from mpi4py import MPI
from torch.optim import Optimizer

from . import packing
from .collectives import check_comm, check_topology, default_timeout, make_vote
from .collectives.base import bounded, host_tally
from .detection import DisagreementMonitor
from . import header
from .header import (HyperparameterMismatch, LayoutMismatch, ParameterDivergence, StepHeader,
                     StepMismatch, digest64)
from .isolation import OwnComm

__all__ = ["Signum", "SignSGD", "LayoutMismatch", "ParameterDivergence",
           "HyperparameterMismatch", "StepMismatch", "VoteStats"]

log = logging.getLogger(__name__)


@dataclass
class VoteStats:
    """What the optimizer did, for logs and metrics. Cumulative unless said otherwise."""

    steps: int = 0
    bytes_sent: int = 0          # payload bytes this rank posted to MPI
    bytes_received: int = 0
    nonfinite: int = 0           # gradient entries that were NaN or inf, replaced by 0
    nonfinite_steps: int = 0     # steps in which at least one such entry was seen
    disagreement: float = 0.0    # last step: fraction of this rank's votes against the majority
    coordinates: int = 0         # coordinates voted on per step
    overlapped: int = 0          # bucket votes started from a gradient hook (overlap=True)
    disagreement_by_rank: list = field(default_factory=list)  # last step, with a monitor
    suspects: list = field(default_factory=list)  # ranks the monitor flags (windowed mean)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Slot:
    """One parameter's place in the packed message: words ``[word0, word0 + words)``."""

    param: torch.Tensor
    group: int
    word0: int
    words: int


@dataclass
class _Bucket:
    """Parameters whose packed signs travel as one message (one vote)."""

    index: int
    slots: list
    word0: int
    word1: int
    ready: set = field(default_factory=set)  # ids of params whose gradient hook fired
    pending: object = None                   # the vote in flight (collectives.Pending)


@dataclass
class _Layout:
    signature: tuple
    digest: int = 0           # of the parameters' shapes, dtypes and groups (step header)
    slots: list = field(default_factory=list)
    buckets: list = field(default_factory=list)
    words: int = 0
    coordinates: int = 0
    packed: np.ndarray | None = None


def _gpu_path(t: torch.Tensor):
    """mpisign.cuda's staged kernels for this CUDA tensor, with words in host memory, or None
    (the CPU reference path)."""
    from .cuda.bridge import CudaSigns, staged_path
    return staged_path(t.device) if CudaSigns.handles(t) else None


def _resident_path(params: list):
    """The device-resident GPU path (:class:`mpisign.cuda.bridge.ResidentSigns`) if every
    parameter can take it: contiguous, of a kernel dtype, on one CUDA device whose MPI is
    CUDA-aware. Else None: words live in host memory (staged for CUDA parameters)."""
    from .cuda.bridge import device_path
    first = params[0]
    if not all(p.is_cuda and p.device == first.device and p.is_contiguous() for p in params):
        return None
    gpu = device_path(first.device)
    if gpu is None or not gpu.resident or not all(gpu.handles(p) for p in params):
        return None
    return gpu


def _number(value) -> float | None:
    """``value`` as a float if torch would take it as a hyperparameter: a real number, a numpy
    scalar or a one-element tensor (a scheduler may write either); else None."""
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
            paper's), ``"tree"``, ``"sharded"``, ``"allgather"``; or ``"auto"``: the cost
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
    """

    #: torch.amp.GradScaler's protocol: ``scaler.step(opt)`` always calls :meth:`step`, which
    #: unscales the momentum update itself. A sign does not care about the scale, and an
    #: inf/NaN gradient entry is already at most one vote, so no rank skips a step and all
    #: stay in unison (a skipped step on one rank would leave it a step behind the others).
    _step_supports_amp_scaling = True

    def __init__(self, params, lr: float = 1e-4, momentum: float = 0.9,
                 weight_decay: float = 0.0, comm=None, topology: str = "server", *,
                 timeout: float | None = None, check_every: int = 0, overlap: bool = False,
                 bucket_mb: float = 25.0, monitor: DisagreementMonitor | None = None):
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
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        # What users tune.
        self.comm = comm
        self.topology = topology
        self.timeout = default_timeout() if timeout is None else float(timeout)
        self.check_every = check_every
        self.overlap = bool(overlap)
        self.bucket_words = max(1, int(bucket_mb * 2**20 / 4) // packing.WORD_BITS)
        self.monitor = monitor
        # Internal: the layout, the collective and the hooks, made at the first step; the votes
        # travel on a duplicate of comm of this optimizer's own (made at the first step).
        self._own_comm = OwnComm(comm, self, self.timeout, type(self).__name__)
        self.rank = comm.Get_rank()
        self.world_size = comm.Get_size()
        self._layout: _Layout | None = None
        self._voter = None
        self._resident = None  # the device-resident GPU path, when every parameter can take it
        self._hooks: list = []
        self._verified = False  # this step's header is checked (reset when the step ends)
        self._header = None     # this step's header exchange, in flight
        self._layout_fresh = False  # built since the last checked header: check before voting
        self._all_present = False   # every rank's header said: every gradient is here
        self._absent_known = False  # this step's header counts the missing gradients
        self._deferred: list = []  # momentum decays waiting for the gradient-presence OR
        self._pack_scratch: torch.Tensor | None = None  # bool, largest parameter's size
        self._apply_scratch: dict = {}                   # chunk buffers of packing.apply_signs
        # Statistics.
        self.stats = VoteStats()

    # -- what torch.optim users expect of an optimizer object ---------------------------------
    def __repr__(self) -> str:
        head, _, rest = super().__repr__().partition("\n")
        return (f"{head}\n    topology: {self.topology_used}, ranks: {self.world_size}, "
                f"overlap: {self.overlap}\n{rest}")

    #: Left out of a copy: the collective, the layout and the hooks belong to the original.
    _NOT_COPIED = ("comm", "_own_comm", "_layout", "_voter", "_resident", "_hooks",
                   "_pack_scratch", "_apply_scratch", "_deferred")

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
        new._layout = new._voter = new._resident = new._pack_scratch = None
        new._hooks, new._apply_scratch, new._deferred = [], {}, []
        new._verified, new._header, new._layout_fresh = False, None, False
        new._all_present = new._absent_known = False
        return new

    def __getstate__(self):
        raise TypeError(
            f"a {type(self).__name__} cannot be pickled: it holds an MPI communicator, which "
            f"means nothing in another process. Save opt.state_dict() (this rank's momentum "
            f"and step) and load it into a new optimizer; copy.deepcopy(opt) works in-process.")

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

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("step", 0)
            group.setdefault("weight_decay", 0.0)
        self._layout = None

    # -- layout -----------------------------------------------------------------------------
    def _signature(self) -> tuple:
        return tuple(tuple(id(p) for p in g["params"] if p.requires_grad)
                     for g in self.param_groups)

    def _describe(self) -> list:
        return [(gi, tuple(p.shape), str(p.dtype))
                for gi, g in enumerate(self.param_groups)
                for p in g["params"] if p.requires_grad]

    @property
    def topology_used(self) -> str:
        """The topology the votes travel by ("auto" resolved; known after the first step)."""
        if self._voter is not None:
            return self._voter.name
        return "local" if self.world_size == 1 else self.topology

    def _build_layout(self) -> _Layout:
        """Every trainable parameter gets whole words (so its bits start on a word boundary);
        buckets are runs of parameters, in reverse order with ``overlap`` (the backward pass
        produces the last layers' gradients first)."""
        layout = _Layout(signature=self._signature(), digest=digest64(repr(
            (self._describe(), self.overlap, self.bucket_words)).encode()))
        order = [(gi, p) for gi, g in enumerate(self.param_groups)
                 for p in g["params"] if p.requires_grad]
        if not order:
            raise ValueError("no parameter with requires_grad=True to optimize")
        for _, p in order:
            if not p.is_floating_point():
                raise ValueError(f"parameters must be floating point, got {p.dtype}")
        if self.overlap:
            order.reverse()
        word = 0
        bucket: list[_Slot] = []
        for gi, p in order:
            slot = _Slot(p, gi, word, packing.n_words(p.numel()))
            word += slot.words
            layout.slots.append(slot)
            bucket.append(slot)
            if self.overlap and word - bucket[0].word0 >= self.bucket_words:
                layout.buckets.append(_Bucket(len(layout.buckets), bucket, bucket[0].word0, word))
                bucket = []
        if bucket:
            layout.buckets.append(_Bucket(len(layout.buckets), bucket, bucket[0].word0, word))
        layout.words = word
        layout.coordinates = sum(p.numel() for _, p in order)
        if self._resident is not None:
            layout.packed = self._resident.words(word)
        else:
            layout.packed = np.zeros(word, dtype=np.uint64)
        self.stats.coordinates = layout.coordinates
        return layout

    def _describe_layout(self) -> str:
        desc = self._describe()
        return (f"{len(desc)} parameters, {sum(math.prod(sh) for _, sh, _ in desc)} "
                f"coordinates, overlap={self.overlap}, layout digest {self._layout.digest:016x}")

    def _hparams_digest(self) -> int:
        values = [(_number(g["lr"]), _number(g["momentum"]), _number(g["weight_decay"]))
                  for g in self.param_groups]
        return digest64(np.array(values, dtype=np.float64).tobytes())

    def _post_header(self, absent: int = header.UNKNOWN) -> None:
        """Post this step's header (see :mod:`mpisign.header`): one allgather of 64 bytes a
        rank, beside the vote. A rank that has just built its layout checks it at once,
        before it sends any sign."""
        if self.world_size == 1 or self._verified or self._header is not None:
            return
        step, g0 = self.param_groups[0]["step"], self.param_groups[0]
        params = digest64(self.params_digest()) if step == 0 else 0
        mine = StepHeader(step, self._layout.digest, self._hparams_digest(), params,
                          _number(g0["lr"]), _number(g0["momentum"]),
                          _number(g0["weight_decay"]), absent)
        self._header = header.post(self._own_comm.get(), mine)
        self._absent_known = absent != header.UNKNOWN
        if self._layout_fresh:
            self._check_header()

    def _check_header(self) -> None:
        """Every rank's header agrees with this one's, or every rank raises the same error."""
        if self.world_size == 1 or self._verified:
            return
        headers = header.finish(self._header, self.timeout)
        self._header = None
        header.verdict(headers, self.rank, self._describe_layout())
        self._verified, self._layout_fresh = True, False
        self._all_present = header.every_gradient_everywhere(headers)

    def _ensure_layout(self) -> _Layout:
        if self._layout is None or self._layout.signature != self._signature():
            params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
            self._resident = _resident_path(params) if params else None
            self._layout = self._build_layout()
            self._layout_fresh = True   # its header is checked before any sign is sent
            # The tally runs where the words are: the GPU path's kernel, or the host reference
            # (which also counts torch words, e.g. the tree's partial counts, on their device).
            tally = host_tally if self._resident is None else self._resident.tally
            if self.world_size > 1 and (self._voter is None or self._voter.tally != tally):
                self._voter = make_vote(self.topology, self._own_comm.get(), timeout=self.timeout,
                                        n_coords=self._layout.coordinates, tally=tally)
            if self.overlap:
                self._install_hooks()
            log.debug("layout: %d parameters, %d coordinates, %d buckets, %d words per step",
                      len(self._layout.slots), self._layout.coordinates,
                      len(self._layout.buckets), self._layout.words)
        return self._layout

    # -- overlap with the backward pass -----------------------------------------------------
    def _install_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for bucket in self._layout.buckets:
            for slot in bucket.slots:
                hook = self._make_hook(bucket, slot.param)
                self._hooks.append(slot.param.register_post_accumulate_grad_hook(hook))

    def _make_hook(self, bucket: _Bucket, param: torch.Tensor):
        def hook(_):
            if bucket.pending is not None:
                raise RuntimeError(
                    f"Signum(overlap=True) on rank {self.rank}: a second backward pass "
                    f"accumulated into parameters whose vote had already started at step "
                    f"{self.param_groups[0]['step']}. With overlap, each bucket's signs are "
                    f"sent as soon as one backward pass completes its gradients, so every "
                    f"backward into the parameters before step() must be the last one. For "
                    f"gradient accumulation, a GAN's second network, or an adversarial "
                    f"(FGSM/PGD) step, use overlap=False; or take the extra gradients with "
                    f"torch.autograd.grad(loss, inputs), which does not accumulate into .grad "
                    f"and starts no vote.")
            bucket.ready.add(id(param))
            if len(bucket.ready) == len(bucket.slots):
                with torch.no_grad():
                    self._start_bucket(bucket)
                self.stats.overlapped += 1
        return hook

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
        layout = self._ensure_layout()
        if all(bucket.pending is None for bucket in layout.buckets):
            # No hook began this step: its header is still to come.
            self._verified, self._header = False, None
        present = [s.param.grad is not None for s in layout.slots]
        self._post_header(absent=present.count(False))
        # Step 1: which parameters have a gradient on any rank: one that has none anywhere is
        # not updated, as in torch.optim. The headers say when every rank has every gradient;
        # when a hook began the step they cannot, and an OR of one bit each goes with the votes.
        anywhere = self._presence(layout, present)
        # Step 2: pack and start every bucket's vote that a gradient hook has not started yet
        # (all of them without overlap; those with a parameter whose .grad is None with it).
        for bucket in layout.buckets:
            if bucket.pending is None:
                self._start_bucket(bucket)
        # Step 3: finish each vote and apply it: p <- p - lr * (v + weight_decay * p), once
        # every rank's header is known to agree (before waiting on a vote: a rank that
        # has just built its layout sends no sign until the headers agree).
        self._check_header()
        has_grad = anywhere()
        for slot_param, buf, beta in self._deferred:   # see _local_update
            if has_grad[id(slot_param)]:
                buf.mul_(beta)
        self._deferred = []
        disagree = 0
        for bucket in layout.buckets:
            plus, tie = self._finish_bucket(bucket)
            mine = layout.packed[bucket.word0: bucket.word1]
            if self._resident is not None:
                disagree = disagree + self._resident.disagreement(mine, plus, tie)  # on device
            else:
                disagree += packing.disagreement(mine, plus, tie)
            for slot in bucket.slots:
                if not has_grad[id(slot.param)]:
                    continue
                group = self.param_groups[slot.group]
                lo, hi = slot.word0 - bucket.word0, slot.word0 - bucket.word0 + slot.words
                self._apply(slot.param, plus[lo:hi], None if tie is None else tie[lo:hi],
                            _number(group["lr"]), _number(group["weight_decay"]))
            bucket.pending, bucket.ready = None, set()
        self.stats.disagreement = int(disagree) / max(1, layout.coordinates)
        step = self.param_groups[0]["step"]
        if self.monitor is not None:
            self._exchange_disagreement(step)
        for group in self.param_groups:
            group["step"] = step + 1
        self._verified, self._header = False, None
        self.stats.steps += 1
        if self.check_every and self.stats.steps % self.check_every == 0:
            self.check_consistency()
        return loss

    def _presence(self, layout: _Layout, present: list):
        """A function giving ``{id(param): has a gradient on some rank}``, to call after the
        header check. One rank: its own. Headers that counted the missing gradients: all
        present when every count is 0 (the usual step: no exchange), else an OR of one bit a
        parameter. A header begun by a hook could not count: the OR starts now, beside the
        votes."""
        ids = [id(s.param) for s in layout.slots]
        if self.world_size == 1:
            return lambda: dict(zip(ids, present))
        if not self._absent_known:
            return self._or_presence(ids, present)

        def after_header():
            if self._all_present:
                return dict.fromkeys(ids, True)
            return self._or_presence(ids, present)()
        return after_header

    def _or_presence(self, ids: list, present: list):
        """Start the OR over ranks of one bit a parameter; returns the function that waits."""
        mine = np.packbits(present, bitorder="little")
        every = np.empty_like(mine)
        req = self._own_comm.get().Iallreduce(mine, every, op=MPI.BOR)

        def wait():
            step = self.param_groups[0]["step"]
            # Wait on MPI: a parameter is updated only if some rank has its gradient.
            bounded(req, f"gradient presence at step {step} on rank {self.rank}", self.timeout)
            return dict(zip(ids, np.unpackbits(every, count=len(ids),
                                               bitorder="little").astype(bool)))
        return wait

    def _exchange_disagreement(self, step: int) -> None:
        mine = np.array([self.stats.disagreement])
        every = np.empty(self.world_size)
        if self.world_size > 1:
            req = self._own_comm.get().Iallgather(mine, every)
            # Wait on MPI: one float from every rank, for the monitor.
            bounded(req, f"disagreement exchange at step {step}", self.timeout)
        else:
            every[:] = mine
        self.stats.disagreement_by_rank = every.tolist()
        self.stats.suspects = self.monitor.record(every, step, verbose=self.rank == 0)

    def _start_bucket(self, bucket: _Bucket) -> None:
        """Momentum update and packing of one bucket's parameters, then start its vote."""
        self._post_header()   # the step header, once a step, beside the first vote
        step = self.param_groups[0]["step"]
        zero_bit = (self.rank + step) % 2
        packed = self._layout.packed
        by_group: dict[int, list[_Slot]] = {}
        for slot in bucket.slots:
            by_group.setdefault(slot.group, []).append(slot)
        for gi, slots in by_group.items():
            beta = _number(self.param_groups[gi]["momentum"])
            sources = self._local_update([s.param for s in slots], beta)
            for slot, src in zip(slots, sources):
                self._pack(src, zero_bit, packed[slot.word0: slot.word0 + slot.words])
        words = packed[bucket.word0: bucket.word1]
        if self._voter is not None:
            bucket.pending = self._voter.start(words, words.shape[0] * packing.WORD_BITS,
                                               step=step, bucket=bucket.index)
        else:
            bucket.pending = "local"

    def _finish_bucket(self, bucket: _Bucket):
        if self._voter is None:  # one rank: the vote is its own signs
            return self._layout.packed[bucket.word0: bucket.word1], None
        plus, tie = self._voter.finish(bucket.pending)
        # The collective is this optimizer's own: its totals are the optimizer's.
        self.stats.bytes_sent = self._voter.traffic.sent
        self.stats.bytes_received = self._voter.traffic.received
        return plus, tie

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
        # One fused pass finds any non-finite entry (a max-norm is NaN/inf exactly then).
        # A sum is NaN/inf whenever an entry is (and, rarely, when finite values overflow: the
        # exact count below then finds nothing); summing is ~10x cheaper than a max-norm here.
        sums = [g.sum() for g in grads]
        suspect = [i for i, t in enumerate(sums) if not math.isfinite(float(t))]
        bad = [i for i in suspect if not bool(torch.isfinite(grads[i]).all())]
        if bad:
            grads = list(grads)
            count = 0
            for i in bad:
                g = grads[i] = grads[i].clone()
                count += int(g.numel() - torch.isfinite(g).sum())
                torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
            self.stats.nonfinite += count
            self.stats.nonfinite_steps += 1
            log.warning("rank %d: %d non-finite gradient entries at step %d, treated as 0",
                        self.rank, count, self.param_groups[0]["step"])
        if not beta:
            return grads   # the sign of a scaled gradient is the sign of the gradient
        # Under torch.amp.GradScaler, gradients arrive scaled (see _step_supports_amp_scaling):
        # the momentum takes them unscaled, as it would after scaler.unscale_(opt).
        scale = getattr(self, "grad_scale", None)
        inv_scale = 1.0 if scale is None else 1.0 / float(scale)
        bufs = []
        for p in params:
            st = self.state[p]
            if "momentum_buffer" not in st:
                st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            bufs.append(st["momentum_buffer"])
        here = [i for i, a in enumerate(absent) if not a]
        if here:
            torch._foreach_mul_([bufs[i] for i in here], beta)
            torch._foreach_add_([bufs[i] for i in here], [grads[i] for i in here],
                                alpha=(1 - beta) * inv_scale)
        # No gradient here: vote with beta * m, but decay m only once step() knows that some
        # rank has this gradient (if none has, the parameter and its momentum stay as they are).
        sources = list(bufs)
        for i in (i for i, a in enumerate(absent) if a):
            sources[i] = bufs[i] * beta
            self._deferred.append((params[i], bufs[i], beta))
        return sources

    def _pack(self, src: torch.Tensor, zero_bit: int, out) -> None:
        if self._resident is not None:  # `out` is device words
            self._resident.pack(src.contiguous(), zero_bit, out)
            return
        if src.is_cuda:
            gpu = _gpu_path(src)
            if gpu is not None:
                gpu.pack(src.contiguous(), zero_bit, out)
                return
            src = src.cpu()  # the reference path
        if self._pack_scratch is None or self._pack_scratch.numel() < src.numel():
            self._pack_scratch = torch.empty(src.numel(), dtype=torch.bool)
        packing.pack_signs(src, zero_bit, out=out, scratch=self._pack_scratch)

    def _apply(self, p: torch.Tensor, plus, tie, lr: float, wd: float) -> None:
        if self._resident is not None:  # `plus`, `tie` are device words
            self._resident.apply(p, plus, tie, lr, wd)
            return
        if p.is_cuda and p.is_contiguous():
            gpu = _gpu_path(p)
            if gpu is not None:
                gpu.apply(p, plus, tie, lr, wd)
                return
        if p.device.type == "cpu" and p.is_contiguous():
            packing.apply_signs(p, plus, tie, lr, wd, scratch=self._apply_scratch)
            return
        # The reference path for other devices and layouts: unpack, then one fused update.
        v = packing.unpack_signs(plus, p.numel(), tie, dtype=p.dtype).to(p.device).view_as(p)
        if wd:
            v.add_(p, alpha=wd)
        p.add_(v, alpha=-lr)

    # -- consistency ------------------------------------------------------------------------
    def params_digest(self) -> bytes:
        """A 16-byte hash of every optimized parameter's bytes on this rank."""
        h = hashlib.blake2b(digest_size=16)
        for group in self.param_groups:
            for p in group["params"]:
                flat = p.detach().cpu().contiguous().reshape(-1)
                h.update(flat.view(torch.uint8).numpy().tobytes())
        return h.digest()

    def _ranks_differing(self, digest: bytes, what: str) -> list[int]:
        """Allgather every rank's ``digest``; the ranks whose digest differs from rank 0's."""
        mine = np.array(list(digest), dtype=np.uint8)
        every = np.empty((self.world_size, mine.size), dtype=np.uint8)
        req = self._own_comm.get().Iallgather(mine, every)
        # Wait on MPI: the verdict needs every rank's digest (bounded: a missing rank raises).
        bounded(req, f"{what} on rank {self.rank}", self.timeout)
        return [r for r in range(self.world_size) if not np.array_equal(every[r], every[0])]

    def check_consistency(self) -> None:
        """Raise :class:`ParameterDivergence` on every rank unless all hold identical parameters."""
        if self.world_size == 1:
            return
        differ = self._ranks_differing(self.params_digest(), "consistency check")
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
