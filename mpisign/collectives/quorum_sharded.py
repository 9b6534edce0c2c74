"""Sharded quorum vote: the sharded vote among the ranks that a roll call at the root counts.

In the plain sharded vote every rank owns a shard and tallies it, so a late rank would hold up
its own shard whatever the quorum. Here the owners are chosen per step among the ranks that
are present:

1. **The roll** (:class:`mpisign.collectives.quorum.QuorumVote` on no words): every rank tells
   the root it has come to step s (``[step]``, one word) and posts a receive of the roll's
   result. The root closes the roll once ``quorum`` ranks are in, plus up to ``grace`` seconds,
   and sends every rank ``[step | k | counted mask]``; a late rank's message is dropped, as in
   the server's quorum vote. Every rank so learns the same ``k`` counted ranks.
2. **The counted ranks shard the words among themselves**: the i-th counted rank owns shard i
   of ``k`` (:func:`mpisign.collectives.sharded.shard_bounds`), and each counted rank sends
   shard i of its signs to its owner. A late rank sends no sign at all: it learns from the
   roll that the vote closed without it, so a stale sign can never be counted.
3. **Each owner tallies its shard** over the ``k`` rows (the majority of ``k`` voters: a tie,
   where exactly ``k / 2`` say "+", needs ``k`` even; the tie plane always travels), and sends
   its piece of the result to every other rank. The counted ones take it at once, and the
   owner waits for those sends (a large message moves only while its sender is in MPI). A
   late rank's copy stays in flight, in a ring of :attr:`QuorumVote.max_lag` result buffers
   (:class:`mpisign.collectives.quorum.SendRing`), until it comes to that step and takes it.

Every rank so applies the same bits and knows who was counted. Traffic per step for W packed
bytes, with ``k`` counted of M ranks: a counted rank sends and receives ``W (k-1)/k`` of signs,
sends ``2 W/k`` to each of the M-1 others and receives ``2 W (k-1)/k`` of results; a late rank
receives ``2 W``; the roll adds a word out and ``2 + ceil(M/64)`` words back. No rank carries
the ``(M-1) W`` that the server's root does: on a slow link and a large model this is the
quorum vote to use. The roll is one round trip more than the server's quorum vote, paid before
any sign moves.

The root (rank ``root``, which takes the roll) cannot be late: a slow root slows every rank.
"""

from __future__ import annotations

import numpy as np

from .base import Pending, SignVote
from .quorum import QuorumVote, SendRing
from .sharded import shard_bounds

__all__ = ["ShardedQuorumVote"]

SIGNS, PIECES = 2, 3   # message phases, in the roll's channel (whose phases 0 and 1 are its own)


class _Pending(Pending):
    # The roll in flight; the counted ranks; the shard bounds; the k x (own shard) rows; the
    # W x 2 result.
    __slots__ = ("roll", "counted", "bounds", "rows", "result")


class ShardedQuorumVote(SignVote):
    """The sharded vote among the ranks counted by a roll at ``root`` (see the module
    docstring). ``counted``, ``abstained``, ``late_streak`` and ``dropped`` are the roll's, as
    :class:`QuorumVote` keeps them."""

    name = "sharded"
    pending_type = _Pending

    def __init__(self, comm, timeout=None, tally=None, quorum: int | None = None,
                 grace: float = 0.0, root: int = 0):
        super().__init__(comm, timeout, tally)
        self.roll = QuorumVote(comm, self.timeout, quorum=quorum, grace=grace, root=root)
        # The pieces sent to late ranks stay in flight until they take them.
        self._ring = SendRing(self.roll.max_lag, self.timeout)
        self._none = np.empty(0, dtype=np.uint64)   # the roll's words: it carries no sign

    counted = property(lambda self: self.roll.counted)
    abstained = property(lambda self: self.roll.abstained)
    late_streak = property(lambda self: self.roll.late_streak)
    dropped = property(lambda self: self.roll.dropped)
    quorum = property(lambda self: self.roll.quorum)
    channel = property(lambda self: self.roll.channel)   # its tags' block on the communicator

    @property
    def tie_possible(self) -> bool:
        return True   # the number of voters varies: the tie plane always travels

    def result_waiting(self, bucket: int = 0) -> bool:
        """Whether the roll of this rank's coming vote has closed without it (a probe, no
        wait); False on the root."""
        return self.roll.result_waiting(bucket)

    def _tag(self, pending, phase: int) -> int:
        return self.roll.channel_tag(pending.bucket, phase)

    # -- a vote ------------------------------------------------------------------------------
    def _start(self, p):
        if not isinstance(p.words, np.ndarray):
            raise ValueError("a quorum vote runs on host words: the words of a GPU path are "
                             "not supported with quorum= yet")
        # Step 1: this rank is here; the shards wait for the roll's answer.
        p.roll = self.roll.start(self._none, 0, step=p.step, bucket=p.bucket)

    def _finish(self, p):
        self.roll.finish(p.roll)
        p.counted = p.roll.counted
        roll = self.roll.traffic   # the roll's bytes are this vote's
        self.traffic.sent += roll.sent
        self.traffic.received += roll.received
        roll.sent = roll.received = 0
        w = p.words.shape[0]
        p.bounds = shard_bounds(w, len(p.counted))
        owners = p.counted   # the i-th counted rank owns shard i
        place = self._ring.take(p.bucket, f"sharded quorum vote at step {p.step} on rank "
                                          f"{self.rank}")
        p.result = self._buffer(p, f"result{place}", (w, 2))
        if self.rank in owners:
            self._exchange_signs(p, owners.index(self.rank))
        # Step 3's receives: every piece this rank does not own, from its owner.
        b = p.bounds
        for i, owner in enumerate(owners):
            if owner != self.rank:
                self._irecv(p, p.result[b[i]: b[i + 1]], owner, PIECES)
        if self.rank in owners:   # to late ranks: completed when the place comes round
            self._ring.leave(p.bucket, place, *self._send_piece(p, owners.index(self.rank)))
        self._wait(p, "the voted pieces, from their owners and to the counted ranks")
        return self._split(p, p.result)

    def _exchange_signs(self, p, me: int) -> None:
        """Step 2, on a counted rank: shard i of its signs to the i-th counted rank, and its
        own shard of every counted rank's signs into a row each."""
        owners, b = p.counted, p.bounds
        k = len(owners)
        p.rows = self._buffer(p, "rows", (k, b[me + 1] - b[me]))
        p.rows[me] = p.words[b[me]: b[me + 1]]
        for i, r in enumerate(owners):
            if r != self.rank:
                self._irecv(p, p.rows[i], r, SIGNS)
                self._isend(p, p.words[b[i]: b[i + 1]], r, SIGNS)
        self._wait(p, "the counted ranks' shards of signs")

    def _send_piece(self, p, me: int) -> tuple:
        """Step 3, on a counted rank: the majority of the k rows of its shard, sent to every
        other rank. The sends to the counted ranks join ``p``'s requests: they are taking
        their pieces now, and a large message needs this rank's progress to move (a
        rendezvous), so the vote waits for them. Those to the late ranks are returned
        (requests, peers), to stay in flight. Bits past n only occur in the last shard."""
        lo, hi = p.bounds[me], p.bounds[me + 1]
        n_here = max(0, min(p.n - 64 * lo, 64 * (hi - lo)))
        plus, tie = self.tally(p.rows, n_here)
        piece = p.result[lo:hi]
        piece[:, 0] = plus
        piece[:, 1] = 0 if tie is None else tie
        for r in p.counted:
            if r != self.rank:
                self._isend(p, piece, r, PIECES)
        now = p.requests, p.peers
        p.requests, p.peers = [], []
        for r in range(self.size):
            if r not in p.counted:
                self._isend(p, piece, r, PIECES)
        later = p.requests, p.peers
        p.requests, p.peers = now
        return later

    # -- the end -----------------------------------------------------------------------------
    def drain(self) -> None:
        """Collective, after the last vote (every rank has voted as often): the roll's late
        messages taken (:meth:`QuorumVote.drain`), and every piece still in flight completed
        (each rank has taken all of its pieces by its last vote). Bounded."""
        self.roll.drain()
        self._ring.drain(f"sharded quorum vote's drain on rank {self.rank}: pieces in flight")

    def pending_requests(self) -> int:
        """Requests of this collective not yet completed (0 after :meth:`drain`)."""
        return self.roll.pending_requests() + self._ring.pending()
