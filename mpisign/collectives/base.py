"""What every vote topology shares: argument checks, bounded waits, and byte accounting.

A topology takes this rank's packed sign words (see :mod:`mpisign.backends.packing`) and returns the packed
majority ``(plus, tie)``, identical on every rank. Every message is a point-to-point send or
receive that this package posts itself, so the bytes each rank sends and receives are counted
exactly, and every wait is bounded: a peer that never arrives ends in :class:`VoteTimeout`
naming the ranks that are missing instead of a hang.

Words are a numpy uint64 array in host memory, or a torch int64 tensor (the same 64 bits per
word) on any device: with a CUDA-aware MPI the GPU path hands device tensors straight to mpi4py
(DLPack / CUDA array interface), and the work buffers, the tally and the result then live on
that device too. Before MPI touches device buffers the CUDA stream is synchronized once per
phase (the posts between two waits), not once per message: a topology queues its device work
(copies, tallies) for a phase before the phase's first post.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from mpi4py import MPI

from ..backends.signs import host_tally
from ..mpi.elastic import abandon
from ..mpi.comm import (ANY_RANK, VoteTimeout, bounded, check_comm,  # noqa: F401
                        default_timeout, device_of, wait_all)

__all__ = ["packed_bytes", "result_planes", "ANY_RANK", "Pending", "Traffic", "VoteTimeout", "SignVote", "bounded", "check_comm",
           "check_words", "default_timeout", "device_of", "host_tally", "on_device",
           "ready_for_mpi", "wait_all"]

log = logging.getLogger(__name__)

#: Vote messages use tags TAG_BASE + 4 * bucket + phase (MPI guarantees tags up to 32767).
TAG_BASE = 0x1000


# -- sizes that the wire format and the topologies share ----------------------------------------

def packed_bytes(n: int) -> int:
    """``W = 8 * ceil(n / 64)``: bytes of ``n`` packed signs in uint64 words."""
    return 8 * ((n + 63) // 64)


def result_planes(m: int) -> int:
    """``k``: 2 packed planes travel back (plus, tie) when a tie is possible (M even), else 1."""
    return 2 if m % 2 == 0 else 1


@dataclass
class Traffic:
    """Bytes this rank moved in votes (payload only, as posted to MPI).

    ``sent_between_nodes`` and ``received_between_nodes``: the part of those that went to or
    came from another node, counted when the topology knows the nodes (:attr:`SignVote.nodes`),
    else None."""

    sent: int = 0
    received: int = 0
    votes: int = 0
    sent_between_nodes: int | None = None
    received_between_nodes: int | None = None


def check_words(words) -> None:
    """Raise ValueError unless ``words`` is a contiguous 1-D uint64 numpy array or int64 tensor."""
    if isinstance(words, torch.Tensor):
        ok = words.dtype == torch.int64 and words.dim() == 1 and words.is_contiguous()
    else:
        ok = (isinstance(words, np.ndarray) and words.dtype == np.uint64 and words.ndim == 1
              and words.flags.c_contiguous)
    if not ok:
        raise ValueError(f"words must be a contiguous 1-D uint64 array or int64 tensor, got "
                         f"{type(words).__name__} {getattr(words, 'dtype', '?')} "
                         f"{tuple(getattr(words, 'shape', ()))}")


def on_device(buf) -> bool:
    """Whether MPI will touch ``buf`` in device memory (a CUDA tensor)."""
    return isinstance(buf, torch.Tensor) and buf.is_cuda


def ready_for_mpi(buf, settled: bool = False) -> None:
    """Before MPI reads or writes device buffer ``buf``: finish the CUDA work queued on its
    stream. ``settled``: the stream was synchronized earlier in this phase, so only work queued
    since then (none, in a topology that queues its device work before a phase's first post) is
    waited for (:func:`mpisign.cuda.aware.sync_for_mpi`).

    MPI works outside CUDA streams: a buffer that a kernel or copy is still producing (or still
    reading, as the apply kernel reads last step's result) must be finished first."""
    from ..cuda.aware import sync_for_mpi  # late: the host path never needs mpisign.cuda
    sync_for_mpi(buf.device, settled)


class Pending:
    """A vote in flight: what ``start`` posted and ``finish`` completes.

    A topology that keeps state between the two declares it in a subclass's ``__slots__`` and
    names that subclass in :attr:`SignVote.pending_type`; nothing else can be hung on it."""

    __slots__ = ("words", "n", "step", "bucket", "requests", "peers", "settled")

    def __init__(self, words, n: int, step: int, bucket: int):
        self.words, self.n, self.step, self.bucket = words, n, step, bucket
        self.requests: list[MPI.Request] = []
        self.peers: list = []
        # The device's stream was synchronized since the last wait (see SignVote._ready).
        self.settled = False


class SignVote:
    """Base of the topologies: the majority of every rank's packed words, on every rank.

    ``vote(words, n)`` is ``finish(start(words, n))``. ``start`` posts what can go before the
    vote is needed (the first phase's sends and receives), so the optimizer can start one
    bucket's vote while the backward pass still computes the next bucket's gradients. Votes of
    different ``bucket`` numbers may be in flight at once: their messages carry distinct tags.

    ``tally(votes, n) -> (plus, tie)`` takes the majority of an M x W words array where a
    topology counts raw votes; the default, :func:`host_tally`, works for numpy and torch words,
    and the GPU path passes its CUDA kernel.
    """

    name = "?"
    #: Buckets that may be in flight at once; each gets its own block of tags.
    MAX_BUCKETS = 1024
    #: What :meth:`start` returns: :class:`Pending`, or a subclass with the topology's state.
    pending_type = Pending

    def __init__(self, comm: MPI.Comm, timeout: float | None = None, tally=None):
        self.comm = check_comm(comm)
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.timeout = default_timeout() if timeout is None else float(timeout)
        if not self.timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        self.tally = host_tally if tally is None else tally
        self.traffic = Traffic()
        self.nodes = None   # a mpisign.mpi.nodes.Nodes: see count_nodes
        self._buffers: dict = {}  # (bucket, name) -> array, allocated once per shape
        self._sending: dict = {}  # bucket -> (requests, peers, what): sends left in flight

    def vote(self, words, n: int, step: int | None = None, bucket: int = 0):
        """Majority of every rank's ``words`` (packed ``n`` bits): ``(plus, tie)`` on every rank.

        ``tie`` is None when the communicator size is odd (no tie is possible). ``step`` is the
        caller's step number, for error messages (default: this object's count of votes).
        ``bucket``: see :meth:`start`; the result lives in that bucket's buffers until the next
        vote of the same bucket.
        """
        return self.finish(self.start(words, n, step, bucket))

    def start(self, words, n: int, step: int | None = None, bucket: int = 0) -> Pending:
        """Post the first phase of a vote; ``words`` must not change until :meth:`finish`.

        The result of :meth:`finish` is of ``words``' kind (numpy, or torch on its device)."""
        check_words(words)
        if not 0 <= bucket < self.MAX_BUCKETS:
            raise ValueError(f"bucket must be in [0, {self.MAX_BUCKETS}), got {bucket}")
        pending = self.pending_type(words, n, self.traffic.votes if step is None else step,
                                    bucket)
        self._complete_sends(bucket)
        self.traffic.votes += 1
        self._start(pending)
        return pending

    def finish(self, pending: Pending):
        """Complete a vote started by :meth:`start` and return ``(plus, tie)``."""
        return self._finish(pending)

    def _start(self, pending: Pending) -> None:
        raise NotImplementedError

    def _finish(self, pending: Pending):
        raise NotImplementedError

    def count_nodes(self, nodes) -> None:
        """Count from now on which bytes cross between the nodes of ``nodes`` (a
        :class:`mpisign.mpi.nodes.Nodes` of this communicator), in :attr:`traffic`."""
        if len(nodes.node_of) != self.size:
            raise ValueError(f"nodes group {len(nodes.node_of)} ranks, the communicator has "
                             f"{self.size}")
        self.nodes = nodes
        self.traffic.sent_between_nodes = self.traffic.sent_between_nodes or 0
        self.traffic.received_between_nodes = self.traffic.received_between_nodes or 0

    # -- helpers for the topologies ----------------------------------------------------------
    @property
    def tie_possible(self) -> bool:
        """A tie needs an even number of voters; only then does a tie mask travel."""
        return self.size % 2 == 0

    def _buffer(self, p: Pending, name: str, shape):
        """A work buffer of ``p.words``' kind (numpy uint64, or int64 on the words' device) that
        lives across steps: reallocated only if its shape or device changes."""
        key, shape = (p.bucket, name), tuple(shape)
        buf = self._buffers.get(key)
        if isinstance(p.words, torch.Tensor):
            if not (isinstance(buf, torch.Tensor) and buf.shape == shape
                    and buf.device == p.words.device):
                buf = self._buffers[key] = p.words.new_empty(shape)
        elif not (isinstance(buf, np.ndarray) and buf.shape == shape):
            buf = self._buffers[key] = np.empty(shape, dtype=np.uint64)
        return buf

    def _split(self, p: Pending, result):
        """``(plus, tie)`` as contiguous word vectors, from a W x k result (row i holds word i's
        plus and tie, so that any run of words is one contiguous message)."""
        w = p.words.shape[0]
        plus = self._buffer(p, "plus", (w,))
        plus[:] = result[:, 0]
        if not self.tie_possible:
            return plus, None
        tie = self._buffer(p, "tie", (w,))
        tie[:] = result[:, 1]
        return plus, tie

    def _tag(self, pending: Pending, phase: int) -> int:
        return TAG_BASE + 4 * pending.bucket + phase

    def _crosses(self, peer: int) -> bool:
        return self.nodes is not None and self.nodes.node_of[peer] != self.nodes.node_of[self.rank]

    def _ready(self, pending: Pending, buf) -> None:
        """Before MPI touches ``buf``: a device buffer's stream is synchronized at the first
        post of each phase (the posts between two waits) and only checked at the others, so a
        phase costs one synchronization, not one per message. Topologies queue a phase's device
        work (copies, tallies) before its first post."""
        if on_device(buf):
            ready_for_mpi(buf, pending.settled)
            pending.settled = True

    def _isend(self, pending: Pending, buf, dest: int, phase: int) -> None:
        self._ready(pending, buf)
        self.traffic.sent += buf.nbytes
        if self._crosses(dest):
            self.traffic.sent_between_nodes += buf.nbytes
        with device_of(buf):
            request = self.comm.Isend(buf, dest=dest, tag=self._tag(pending, phase))
        pending.requests.append(request)
        pending.peers.append(dest)

    def _irecv(self, pending: Pending, buf, source: int, phase: int) -> None:
        self._ready(pending, buf)
        self.traffic.received += buf.nbytes
        if self._crosses(source):
            self.traffic.received_between_nodes += buf.nbytes
        with device_of(buf):
            request = self.comm.Irecv(buf, source=source, tag=self._tag(pending, phase))
        pending.requests.append(request)
        pending.peers.append(source)

    def _leave_sends(self, pending: Pending, what: str) -> None:
        """Leave the sends ``pending`` has posted last (a final phase of sends only, such as
        a server's result) in flight: the next vote of the bucket completes them before it
        posts anything (:meth:`start`), since until then nothing writes the buffers they read;
        the caller reads its result meanwhile. A root that waited for them here would wait
        until every receiver had run and taken its copy (a large message is pulled by the
        receiver), which on oversubscribed cores was a third of a small model's step."""
        self._sending[pending.bucket] = (pending.requests, pending.peers,
                                         f"{self.name} vote at step {pending.step} on rank "
                                         f"{self.rank}: {what} (left in flight)")
        pending.requests, pending.peers, pending.settled = [], [], False

    def complete_sends(self) -> None:
        """Wait on MPI (bounded) for every send a vote left in flight. A root's results stay in
        flight after its vote returns (see :meth:`_leave_sends`), and only this rank's later
        MPI calls move them on: a program about to block outside MPI (a torch.distributed
        collective, a file lock) calls this first, or the workers wait for their results while
        it waits for them. Local: no message."""
        for bucket in list(self._sending):
            self._complete_sends(bucket)

    def abandon(self) -> None:
        """After a recovery revoked this vote's communicator (a rank died): every request it
        left standing completed, each with its result or an error, so that none is pending
        at exit. Local."""
        for requests, _, _ in self._sending.values():
            abandon(requests)
        self._sending.clear()

    def _complete_sends(self, bucket: int) -> None:
        """Wait on MPI for the sends the bucket's last vote left in flight (bounded)."""
        left = self._sending.pop(bucket, None)
        if left is not None:
            requests, peers, what = left
            wait_all(requests, peers, self.timeout, what)

    def _wait(self, pending: Pending, what: str) -> None:
        """Wait on MPI for everything ``pending`` has posted so far (bounded, see wait_all)."""
        requests, peers = pending.requests, pending.peers
        pending.requests, pending.peers, pending.settled = [], [], False
        wait_all(requests, peers, self.timeout,
                 f"{self.name} vote at step {pending.step} on rank {self.rank}: {what}")
