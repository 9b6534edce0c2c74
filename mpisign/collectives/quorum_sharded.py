"""Sharded quorum vote: the sharded vote among the ranks that a roll call at the root counts.

In the plain sharded vote every rank owns a shard and tallies it, so a late rank would hold up
its own shard whatever the quorum. Here the owners are chosen per step among the ranks that a
roll call counts (:mod:`mpisign.collectives.roll`: the roll, the late ranks' results in flight):

1. **The roll**: every rank learns the same ``k`` counted ranks.
2. **The counted ranks shard the words among themselves**: the i-th counted rank owns shard i
   of ``k`` (:func:`mpisign.collectives.sharded.shard_bounds`), and each counted rank sends
   shard i of its signs to its owner. A late rank sends no sign at all.
3. **Each owner tallies its shard** over the ``k`` rows and sends its piece of the result to
   every other rank. The counted ones take it at once, and the owner waits for those sends (a
   large message moves only while its sender is in MPI). A late rank's copy stays in flight
   until it comes to that step and takes it.

Every rank so applies the same bits and knows who was counted. Traffic per step for W packed
bytes, with ``k`` counted of M ranks: a counted rank sends and receives ``W (k-1)/k`` of signs,
sends ``2 W/k`` to each of the M-1 others and receives ``2 W (k-1)/k`` of results; a late rank
receives ``2 W``; the roll adds a word out and ``2 + ceil(M/64)`` words back. No rank carries
the ``(M-1) W`` that the server's root does: on a slow link and a large model this is the
quorum vote to use.
"""

from __future__ import annotations

from .roll import RollCallVote, RollPending
from .sharded import shard_bounds

__all__ = ["ShardedQuorumVote"]

SIGNS, PIECES = 0, 1   # message phases, in the vote's own channel of tags


class _Pending(RollPending):
    # The shard bounds; the k x (own shard) rows.
    __slots__ = ("bounds", "rows")


class ShardedQuorumVote(RollCallVote):
    """The sharded vote among the ranks counted by a roll at ``root`` (see the module
    docstring)."""

    name = "sharded"
    pending_type = _Pending

    def _vote_among(self, p) -> tuple[list, list]:
        owners = p.counted   # the i-th counted rank owns shard i
        p.bounds = b = shard_bounds(p.words.shape[0], len(owners))
        if self.rank in owners:
            self._exchange_signs(p, owners.index(self.rank))
        # Step 3's receives: every piece this rank does not own, from its owner.
        for i, owner in enumerate(owners):
            if owner != self.rank:
                self._irecv(p, p.result[b[i]: b[i + 1]], owner, PIECES)
        if self.rank not in owners:
            return [], []
        return self._send_piece(p, owners.index(self.rank))

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

    def _send_piece(self, p, me: int) -> tuple[list, list]:
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

        def to_the_late():
            for r in p.late:
                self._isend(p, piece, r, PIECES)
        return self._aside(p, to_the_late)
