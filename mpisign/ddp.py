"""Signum with majority vote for any ``DistributedDataParallel`` script: a communication hook.

Two lines change in an existing DDP script::

    ddp_model.register_comm_hook(mpisign.ddp.SignumState(momentum=0.9), mpisign.ddp.signum_hook)
    opt = torch.optim.SGD(ddp_model.parameters(), lr=1e-4, momentum=0, weight_decay=wd)

DDP hands the hook each bucket of this rank's gradients. The hook keeps this rank's momentum
``m = beta * m + (1 - beta) * g`` for each parameter, packs the signs of ``m`` (1 bit a
coordinate), votes them with every rank, and returns the vote (-1, 0 at a tie, +1) as the
bucket's gradient; the user's SGD then steps ``p -= lr * (v + wd * p)``. That is
:class:`mpisign.Signum`'s step: the same kernels pack the same momentum, the same tally counts
the same words, and on an odd number of ranks the same ANDs find the coordinates that are
exactly 0 on every rank (a tie), so with ``weight_decay=0`` the parameters are
:class:`mpisign.Signum`'s, bit for bit (with weight decay torch's SGD may round ``v + wd * p``
its own way: not bit for bit).

Two transports, one vote:

- ``SignumState(comm=None)``: over the process group DDP itself uses (``process_group=``, else
  the default group), through :class:`mpisign.collectives.torchdist.ProcessGroupVote`: a
  ``torchrun`` job with gloo or NCCL and no MPI at all. Topologies ``"server"``, ``"allgather"``.
- ``SignumState(comm=MPI.COMM_WORLD)``: over MPI, with every topology of
  :data:`mpisign.TOPOLOGIES` (a duplicate of ``comm``, made when the state is made: collective).

The momentum belongs to the parameters, not to DDP's buckets, so it survives DDP's rebuild of
its buckets after the first iteration. Gradient accumulation with ``no_sync()`` votes once, at
the iteration that syncs, on the accumulated gradient, as :class:`mpisign.Signum` would.
``state_dict()``/``load_state_dict()`` hold this rank's momentum (each rank's own: save one file
a rank, or gather them) and the step, which the zero rule reads (``(rank + step) % 2``).
"""

# No "from __future__ import annotations": DDP checks signum_hook's annotations as types.
import numpy as np
import torch
import torch.distributed as dist

from .backends import packing
from .backends.signs import signs_for
from .collectives import TOPOLOGIES, make_vote
from .collectives.torchdist import ProcessGroupVote
from .collectives.base import default_timeout
from .mpi import exchanges
from .optim.header import digest64
from .optim.rules import SignumRule, check_range

__all__ = ["SignumState", "signum_hook"]


class SignumState:
    """The hook's state: the momentum of each parameter on this rank, the step, the transport.

    Args:
        momentum: beta in [0, 1); 0 sends the sign of the gradient itself (signSGD).
        comm: an mpi4py communicator to vote over, or None for the DDP model's process group
            (``process_group``, else torch.distributed's default group).
        topology: ``"server"`` (default) or ``"allgather"`` over a process group; any of
            :data:`mpisign.TOPOLOGIES` over MPI.
        process_group: the group DDP was given, when ``comm`` is None and it is not the default.
        timeout: seconds an MPI vote waits on its peers (a process group's own timeout bounds
            its calls).
    """

    def __init__(self, momentum: float = 0.9, comm=None, topology: str = "server",
                 process_group=None, timeout: float | None = None):
        self.momentum = check_range("momentum", momentum, "SignumState: ", below_one=True)
        if comm is None:   # one vote over the group serves every bucket
            voter = ProcessGroupVote(process_group, topology)
            self.rank, self.size = voter.rank, voter.size
            self._make = lambda n, tally: voter
            self._differing = voter.ranks_differing
            self._all_zero = voter.all_zero
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
        if self.size == 1:
            raise ValueError("SignumState: the process group has one rank: there is no vote; "
                             "use mpisign.Signum on one process")
        self.step = 0
        self.momentum_buffers: list[torch.Tensor | None] = []   # by first sight of a parameter
        self._index: dict = {}     # id(parameter) -> its place in momentum_buffers
        self._loaded: list = []    # buffers from load_state_dict, taken in the same order
        self._buckets: dict = {}   # bucket index -> _Bucket, remade when its parameters change

    # -- what a bucket needs -----------------------------------------------------------------
    def buffer(self, p: torch.Tensor) -> torch.Tensor:
        """This rank's momentum of parameter ``p``: made (or loaded) the first time ``p`` is
        seen. DDP's buckets hand the parameters in the same order on every run of a model."""
        i = self._index.get(id(p))
        if i is None:
            i = self._index[id(p)] = len(self.momentum_buffers)
            loaded = self._loaded[i] if i < len(self._loaded) else None
            if loaded is not None and loaded.shape != p.shape:
                raise ValueError(f"SignumState.load_state_dict: momentum {i} has shape "
                                 f"{tuple(loaded.shape)}, its parameter {tuple(p.shape)}")
            self.momentum_buffers.append(
                loaded.to(p.device, p.dtype).contiguous() if loaded is not None
                else torch.zeros_like(p, memory_format=torch.contiguous_format))
        return self.momentum_buffers[i]

    def bucket(self, index: int, params: list, buffer: torch.Tensor) -> "_Bucket":
        key = tuple(id(p) for p in params)
        kept = self._buckets.get(index)
        if kept is None or kept.key != key:
            self._check_layout(index, params)
            kept = self._buckets[index] = _Bucket(self, key, params, buffer)
        return kept

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
        """This rank's momentum (by the order DDP first handed the parameters) and the step."""
        return {"step": self.step, "momentum": self.momentum,
                "momentum_buffers": [b.detach().clone() for b in self.momentum_buffers]}

    def load_state_dict(self, state: dict) -> None:
        check_range("momentum", state["momentum"], "SignumState.load_state_dict: ",
                    below_one=True)
        self.step = int(state["step"])
        self.momentum = float(state["momentum"])
        self._loaded = list(state["momentum_buffers"])
        self.momentum_buffers, self._index, self._buckets = [], {}, {}

    def __getstate__(self):
        raise TypeError("SignumState holds a communicator; save state_dict() instead")


class _Bucket:
    """One DDP bucket's parameters as the vote sees them: each parameter's words, word-aligned
    as in :mod:`mpisign.optim.layout`, its offset in DDP's flat buffer, the backend, the vote."""

    def __init__(self, state: SignumState, key: tuple, params: list, buffer: torch.Tensor):
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
        # mpisign.Signum makes it; an even number ties by the zero bits alone).
        self.zeros = np.zeros_like(self.words) if state.size % 2 else None
        self.zouts = (None if self.zeros is None
                      else [self.zeros[a:b] for a, b in zip(self.word0, self.word0[1:])])
        self.voter = state._make(self.words.shape[0] * packing.WORD_BITS, self.backend.tally)

    def views(self, buffer: torch.Tensor) -> list:
        """Each parameter's gradient in DDP's flat buffer, which holds them one after another
        in the bucket's order."""
        return [buffer[a: a + n].view_as(p)
                for a, n, p in zip(self.offsets, self.numels, self.params)]


def _pack(state: SignumState, b: _Bucket, grads: list) -> None:
    """Signum's local step on this rank (:class:`mpisign.optim.rules.SignumRule`, through the
    backend's fused kernel where it takes the tensors), packed into the bucket's words."""
    beta = state.momentum
    zero_bit = (state.rank + state.step) % 2
    bufs = [state.buffer(p) for p in b.params] if beta else [None] * len(b.params)
    fused = getattr(b.backend, "update_and_pack", None)
    if b.zouts is not None and not getattr(b.backend, "fused_zeros", False):
        fused = None   # its kernel writes no zero mask: the rule's ops, then two packs
    if fused is not None and fused(grads, bufs, beta, 1 - beta, zero_bit, b.outs,
                                   **({"zeros": b.zouts} if b.zouts else {})) is not None:
        return
    grads = [torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0) for g in grads]
    books = {p: {"momentum_buffer": m} for p, m in zip(b.params, bufs) if m is not None}
    sources, _ = SignumRule().send(b.params, grads, books, {"momentum": beta}, 1.0)
    for i, (src, out) in enumerate(zip(sources, b.outs)):
        b.backend.pack(src, zero_bit, out)
        if b.zouts is not None:
            b.backend.zeros(src, b.zouts[i])
    b.backend.settle()


def signum_hook(state: SignumState,
                bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: this rank's Signum step packed, voted with every rank, and the
    vote (-1, 0, +1) returned as the bucket's gradient (see the module docstring)."""
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
    if bucket.is_last():
        state.step += 1
    future: torch.futures.Future = torch.futures.Future()
    future.set_result(buffer)
    return future
