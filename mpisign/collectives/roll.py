"""A vote among the ranks that a roll call counts: how a topology that spreads its tally over
many ranks closes on a quorum.

In the sharded, hierarchical and tree votes every rank does a part of the tally (a shard, a
node's count, a subtree's), so a late rank would hold up its part whatever the quorum. A roll
call first agrees who votes:

1. **The roll** (:class:`mpisign.collectives.quorum.QuorumVote` on no words): every rank tells
   the root it has come to step s (``[step]``, one word) and posts a receive of the roll's
   result. The root closes the roll once ``quorum`` ranks are in, plus up to ``grace`` seconds,
   and sends every rank ``[step | k | counted mask]``; a late rank's message is dropped, as in
   the server's quorum vote. Every rank so learns the same ``k`` counted ranks.
2. **The counted ranks vote among themselves** in the topology's own shape
   (:meth:`RollCallVote._vote_among`), a majority of ``k`` voters: a tie, where exactly
   ``k / 2`` say "+", needs ``k`` even, so the tie plane always travels. A late rank sends no
   sign at all: it learns from the roll that the vote closed without it, so a stale sign can
   never be counted.
3. **The result reaches the late ranks later**: the ranks that send it to them leave those
   sends in flight, in a ring of :attr:`QuorumVote.max_lag` result buffers
   (:class:`mpisign.collectives.quorum.SendRing`), until the late rank comes to that step and
   takes it.

The roll is one round trip more than the server's quorum vote, paid before any sign moves. The
root (rank ``root``, which takes the roll) cannot be late: a slow root slows every rank.
"""

from __future__ import annotations

import numpy as np

from .base import Pending, SignVote
from .quorum import QuorumVote, SendRing, channel_tag, take_channel

__all__ = ["RollCallVote", "RollPending"]


class RollPending(Pending):
    # The roll in flight; the ranks it counted and the others (late); the W x 2 result.
    __slots__ = ("roll", "counted", "late", "result")


class RollCallVote(SignVote):
    """Base of the votes closed by a roll call at ``root`` (see the module docstring): a
    subclass votes among ``p.counted`` in :meth:`_vote_among`. ``counted``, ``abstained``,
    ``late_streak`` and ``dropped`` are the roll's, as :class:`QuorumVote` keeps them."""

    pending_type = RollPending   # a subclass adds its own state

    def __init__(self, comm, timeout=None, tally=None, quorum: int | None = None,
                 grace: float = 0.0, root: int = 0):
        # Not super(): a subclass that is also another topology (HierarchicalQuorumVote) sets
        # up that topology's own state itself, once.
        SignVote.__init__(self, comm, timeout, tally)
        self.roll = QuorumVote(comm, self.timeout, quorum=quorum, grace=grace, root=root)
        # The counted ranks' messages (phases 0 to 3) in a block of tags apart from the roll's.
        self.votes_channel = take_channel(comm)
        # What is sent to late ranks stays in flight until they take it.
        self._ring = SendRing(self.roll.max_lag, self.timeout)
        self._none = np.empty(0, dtype=np.uint64)   # the roll's words: it carries no sign

    counted = property(lambda self: self.roll.counted)
    abstained = property(lambda self: self.roll.abstained)
    late_streak = property(lambda self: self.roll.late_streak)
    dropped = property(lambda self: self.roll.dropped)
    quorum = property(lambda self: self.roll.quorum)
    channel = property(lambda self: self.roll.channel)   # the roll's block of tags

    @property
    def tie_possible(self) -> bool:
        return True   # the number of voters varies: the tie plane always travels

    def result_waiting(self, bucket: int = 0) -> bool:
        """Whether the roll of this rank's coming vote has closed without it (a probe, no
        wait); False on the root."""
        return self.roll.result_waiting(bucket)

    def _tag(self, pending, phase: int) -> int:
        return channel_tag(self.votes_channel, pending.bucket, phase)

    # -- a vote ------------------------------------------------------------------------------
    def _start(self, p):
        if not isinstance(p.words, np.ndarray):
            raise ValueError("a quorum vote runs on host words: the words of a GPU path are "
                             "not supported with quorum= yet")
        # Step 1: this rank is here; the signs wait for the roll's answer.
        p.roll = self.roll.start(self._none, 0, step=p.step, bucket=p.bucket)

    def _finish(self, p):
        self.roll.finish(p.roll)
        p.counted = p.roll.counted
        counted = set(p.counted)
        p.late = [r for r in range(self.size) if r not in counted]
        roll = self.roll.traffic   # the roll's bytes are this vote's
        self.traffic.sent += roll.sent
        self.traffic.received += roll.received
        roll.sent = roll.received = 0
        place = self._ring.take(p.bucket, f"{self.name} quorum vote at step {p.step} on rank "
                                          f"{self.rank}")
        p.result = self._buffer(p, f"result{place}", (p.words.shape[0], 2))
        late = self._vote_among(p)
        self._ring.leave(p.bucket, place, *late)
        self._wait(p, "the result, from its owners and to the counted ranks")
        return self._split(p, p.result)

    def _vote_among(self, p) -> tuple[list, list]:
        """Post the vote among ``p.counted`` into ``p.result`` (W x 2: plus, tie), waiting for
        what it needs; the result's sends to the counted ranks and its receives stay in
        ``p.requests`` (the caller waits for them); return the sends to the late ranks
        (``p.late``) as ``(requests, peers)``, left in flight."""
        raise NotImplementedError

    def _aside(self, p, post) -> tuple[list, list]:
        """What ``post()`` posts, kept out of ``p.requests``: ``(requests, peers)``."""
        now = p.requests, p.peers
        p.requests, p.peers = [], []
        post()
        later = p.requests, p.peers
        p.requests, p.peers = now
        return later

    # -- the end -----------------------------------------------------------------------------
    def drain(self) -> None:
        """Collective, after the last vote (every rank has voted as often): the roll's late
        messages taken (:meth:`QuorumVote.drain`), and every send still in flight completed
        (each rank has taken all of its results by its last vote). Bounded."""
        self.roll.drain()
        self._ring.drain(f"{self.name} quorum vote's drain on rank {self.rank}: results in "
                         f"flight")

    def abandon(self) -> None:
        """After a recovery revoked the communicator: the roll's requests and the results in
        flight completed (each with its result or an error)."""
        self.roll.abandon()
        self._ring.abandon()
        super().abandon()

    def pending_requests(self) -> int:
        """Requests of this collective not yet completed (0 after :meth:`drain`, or
        :meth:`abandon`)."""
        return self.roll.pending_requests() + self._ring.pending()
