r"""Signum and signSGD with majority vote over MPI.

Bernstein, Zhao, Azizzadenesheli, Anandkumar, "signSGD with majority vote is communication
efficient and fault tolerant", ICLR 2019, Algorithm 1, in the authors' own form:

.. math::
    m_i &\leftarrow \beta m_i + (1 - \beta) g_i           && \text{on each worker } i \\
    v   &\leftarrow \operatorname{sign}\Big(\sum_i \operatorname{sign}(m_i)\Big)
                                                           && \text{majority vote, 0 on a tie} \\
    p   &\leftarrow p - \eta\,(v + \lambda p)

Books kept here: one fused buffer per (param group, dtype) segment, laid out once and checked
across ranks at the first step; the packed signs of all segments form one message per step.

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

import hashlib
import logging
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from mpi4py import MPI
from torch.optim import Optimizer

from . import packing
from .collectives import check_comm, check_topology, default_timeout, make_vote, wait_all

__all__ = ["Signum", "SignSGD", "LayoutMismatch", "ParameterDivergence", "VoteStats"]

log = logging.getLogger(__name__)


class LayoutMismatch(ValueError):
    """Ranks disagree about the parameters (shapes, dtypes, groups) they vote on."""


class ParameterDivergence(RuntimeError):
    """Ranks hold different parameters after a step, which majority vote never produces."""


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

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Segment:
    """Parameters of one group and dtype, fused into flat buffers."""

    group: int
    params: list
    offsets: list
    numel: int
    word_start: int                 # first uint64 word of this segment in the packed message
    words: int
    grad: torch.Tensor              # fused gradient, reused every step
    momentum: torch.Tensor | None   # fused momentum (None when momentum == 0)


@dataclass
class _Layout:
    signature: tuple
    segments: list = field(default_factory=list)
    words: int = 0
    packed: np.ndarray | None = None


def _check_hparams(lr, momentum, weight_decay) -> None:
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    if not isinstance(weight_decay, (int, float)) or not math.isfinite(weight_decay) \
            or weight_decay < 0:
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")


class Signum(Optimizer):
    """Signum (momentum sign descent) with a majority vote of the signs over ``comm``.

    Args:
        params: parameters or param groups, as for any ``torch.optim.Optimizer``.
        lr: step size (every coordinate moves by exactly ``lr`` or 0, plus weight decay).
        momentum: beta of the local momentum, in [0, 1); 0 gives signSGD.
        weight_decay: lambda, applied as ``p -= lr * (v + lambda * p)``, outside the vote.
        comm: mpi4py intracommunicator; None means ``MPI.COMM_WORLD``. On a communicator of
            size 1 this is plain single-worker Signum with no MPI traffic.
        topology: how the vote travels: ``"server"`` (the paper's) or ``"tree"``.
        timeout: seconds a vote waits on its peers before raising ``VoteTimeout``
            (default ``$MPISIGN_TIMEOUT`` or 300).
        check_every: every this many steps, check that all ranks hold identical parameters
            (:meth:`check_consistency`); 0 turns it off.
    """

    def __init__(self, params, lr: float = 1e-4, momentum: float = 0.9,
                 weight_decay: float = 0.0, comm=None, topology: str = "server", *,
                 timeout: float | None = None, check_every: int = 0):
        # Validate everything before any communication, so every rank raises the same error.
        _check_hparams(lr, momentum, weight_decay)
        check_topology(topology)
        comm = MPI.COMM_WORLD if comm is None else check_comm(comm)
        if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
        if not isinstance(check_every, int) or check_every < 0:
            raise ValueError(f"check_every must be an int >= 0, got {check_every!r}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        # What users tune.
        self.comm = comm
        self.topology = topology
        self.timeout = default_timeout() if timeout is None else float(timeout)
        self.check_every = check_every
        # Internal: the fused layout and the collective, built at the first step.
        self.rank = comm.Get_rank()
        self.world_size = comm.Get_size()
        self._layout: _Layout | None = None
        self._voter = None
        self._scratch: torch.Tensor | None = None
        # Statistics.
        self.stats = VoteStats()

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

    def _build_layout(self) -> _Layout:
        layout = _Layout(signature=self._signature())
        word = 0
        for gi, group in enumerate(self.param_groups):
            by_dtype: dict[torch.dtype, list] = {}
            for p in group["params"]:
                if p.requires_grad:
                    if not p.is_floating_point():
                        raise ValueError(f"parameters must be floating point, got {p.dtype}")
                    by_dtype.setdefault(p.dtype, []).append(p)
            for dtype, params in by_dtype.items():
                offsets, n = [], 0
                for p in params:
                    offsets.append(n)
                    n += p.numel()
                device = params[0].device
                grad = torch.zeros(n, dtype=dtype, device=device)
                mom = torch.zeros(n, dtype=dtype, device=device) if group["momentum"] else None
                w = packing.n_words(n)
                layout.segments.append(_Segment(gi, params, offsets, n, word, w, grad, mom))
                word += w
        layout.words = word
        layout.packed = np.zeros(word, dtype=np.uint64)
        if not layout.segments:
            raise ValueError("no parameter with requires_grad=True to optimize")
        self.stats.coordinates = sum(s.numel for s in layout.segments)
        return layout

    def _check_layout_agrees(self) -> None:
        """Allgather a fingerprint of the layout; on any difference every rank raises."""
        desc = self._describe()
        digest = hashlib.sha256(repr(desc).encode()).digest()[:16]
        mine = np.frombuffer(digest, dtype=np.uint8).copy()
        every = np.empty((self.world_size, mine.size), dtype=np.uint8)
        req = self.comm.Iallgather(mine, every)
        # Wait on MPI: the first step's vote must not start before the layouts are known equal.
        wait_all([req], ["some rank"], self.timeout, f"layout check on rank {self.rank}")
        differ = [r for r in range(self.world_size) if not np.array_equal(every[r], every[0])]
        if differ:
            raise LayoutMismatch(
                f"ranks disagree about the parameters to optimize: rank(s) {differ} differ from "
                f"rank 0 (this rank {self.rank}: {len(desc)} parameters, "
                f"{sum(math.prod(s) for _, s, _ in desc)} coordinates, layout digest "
                f"{digest.hex()}). Build the same model, with the same parameter groups, "
                f"on every rank.")

    def _ensure_layout(self) -> _Layout:
        if self._layout is None or self._layout.signature != self._signature():
            if self.world_size > 1:
                self._check_layout_agrees()
            self._layout = self._build_layout()
            if self.world_size > 1 and self._voter is None:
                self._voter = make_vote(self.topology, self.comm, timeout=self.timeout)
            log.debug("layout: %d segments, %d coordinates, %d words per vote",
                      len(self._layout.segments), self.stats.coordinates, self._layout.words)
        for seg in self._layout.segments:
            self._bind_momentum(seg)
        return self._layout

    def _bind_momentum(self, seg: _Segment) -> None:
        """Keep ``state[p]["momentum_buffer"]`` a view of the fused buffer (also after a load)."""
        if seg.momentum is None:
            return
        for p, off in zip(seg.params, seg.offsets):
            view = seg.momentum[off: off + p.numel()].view_as(p)
            st = self.state[p]
            buf = st.get("momentum_buffer")
            if buf is None or buf.data_ptr() != view.data_ptr():
                if buf is not None:  # loaded from a state_dict: adopt its values
                    view.copy_(buf)
                st["momentum_buffer"] = view

    # -- the step ---------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """One voted step. Every rank of ``comm`` must call it the same number of times."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        layout = self._ensure_layout()
        step = self.param_groups[0]["step"]
        zero_bit = (self.rank + step) % 2
        packed = layout.packed
        # Step 1: fuse each segment's gradients, clean non-finite entries, update the momentum,
        # and pack its signs into the one message.
        saw_nonfinite = False
        for seg in layout.segments:
            group = self.param_groups[seg.group]
            src = self._fuse_gradient(seg)
            bad = self._clean_nonfinite(src)
            saw_nonfinite |= bad > 0
            if seg.momentum is not None:
                beta = group["momentum"]
                src = seg.momentum.mul_(beta).add_(src, alpha=1 - beta)
            self._pack(src, zero_bit, packed[seg.word_start: seg.word_start + seg.words])
        self.stats.nonfinite_steps += int(saw_nonfinite)
        # Step 2: the majority vote (plain sign descent on a single rank).
        if self._voter is None:
            plus, tie = packed, None
        else:
            before = (self._voter.traffic.sent, self._voter.traffic.received)
            plus, tie = self._voter.vote(packed, layout.words * packing.WORD_BITS, step=step)
            self.stats.bytes_sent += self._voter.traffic.sent - before[0]
            self.stats.bytes_received += self._voter.traffic.received - before[1]
        self.stats.disagreement = (packing.disagreement(packed, plus, tie)
                                   / max(1, self.stats.coordinates))
        # Step 3: p <- p - lr * (v + weight_decay * p), segment by segment.
        for seg in layout.segments:
            group = self.param_groups[seg.group]
            sl = slice(seg.word_start, seg.word_start + seg.words)
            v = packing.unpack_signs(plus[sl], seg.numel, None if tie is None else tie[sl],
                                     dtype=seg.grad.dtype).to(seg.grad.device)
            views = [v[off: off + p.numel()].view_as(p) for p, off in zip(seg.params, seg.offsets)]
            if group["weight_decay"]:
                torch._foreach_add_(views, seg.params, alpha=group["weight_decay"])
            torch._foreach_add_(seg.params, views, alpha=-group["lr"])
        for group in self.param_groups:
            group["step"] = step + 1
        self.stats.steps += 1
        if self.check_every and self.stats.steps % self.check_every == 0:
            self.check_consistency()
        return loss

    def _fuse_gradient(self, seg: _Segment) -> torch.Tensor:
        g = seg.grad
        for p, off in zip(seg.params, seg.offsets):
            dst = g[off: off + p.numel()]
            if p.grad is None:
                dst.zero_()  # documented: None counts as a zero gradient (see module docstring)
            elif p.grad.is_sparse:
                raise ValueError("Signum does not take sparse gradients; use dense embeddings")
            else:
                dst.copy_(p.grad.reshape(-1))
        return g

    def _clean_nonfinite(self, g: torch.Tensor) -> int:
        finite = torch.isfinite(g)
        if bool(finite.all()):
            return 0
        bad = int(finite.numel() - finite.sum())
        torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
        self.stats.nonfinite += bad
        log.warning("rank %d: %d non-finite gradient entries at step %d, treated as 0",
                    self.rank, bad, self.param_groups[0]["step"])
        return bad

    def _pack(self, src: torch.Tensor, zero_bit: int, out: np.ndarray) -> None:
        if src.device.type != "cpu":
            src = src.cpu()  # the reference path; mpisign.cuda packs on the device
        if self._scratch is None or self._scratch.numel() < src.numel():
            self._scratch = torch.empty(src.numel(), dtype=torch.bool)
        packing.pack_signs(src, zero_bit, out=out, scratch=self._scratch)

    # -- consistency ------------------------------------------------------------------------
    def params_digest(self) -> bytes:
        """A 16-byte hash of every optimized parameter's bytes on this rank."""
        h = hashlib.blake2b(digest_size=16)
        for group in self.param_groups:
            for p in group["params"]:
                h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.digest()

    def check_consistency(self) -> None:
        """Raise :class:`ParameterDivergence` on every rank unless all hold identical parameters."""
        if self.world_size == 1:
            return
        mine = np.frombuffer(self.params_digest(), dtype=np.uint8).copy()
        every = np.empty((self.world_size, mine.size), dtype=np.uint8)
        req = self.comm.Iallgather(mine, every)
        # Wait on MPI: the verdict needs every rank's digest.
        wait_all([req], ["some rank"], self.timeout, f"consistency check on rank {self.rank}")
        differ = [r for r in range(self.world_size) if not np.array_equal(every[r], every[0])]
        if differ:
            raise ParameterDivergence(
                f"after step {self.stats.steps} rank(s) {differ} hold parameters that differ "
                f"from rank 0's; something other than the optimizer changed them")


class SignSGD(Signum):
    """signSGD with majority vote: :class:`Signum` with ``momentum=0``."""

    def __init__(self, params, lr: float = 1e-4, weight_decay: float = 0.0, comm=None,
                 topology: str = "server", *, timeout: float | None = None,
                 check_every: int = 0):
        super().__init__(params, lr=lr, momentum=0.0, weight_decay=weight_decay, comm=comm,
                         topology=topology, timeout=timeout, check_every=check_every)
