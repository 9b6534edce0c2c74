"""Quorum vote: the server's vote that closes once ``quorum`` ranks have voted; late ranks abstain.

A majority vote needs no reweighting when a voter is missing: a rank whose signs have not arrived
abstains, and the result is the majority of those present. The root (rank ``root``) closes a
step's vote as soon as ``quorum`` ranks' signs are in (its own included), plus up to ``grace``
seconds for the rest, tallies the rows that came, and sends every rank the same result, late
ranks included, with the set of ranks counted. So every rank applies the same bits and knows who
was counted.

1. Every worker sends ``[step | packed signs]`` to the root and posts a receive of the result. The
   root keeps one receive posted from every worker at all times, so a late message always has
   somewhere to land.
2. The root takes the messages as they come: one of this step is counted; one of an earlier step
   (a rank that was late then) is dropped, never counted, and the receive is posted again. Once
   ``quorum`` rows are in, ``grace`` has passed and no message has come for
   :data:`SETTLE_SECONDS` (1 ms), or once every rank is in, the vote closes.
3. The root tallies the counted rows (a majority of ``k`` voters: "+" where more than ``k / 2``
   say "+", a tie where exactly ``k / 2`` do, which needs ``k`` even) and sends every worker
   ``[step | k | counted mask | plus | tie]``. The tie plane always travels, since ``k`` varies.

A worker never runs ahead of the root (it needs step s's result to begin step s + 1), but a late
worker may fall behind: the root keeps the results of the last :attr:`QuorumVote.max_lag` steps
in flight for it, and waits for a worker that is further behind (bounded by ``timeout``). A rank
that is only slow is never dropped; one that stops altogether ends in :class:`VoteTimeout`, naming
it, once the root needs its result buffer back.

A coordinate that is 0 on a rank is sent as ``(rank + step) % 2`` as in every topology; among the
counted ranks the bits of all-zero coordinates split as their ranks' parities do, so such a
coordinate's step alternates in sign with the step's parity (bounded drift, as before).

Traffic per step, for ``n`` coordinates and M ranks: each worker sends ``n + 64`` bits and
receives ``2n + 64 (2 + ceil(M / 64))``; the root receives up to ``(M - 1)`` times as much as a
worker sends and sends as much as they receive.

Only the server's shape closes in one place. The sharded, hierarchical and tree votes close on
a quorum by asking this vote first, on no words: a roll call of the ranks present, which then
vote among themselves in that topology's shape (:mod:`mpisign.collectives.roll`;
:mod:`~mpisign.collectives.quorum_sharded`, :mod:`~mpisign.collectives.quorum_hierarchical`,
:mod:`~mpisign.collectives.quorum_tree`). Where every rank tallies for itself (allgather)
ranks would close on different sets without that agreement, and with it the sharded vote
moves fewer bytes: :func:`check_quorum_topology` refuses it.
"""

from __future__ import annotations

import math
import os
import time
from fractions import Fraction

import numpy as np
from mpi4py import MPI

from .base import Pending, SignVote, VoteTimeout, wait_all
from ..mpi.comm import SPIN_SECONDS, YIELD_SECONDS
from ..mpi.elastic import abandon

__all__ = ["QuorumVote", "SendRing", "take_channel", "channel_tag", "resolve_quorum",
           "check_quorum", "check_quorum_topology",
           "survivors_quorum", "QUORUM_TOPOLOGIES"]

VOTES, RESULT = 0, 1  # message phases
#: A quorum vote's messages use tags QUORUM_TAG_BASE + 4 * (CHANNEL_BUCKETS * channel + bucket)
#: + phase: each QuorumVote on a communicator has a channel of its own (see QuorumVote.channel),
#: apart from the other votes' tags (mpisign.collectives.base.TAG_BASE), below MPI's 32767.
QUORUM_TAG_BASE, CHANNEL_BUCKETS, CHANNELS = 0x4000, 64, 32
#: Once the quorum is in (and the grace over), the root still takes what arrives until nothing
#: has for this long. A poll of MPI does not match every message that has arrived: on 5 ranks
#: over shared memory, a root back from 2 s away took 2 of 4 waiting messages in its first
#: polls and saw none in the next 0.3 ms (tests/mpi/quorum_check.py "late", sharded), so
#: "nothing in the last poll" left out ranks whose signs had been there for a second.
SETTLE_SECONDS = 1e-3
_channels: dict = {}   # a communicator's handle -> the quorum votes made on it so far
#: Topologies that can close on a quorum: this module's vote, and the sharded, hierarchical and
#: tree votes among the ranks its roll call counts (mpisign.collectives.roll).
QUORUM_TOPOLOGIES = ("server", "sharded", "hierarchical", "tree")


def resolve_quorum(quorum, size: int, allow_minority: bool = False) -> int:
    """The number of ranks whose votes close a step, for ``quorum`` given as a count (an int)
    or a fraction of ``size`` ranks (a float or Fraction in (0, 1], rounded up). None: all ranks.
    A quorum of fewer than a majority of the ranks is refused unless ``allow_minority``: the
    paper's guarantee is for a majority of all workers, not of a minority of them."""
    if quorum is None:
        return size
    if isinstance(quorum, bool) or not isinstance(quorum, (int, float, Fraction)):
        raise ValueError(f"quorum must be a number of ranks (int) or a fraction of them "
                         f"(float in (0, 1]), got {quorum!r}")
    if isinstance(quorum, int):
        count = quorum
    else:
        if not 0 < quorum <= 1:
            raise ValueError(f"quorum as a fraction of the ranks must be in (0, 1], got {quorum!r}")
        count = math.ceil(Fraction(quorum).limit_denominator(10**6) * size)
    if not 1 <= count <= size:
        raise ValueError(f"quorum must be between 1 and the {size} ranks of the communicator, "
                         f"got {quorum!r}")
    if 2 * count <= size and not allow_minority:
        raise ValueError(f"quorum {quorum!r} is {count} of {size} ranks, not a majority of them: "
                         f"a majority of a minority no longer has the paper's guarantee against "
                         f"adversarial or broken ranks; pass allow_minority=True to allow it")
    return count


def check_quorum(topology: str, comm, quorum, grace, allow_minority: bool = False) -> int:
    """Every check of a quorum's options before any communication (the same error on every
    rank); the quorum as a count of ranks."""
    count = resolve_quorum(quorum, comm.Get_size(), allow_minority)
    check_quorum_topology(topology)
    if isinstance(grace, bool) or not isinstance(grace, (int, float)) or not (
            math.isfinite(grace) and grace >= 0):
        raise ValueError(f"grace must be a number of seconds >= 0, got {grace!r}")
    return count


def take_channel(comm) -> int:
    """A block of tags of its own on ``comm`` for a vote whose receives may stand between its
    votes (see :func:`channel_tag`). Every rank makes its quorum votes on a communicator in the
    same order, so the channels agree."""
    handle = comm.py2f()
    taken = _channels.get(handle, 0)
    _channels[handle] = taken + 1
    return taken % CHANNELS


def channel_tag(channel: int, bucket: int, phase: int) -> int:
    """The tag of a message of ``phase`` (0 to 3) in ``bucket``, in ``channel``."""
    if not 0 <= bucket < CHANNEL_BUCKETS:
        raise ValueError(f"a quorum vote has buckets 0 to {CHANNEL_BUCKETS - 1}, got {bucket}")
    return QUORUM_TAG_BASE + 4 * (CHANNEL_BUCKETS * channel + bucket) + phase


def survivors_quorum(quorum: int, before: int, after: int) -> int:
    """The quorum of ``after`` ranks that survive ``before`` (an elastic optimizer lost some):
    as many ranks may still be late as before (``before - quorum``), but the quorum stays a
    majority of the survivors if it was one of all the ranks, and is at most all of them."""
    spare = before - quorum
    least = after // 2 + 1 if 2 * quorum > before else 1
    return min(after, max(after - spare, least))


def check_quorum_topology(topology: str) -> None:
    """ValueError unless ``topology`` can close a vote on a quorum (see the module docstring)."""
    if topology not in QUORUM_TOPOLOGIES:
        raise ValueError(
            f"quorum= needs topology='server', 'sharded', 'hierarchical' or 'tree': the "
            f"server's root closes each vote in one place, and the others run among the ranks "
            f"that a roll call at the root counts. {topology!r} cannot: with allgather every "
            f"rank tallies for itself, and ranks would close on different sets without that "
            f"agreement (at which point the sharded vote moves fewer bytes); 'auto' is not "
            f"offered with a quorum yet: name the topology")


class SendRing:
    """Sends left in flight for peers that may be late, in ``slots`` places a bucket: what a
    vote sent from place i (and the buffer it sent, which the caller names by i) stays in
    flight until the bucket's vote ``slots`` votes on takes place i again and waits for it
    (bounded), or :meth:`drain`."""

    def __init__(self, slots: int, timeout: float):
        self.slots, self.timeout = slots, timeout
        self._votes: dict = {}    # bucket -> votes so far
        self._sent: dict = {}     # (bucket, place) -> (requests, peers)

    def take(self, bucket: int, what: str) -> int:
        """The place of the bucket's next vote, once what was sent from it last is done."""
        votes = self._votes.get(bucket, 0)
        self._votes[bucket] = votes + 1
        place = votes % self.slots
        sent = self._sent.pop((bucket, place), None)
        if sent is not None:   # slots votes ago, and still not taken: waited for (bounded)
            wait_all(sent[0], sent[1], self.timeout,
                     f"{what}: what it sent {self.slots} votes ago, still not taken")
        return place

    def leave(self, bucket: int, place: int, requests: list, peers: list) -> None:
        """Sends posted from ``place``, left in flight."""
        self._sent[(bucket, place)] = (requests, peers)

    def drain(self, what: str) -> None:
        """Wait (bounded) for every send left in flight."""
        for requests, peers in self._sent.values():
            wait_all(requests, peers, self.timeout, what)
        self._sent.clear()

    def abandon(self) -> None:
        """On a revoked communicator: every send left in flight completed, with its result
        or an error."""
        for requests, _ in self._sent.values():
            abandon(requests)
        self._sent.clear()

    def pending(self) -> int:
        """Sends left in flight, not yet waited for."""
        return sum(len(requests) for requests, _ in self._sent.values())


class _Pending(Pending):
    # The result buffer; the ranks counted, once finished; its place in the ring of sends.
    __slots__ = ("result", "counted", "place")


class QuorumVote(SignVote):
    """The server's vote, closed on ``quorum`` ranks (see the module docstring).

    ``counted``: after each vote, the ranks it counted. ``abstained[r]``: votes rank r was not
    counted in; ``late_streak[r]``: of the last votes in a row (every rank learns them from the
    results, so they are the same on every rank).
    """

    name = "server"
    pending_type = _Pending
    #: Steps a worker may fall behind the root before the root waits for it.
    max_lag = 8

    def __init__(self, comm, timeout=None, tally=None, quorum: int | None = None,
                 grace: float = 0.0, root: int = 0):
        super().__init__(comm, timeout, tally)
        self.quorum = self.size if quorum is None else int(quorum)
        if not 1 <= self.quorum <= self.size:
            raise ValueError(f"quorum must be in [1, {self.size}], got {quorum!r}")
        if not (isinstance(grace, (int, float)) and math.isfinite(grace) and grace >= 0):
            raise ValueError(f"grace must be a number of seconds >= 0, got {grace!r}")
        self.grace = float(grace)
        self.root = root
        # Its own tags: the root's standing receives stay posted between votes, and could take
        # another quorum vote's message on the same communicator (a second kind of
        # majority_vote call, or the optimizer's next layout). Every rank makes its quorum
        # votes on a communicator in the same order, so the channels agree.
        self.channel = take_channel(comm)
        self.others = [r for r in range(self.size) if r != root]
        self.mask_words = (self.size + 63) // 64
        self.counted: list[int] = list(range(self.size))
        self.abstained = [0] * self.size
        self.late_streak = [0] * self.size   # votes in a row each rank was not counted in
        self.dropped = 0          # late messages the root received and dropped
        self._posted: dict = {}   # bucket -> {worker: request}: the root's standing receives
        # What this rank sent (a worker's signs, the root's results) stays in flight until it
        # is taken; its buffer is written again max_lag votes on.
        self._ring = SendRing(self.max_lag, self.timeout)
        self._inboxes: dict = {}  # bucket -> (M x (1 + W) receive rows, tag)
        self._heard: dict = {}    # (bucket, worker) -> the step of its last message taken
        self._closed: dict = {}   # bucket -> the step of its last vote
        self._early: dict = {}    # bucket -> {worker: its message of the next vote}, taken
        #                           by a drain (see drain)

    def _tag(self, pending, phase: int) -> int:
        return self.channel_tag(pending.bucket, phase)

    def channel_tag(self, bucket: int, phase: int) -> int:
        """The tag of a message of ``phase`` (0 or 1) in ``bucket``, in this vote's channel."""
        return channel_tag(self.channel, bucket, phase)

    def result_waiting(self, bucket: int = 0) -> bool:
        """A worker: whether the root's result of its coming vote is already here (a probe,
        no wait): the vote has closed without it. False on the root, which closes the votes."""
        if self.rank == self.root:
            return False
        return bool(self.comm.Iprobe(source=self.root, tag=self.channel_tag(bucket, RESULT)))

    @property
    def tie_possible(self) -> bool:
        return True   # the number of voters varies: the tie plane always travels

    def _result_shape(self, w: int) -> tuple:
        return (2 + self.mask_words + 2 * w,)

    # -- a vote ------------------------------------------------------------------------------
    def _start(self, p):
        if not isinstance(p.words, np.ndarray):
            raise ValueError("a quorum vote runs on host words: the words of a GPU path are "
                             "not supported with quorum= yet")
        w = p.words.shape[0]
        place = p.place = self._ring.take(p.bucket, f"quorum vote at step {p.step} on rank "
                                                    f"{self.rank}")
        if self.rank != self.root:
            # Step 1: [step | signs] to the root; the result's receive posted at once. The send
            # is left in flight: a late rank's message lands only once the root, voting again,
            # has taken the one before it, and waiting for that here could hold this rank out
            # of a collective the root is waiting in.
            out = self._buffer(p, f"out{place}", (1 + w,))
            out[0] = p.step
            out[1:] = p.words
            self._isend(p, out, self.root, VOTES)
            self._ring.leave(p.bucket, place, p.requests, p.peers)
            p.requests, p.peers = [], []
            p.result = self._buffer(p, "result", self._result_shape(w))
            self._irecv(p, p.result, self.root, RESULT)
            return
        p.result = self._buffer(p, f"result{place}", self._result_shape(w))
        self._inbox(p)

    def _inbox(self, p) -> dict:
        """The root's standing receives of this bucket, posted for every worker that has none."""
        self._inboxes[p.bucket] = (self._buffer(p, "inbox", (self.size, 1 + p.words.shape[0])),
                                   self._tag(p, VOTES))
        return self._repost(p.bucket)

    def _repost(self, bucket: int) -> dict:
        posted = self._posted.setdefault(bucket, {})
        inbox, tag = self._inboxes[bucket]
        for r in self.others:
            if r not in posted:
                self.traffic.received += inbox[r].nbytes
                posted[r] = self.comm.Irecv(inbox[r], source=r, tag=tag)
        return posted

    def _finish(self, p):
        w = p.words.shape[0]
        if self.rank != self.root:
            self._wait(p, "waiting for the server's result (quorum vote)")
            if int(p.result[0]) != p.step:
                raise RuntimeError(f"quorum vote on rank {self.rank}: the server's result is "
                                   f"for step {int(p.result[0])}, this rank is at step {p.step}")
        else:
            self._close(p)
        k = int(p.result[1])
        mask = p.result[2: 2 + self.mask_words]
        self.counted = p.counted = [r for r in range(self.size)
                                    if int(mask[r // 64]) >> (r % 64) & 1]
        for r in range(self.size):
            missed = r not in p.counted
            self.abstained[r] += missed
            self.late_streak[r] = self.late_streak[r] + 1 if missed else 0
        assert len(p.counted) == k
        plus = p.result[2 + self.mask_words: 2 + self.mask_words + w]
        tie = p.result[2 + self.mask_words + w:]
        return plus, tie

    def _close(self, p) -> None:
        """The root: take the workers' messages until the vote can close, tally the counted
        rows, and send every worker the result (left in flight, in the result ring)."""
        w = p.words.shape[0]
        early = self._early.pop(p.bucket, {})
        posted = self._inbox(p)
        inbox = self._buffer(p, "inbox", (self.size, 1 + w))
        gathered = self._buffer(p, "gathered", (self.size, w))
        gathered[0] = p.words
        counted = [self.root]
        start = since = time.monotonic()
        quorate_at = None
        # Step 2: wait on MPI for the workers' messages, polling, until the quorum (and grace).
        while True:
            ranks = list(posted)
            done = self._testsome([posted[r] for r in ranks])
            arrived = [(r, early.pop(r)) for r in list(early)]
            for i in done:
                r = ranks[i]
                del posted[r]
                arrived.append((r, inbox[r]))
            for r, message in arrived:
                sent_step = self._heard[(p.bucket, r)] = int(message[0])
                if sent_step == p.step:
                    gathered[len(counted)] = message[1:]
                    counted.append(r)
                else:   # a message of a step already closed: dropped, never counted
                    self.dropped += 1
            if done:   # at once again: a late worker's next message has somewhere to land
                self._inbox(p)
            now = time.monotonic()
            if arrived:
                since = now
            if len(counted) == self.size:
                break
            if len(counted) >= self.quorum:
                quorate_at = quorate_at or now
                if now - quorate_at >= self.grace and now - since >= SETTLE_SECONDS:
                    break   # quorate, grace over, and nothing more arrived for a while
            if now - start > self.timeout:
                missing = sorted(set(range(self.size)) - set(counted))
                raise VoteTimeout(
                    f"quorum vote at step {p.step} on rank {self.rank}: {len(counted)} of the "
                    f"quorum of {self.quorum} ranks after {self.timeout:g} s; no message from "
                    f"rank(s) {missing} (dead, stalled, or not calling the same collective; set "
                    f"MPISIGN_TIMEOUT to wait longer)")
            _pause(now - since)
        # Step 3: the majority of the counted rows, and the result to every worker.
        self._closed[p.bucket] = p.step
        k = len(counted)
        plus, tie = self.tally(gathered[:k], p.n)
        result = p.result
        result[0], result[1] = p.step, k
        result[2: 2 + self.mask_words] = 0
        for r in counted:
            result[2 + r // 64] |= np.uint64(1) << np.uint64(r % 64)
        body = 2 + self.mask_words
        result[body: body + w] = plus
        result[body + w:] = 0 if tie is None else tie
        for r in self.others:
            self._isend(p, result, r, RESULT)
        self._ring.leave(p.bucket, p.place, p.requests, p.peers)
        p.requests, p.peers, p.settled = [], [], False

    @staticmethod
    def _testsome(requests: list) -> list:
        """Indices of ``requests`` that have completed (progresses MPI)."""
        return (MPI.Request.Testsome(requests) or []) if requests else []

    # -- the end -----------------------------------------------------------------------------
    def drain(self) -> None:
        """Collective, after the last vote (every rank has voted as often): the root takes
        every worker's messages up to the last vote's (the late ones are dropped), then
        completes the results in flight, so that no request is left pending and no message
        unreceived (at ``MPI_Finalize``, or when the communicator is freed). Bounded."""
        if self.rank == self.root:
            deadline = time.monotonic() + self.timeout
            for bucket, last in self._closed.items():
                posted = self._repost(bucket)
                inbox = self._inboxes[bucket][0]
                waiting = [r for r in self.others if self._heard.get((bucket, r), -1) < last]
                while waiting:
                    done = self._testsome([posted[r] for r in waiting])
                    for i in sorted(done, reverse=True):
                        r = waiting[i]
                        del posted[r]
                        self._heard[(bucket, r)] = int(inbox[r][0])
                        self.dropped += 1   # a message of a step already closed
                    waiting = [r for r in self.others
                               if self._heard.get((bucket, r), -1) < last]
                    if waiting:
                        posted = self._repost(bucket)
                    if time.monotonic() > deadline:
                        raise VoteTimeout(f"quorum vote's drain on rank {self.rank}: no last "
                                          f"message from rank(s) {waiting} after "
                                          f"{self.timeout:g} s")
                    _pause(0.0 if done else YIELD_SECONDS)
                # No worker sends a message of these votes any more, but one that drained first
                # may have begun the next vote: its message, if one came, is kept for it.
                for r, request in posted.items():
                    request.Cancel()
                    status = MPI.Status()
                    request.Wait(status)
                    if not status.Is_cancelled():
                        self._early.setdefault(bucket, {})[r] = inbox[r].copy()
                posted.clear()
        self._ring.drain(f"quorum vote's drain on rank {self.rank}: what it sent, still in "
                         f"flight")
        for bucket in list(self._sending):
            self._complete_sends(bucket)

    def abandon(self) -> None:
        """After a recovery revoked the communicator: the root's standing receives, and what
        every rank left in flight, completed (each with its result or an error)."""
        for posted in self._posted.values():
            abandon(posted.values())
        self._posted.clear()
        self._ring.abandon()
        super().abandon()

    def pending_requests(self) -> int:
        """Requests of this collective not yet completed (0 after :meth:`drain`, or
        :meth:`abandon`)."""
        return (sum(len(p) for p in self._posted.values()) + self._ring.pending()
                + sum(len(r) for r, _, _ in self._sending.values()))


def _pause(idle: float) -> None:
    """Between polls: spin briefly, then yield the core, then nap (as ``wait_all`` does)."""
    if idle < SPIN_SECONDS:
        return
    if idle < YIELD_SECONDS:
        os.sched_yield()
        return
    time.sleep(min(1e-3, idle / 100))
