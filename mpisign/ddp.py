"""Signum or Lion with majority vote for any ``DistributedDataParallel`` script: a communication
hook.

Two lines change in an existing DDP script::

    ddp_model.register_comm_hook(mpisign.ddp.SignumState(momentum=0.9), mpisign.ddp.signum_hook)
    opt = torch.optim.SGD(ddp_model.parameters(), lr=1e-4, momentum=0, weight_decay=wd)

or, for Lion (Distributed Lion's majority vote; decoupled weight decay is SGD's here)::

    ddp_model.register_comm_hook(mpisign.ddp.LionState(betas=(0.9, 0.99)), mpisign.ddp.lion_hook)

DDP hands the hook each bucket of this rank's gradients. The hook runs the rule's local step on
this rank (Signum: ``m = beta * m + (1 - beta) * g``, the sign of ``m`` sent; Lion: the sign of
``b1 * m + (1 - b1) * g`` sent, then ``m = b2 * m + (1 - b2) * g``), packs the signs (1 bit a
coordinate), votes them with every rank, and returns the vote (-1, 0 at a tie, +1) as the
bucket's gradient; the user's SGD then steps ``p -= lr * (v + wd * p)``. That is
:class:`mpisign.Signum`'s (:class:`mpisign.Lion`'s) step: the same rule
(:mod:`mpisign.optim.rules`), the same kernels pack the same momentum, the same tally counts
the same words, and on an odd number of ranks the same ANDs find the coordinates that are
exactly 0 on every rank (a tie), so with ``weight_decay=0`` the parameters are the optimizer's,
bit for bit (with weight decay torch's SGD may round ``v + wd * p`` its own way: not bit for
bit).

Two transports, one vote:

- ``comm=None``: over the process group DDP itself uses (``process_group=``, else the default
  group), through :mod:`mpisign.collectives.torchdist`: a ``torchrun`` job with gloo or NCCL
  and no MPI at all. Topologies ``"server"``, ``"allgather"``, ``"sharded"``, ``"tree"``. A
  state made before the group exists (Lightning's ``DDPStrategy(ddp_comm_state=...)``) takes
  the group at its first bucket.
- ``comm=MPI.COMM_WORLD``: over MPI, with every topology of :data:`mpisign.TOPOLOGIES` (a
  duplicate of ``comm``, made when the state is made: collective).

The rule's state belongs to the parameters, not to DDP's buckets, so it survives DDP's rebuild
of its buckets after the first iteration. Gradient accumulation with ``no_sync()`` votes once,
at the iteration that syncs, on the accumulated gradient, as the optimizer would.
``state_dict()``/``load_state_dict()`` hold this rank's state of each parameter (each rank's
own: save one file a rank, or gather them) and the step, which the zero rule reads
(``(rank + step) % 2``).

Under ``torch.amp.GradScaler``, give the state the scaler (``grad_scaler=scaler``): the hook
runs in backward, on scaled gradients, and unscales them into the momentum as the optimizer's
``grad_scaler=`` does (bit for bit), and returns the vote times the scale, which
``scaler.step(opt)`` unscales back to -1, 0, +1 exactly (a power-of-two scale, the default).
"""

# No "from __future__ import annotations": DDP checks the hooks' annotations as types.
import logging
from collections import defaultdict

import numpy as np
import torch
import torch.distributed as dist

from .backends import packing
from .backends.signs import signs_for
from .collectives import TOPOLOGIES, make_vote
from .collectives.torchdist import check_group_topology, make_group_vote
from .collectives.base import default_timeout
from .mpi import exchanges
from .optim.engine import scrubbed
from .optim.header import digest64
from .optim.lion import LionRule
from .optim.rules import Rule, SignumRule

__all__ = ["VoteState", "SignumState", "LionState", "vote_hook", "signum_hook", "lion_hook"]

log = logging.getLogger("mpisign")


class VoteState:
    """The hook's state: a rule (:class:`mpisign.optim.rules.Rule`) and its hyperparameters,
    this rank's state of each parameter (the rule's, as the optimizer keeps it in
    ``state[p]``), the step, the transport. Made through :class:`SignumState` or
    :class:`LionState`.

    Args:
        rule: the local step, as the optimizer's.
        hyper: the rule's hyperparameters the local step reads (``lr`` and ``weight_decay``
            belong to the user's SGD and are not the hook's).
        comm: an mpi4py communicator to vote over, or None for the DDP model's process group
            (``process_group``, else torch.distributed's default group).
        topology: ``"server"`` (default), ``"allgather"``, ``"sharded"`` or ``"tree"`` over a
            process group; any of :data:`mpisign.TOPOLOGIES` over MPI.
        process_group: the group DDP was given, when ``comm`` is None and it is not the default.
        timeout: seconds an MPI vote waits on its peers (a process group's own timeout bounds
            its calls).
        grad_scaler: the ``torch.amp.GradScaler`` that scales the loss (see the module
            docstring), or None.
    """

    def __init__(self, rule: Rule, hyper: dict, comm=None, topology: str = "server",
                 process_group=None, timeout: float | None = None, grad_scaler=None):
        self.rule = rule
        self.group = {"lr": 1.0, "weight_decay": 0.0, **hyper}   # the rule reads a param group
        rule.check(self.group, f"{type(self).__name__}: ")
        if grad_scaler is not None and not callable(getattr(grad_scaler, "get_scale", None)):
            raise ValueError(f"{type(self).__name__}: grad_scaler must be a "
                             f"torch.amp.GradScaler, got {grad_scaler!r}")
        self.scaler = grad_scaler
        self.rank = self.size = None
        if comm is None:   # one vote over the group serves every bucket
            check_group_topology(topology, type(self).__name__)
            self._group = (process_group, topology)
            if dist.is_initialized():   # else at the first bucket (see _bind_group)
                self._bind_group()
        else:
            if topology not in TOPOLOGIES and topology != "auto":
                raise ValueError(f"topology must be one of {sorted(TOPOLOGIES)} or 'auto', "
                                 f"got {topology!r}")
            self.rank, self.size = comm.Get_rank(), comm.Get_size()
            own = comm.Dup()   # the hook's messages never meet the user's on comm
            self._make = lambda n, tally: make_vote(topology, own, timeout=timeout,
                                                    n_coords=n, tally=tally)
            self._differing = lambda digest: exchanges.ranks_differing(
                own, digest, default_timeout() if timeout is None else timeout,
                f"mpisign.ddp: the buckets' layout on rank {self.rank}")
            self._all_zero = lambda zeros: exchanges.all_zero(
                own, zeros, default_timeout() if timeout is None else timeout,
                f"mpisign.ddp: exact zeros at step {self.step} on rank {self.rank}")
            self._check_size()
        self.step = 0
        self.nonfinite = 0         # NaN/inf gradient entries this rank voted as 0
        self.state: dict = defaultdict(dict)   # parameter -> the rule's state of it, as torch's
        self._order: list = []     # the parameters, by first sight
        self._seen: set = set()    # their ids
        self._loaded: list = []    # states from load_state_dict, taken in the same order
        self._buckets: dict = {}   # bucket index -> _Bucket, remade when its parameters change
        self._scale = None         # this step's 1 / scale, asked once a step

    def _bind_group(self) -> None:
        """The vote over the process group: when the state is made, or, for a state made
        before the group exists (Lightning's ``DDPStrategy(ddp_comm_state=...)``), at its first
        bucket. Local: every rank binds its own."""
        process_group, topology = self._group
        voter = make_group_vote(process_group, topology)
        self.rank, self.size = voter.rank, voter.size
        self._make = lambda n, tally: voter
        self._differing = voter.ranks_differing
        self._all_zero = voter.all_zero
        self._check_size()

    def _check_size(self) -> None:
        if self.size == 1:
            raise ValueError(f"{type(self).__name__}: the process group has one rank: there is "
                             f"no vote; use mpisign's optimizer on one process")

    # -- what a bucket needs -----------------------------------------------------------------
    def see(self, p: torch.Tensor) -> None:
        """Parameter ``p``'s first sight: its state is loaded (from :meth:`load_state_dict`)
        or left for the rule to make. DDP's buckets hand the parameters in the same order on
        every run of a model."""
        if id(p) in self._seen:
            return
        i = len(self._order)
        self._order.append(p)
        self._seen.add(id(p))
        loaded = self._loaded[i] if i < len(self._loaded) else None
        if loaded:
            for name, t in loaded.items():
                if t.shape != p.shape:
                    raise ValueError(f"{type(self).__name__}.load_state_dict: {name} of "
                                     f"parameter {i} has shape {tuple(t.shape)}, the "
                                     f"parameter {tuple(p.shape)}")
            self.state[p] = {name: t.to(p.device, p.dtype).contiguous()
                             for name, t in loaded.items()}

    def bucket(self, index: int, params: list, buffer: torch.Tensor) -> "_Bucket":
        key = tuple(id(p) for p in params)
        kept = self._buckets.get(index)
        if kept is None or kept.key != key:
            if self.size is None:   # a state made before the group: it takes it now
                self._bind_group()
            self._check_layout(index, params)
            for p in params:
                self.see(p)
            kept = self._buckets[index] = _Bucket(self, key, params, buffer)
        return kept

    def inv_scale(self) -> float:
        """1 / the GradScaler's scale this step (1 without one): the gradients DDP hands the
        hook were scaled by it. Asked once a step: ``get_scale()`` waits for the device."""
        if self._scale is None:
            scaler = self.scaler
            self._scale = (1.0 / scaler.get_scale()
                           if scaler is not None and scaler.is_enabled() else 1.0)
        return self._scale

    def stepped(self) -> None:
        """The step's last bucket is voted."""
        self.step += 1
        self._scale = None

    def _check_layout(self, index: int, params: list) -> None:
        """A new bucket (the first iteration, DDP's rebuild): every rank's has the same
        parameters' shapes and dtypes at the same step, or every rank raises, naming the ranks
        that differ. Their votes would not line up: a message of another size, or signs of other
        coordinates counted together. One all-gather of 8 bytes, once per bucket layout."""
        layout = repr((index, self.step, [(tuple(p.shape), str(p.dtype)) for p in params]))
        differing = self._differing(digest64(layout.encode()).to_bytes(8, "little"))
        if differing:
            raise ValueError(
                f"mpisign.ddp: rank(s) {differing} have another layout of DDP's bucket {index} "
                f"than rank 0 at step {self.step} (this rank's: {layout}): every rank must wrap "
                f"the same model with the same DDP options (bucket_cap_mb, "
                f"find_unused_parameters) and load the hook's state of the same step")

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's state of each parameter (in the order DDP first handed the parameters),
        the hyperparameters and the step."""
        hyper = {k: v for k, v in self.group.items() if k not in ("lr", "weight_decay")}
        return {"step": self.step, "rule": type(self.rule).__name__, **hyper,
                "state": [{name: t.detach().clone() for name, t in self.state.get(p, {}).items()}
                          for p in self._order]}

    def load_state_dict(self, saved: dict) -> None:
        if "state" not in saved and "momentum_buffers" in saved:   # before LionState
            saved = {**saved, "rule": "SignumRule",
                     "state": [{"momentum_buffer": t} for t in saved["momentum_buffers"]]}
        rule = saved.get("rule", type(self.rule).__name__)
        if rule != type(self.rule).__name__:
            raise ValueError(f"{type(self).__name__}.load_state_dict: the state is {rule}'s, "
                             f"this hook's rule is {type(self.rule).__name__}")
        hyper = {k: saved[k] for k in self.group if k in saved}
        self.rule.check({**self.group, **hyper}, f"{type(self).__name__}.load_state_dict: ")
        self.group.update(hyper)
        self.step = int(saved["step"])
        self._loaded = list(saved["state"])
        self.state, self._order, self._seen, self._buckets = defaultdict(dict), [], set(), {}

    def __getstate__(self):
        raise TypeError(f"{type(self).__name__} holds a communicator; save state_dict() "
                        f"instead")


class SignumState(VoteState):
    """:class:`VoteState` of Signum (:class:`mpisign.optim.rules.SignumRule`).

    Args:
        momentum: beta in [0, 1); 0 sends the sign of the gradient itself (signSGD).
        the others: :class:`VoteState`'s.
    """

    def __init__(self, momentum: float = 0.9, comm=None, topology: str = "server",
                 process_group=None, timeout: float | None = None, grad_scaler=None):
        super().__init__(SignumRule(), {"momentum": momentum}, comm, topology, process_group,
                         timeout, grad_scaler)

    @property
    def momentum(self) -> float:
        return float(self.group["momentum"])


class LionState(VoteState):
    """:class:`VoteState` of Lion (:class:`mpisign.optim.lion.LionRule`).

    Args:
        betas: ``(beta1, beta2)``, each in [0, 1), as :class:`mpisign.Lion`'s.
        the others: :class:`VoteState`'s.
    """

    def __init__(self, betas: tuple = (0.9, 0.99), comm=None, topology: str = "server",
                 process_group=None, timeout: float | None = None, grad_scaler=None):
        super().__init__(LionRule(), {"betas": betas}, comm, topology, process_group,
                         timeout, grad_scaler)


class _Bucket:
    """One DDP bucket's parameters as the vote sees them: each parameter's words, word-aligned
    as in :mod:`mpisign.optim.layout`, its offset in DDP's flat buffer, the backend, the rule's
    fused kernel for it, the vote."""

    def __init__(self, state: VoteState, key: tuple, params: list, buffer: torch.Tensor):
        self.key = key
        self.params = params
        self.numels = [p.numel() for p in params]
        self.offsets = np.cumsum([0] + self.numels).tolist()
        counts = [packing.n_words(n) for n in self.numels]
        self.word0 = np.cumsum([0] + counts).tolist()
        self.backend = signs_for(self.views(buffer))
        self.words = np.zeros(self.word0[-1], dtype=np.uint64)
        if self.backend.resident:
            raise ValueError("mpisign.ddp packs into host words: device-resident words are "
                             "not supported by the hook yet")
        self.outs = [self.words[a:b] for a, b in zip(self.word0, self.word0[1:])]
        # An odd number of ranks: the zero mask, to find what is 0 on every rank (a tie, as
        # the optimizer makes it; an even number ties by the zero bits alone).
        self.zeros = np.zeros_like(self.words) if state.size % 2 else None
        self.zouts = (None if self.zeros is None
                      else [self.zeros[a:b] for a, b in zip(self.word0, self.word0[1:])])
        # A fused kernel that cannot write the zero mask this bucket needs is not used.
        fused = state.rule.fused(self.backend)
        self.fused = fused if self.zeros is None or self.backend.fused_zeros else None
        self.voter = state._make(self.words.shape[0] * packing.WORD_BITS, self.backend.tally)

    def views(self, buffer: torch.Tensor) -> list:
        """Each parameter's gradient in DDP's flat buffer, which holds them one after another
        in the bucket's order."""
        return [buffer[a: a + n].view_as(p)
                for a, n, p in zip(self.offsets, self.numels, self.params)]


def _pack(state: VoteState, b: _Bucket, grads: list) -> None:
    """The rule's local step on this rank, through the backend's fused kernel where it takes
    the tensors, packed into the bucket's words (the optimizer's own path:
    :class:`mpisign.optim.engine.VoteEngine` packs a bucket the same way)."""
    zero_bit = (state.rank + state.step) % 2
    scale = state.inv_scale()
    bad = (None if b.fused is None else
           b.fused(b.params, grads, state.state, state.group, scale, zero_bit, b.outs, b.zouts))
    if bad is None:   # no fused kernel for these tensors: the rule, then the pack
        grads, bad = scrubbed(grads)
        sources, _ = state.rule.send(b.params, grads, state.state, state.group, scale)
        for i, (src, out) in enumerate(zip(sources, b.outs)):
            b.backend.pack(src, zero_bit, out)
            if b.zouts is not None:
                b.backend.zeros(src, b.zouts[i])
        b.backend.settle()
    if bad:
        state.nonfinite += bad
        log.warning("rank %d: %d non-finite gradient entries in the DDP hook's step %d, voted "
                    "as 0 (state.nonfinite counts them)%s", state.rank, bad, state.step,
                    "; the GradScaler does not see them through the hook" if state.scaler
                    else "")


def vote_hook(state: VoteState,
              bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: this rank's local step of ``state``'s rule, packed, voted with
    every rank, and the vote (-1, 0, +1; times the GradScaler's scale under one) returned as
    the bucket's gradient (see the module docstring)."""
    buffer = bucket.buffer()
    b = state.bucket(bucket.index(), bucket.parameters(), buffer)
    _pack(state, b, b.views(buffer))
    plus, tie = b.voter.vote(b.words, b.words.shape[0] * packing.WORD_BITS, step=state.step,
                             bucket=bucket.index())
    # Over MPI: DDP's next collective (gloo, NCCL) does not move MPI on, and a root's results
    # left in flight would never arrive.
    b.voter.complete_sends()
    ties = None if b.zeros is None else state._all_zero(b.zeros)
    if ties is not None:   # what is exactly 0 on every rank: a tie (tie is None: odd ranks)
        tie = ties
    for (a, n), (w0, w1) in zip(zip(b.offsets, b.numels), zip(b.word0, b.word0[1:])):
        b.backend.unpack(plus[w0:w1], None if tie is None else tie[w0:w1], n,
                         buffer, out=buffer[a:a + n])
    if state.inv_scale() != 1.0:   # scaler.step(opt) divides by the scale: exact for 2**k
        buffer.mul_(1.0 / state.inv_scale())
    if bucket.is_last():
        state.stepped()
    future: torch.futures.Future = torch.futures.Future()
    future.set_result(buffer)
    return future


#: The hook under the name of the state it is registered with (the state holds the rule).
signum_hook = vote_hook
lion_hook = vote_hook
