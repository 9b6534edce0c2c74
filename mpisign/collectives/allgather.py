"""Allgather vote: every rank receives every rank's packed signs and tallies them itself.

One round, no result to send back and no tie mask on the wire: each rank sends its ``n`` bits to
each of the ``M - 1`` others and receives as much. Its traffic grows with M, so it pays off only
for small M or small messages, where one round beats two (see :mod:`mpisign.collectives.costmodel`).
"""

from __future__ import annotations

from .base import Pending, SignVote

__all__ = ["AllgatherVote"]

VOTES = 0


class _Pending(Pending):
    __slots__ = ("gathered",)  # M x W: every rank's votes


class AllgatherVote(SignVote):
    """Every rank gets every packed vector (point-to-point) and takes the majority locally."""

    name = "allgather"
    pending_type = _Pending

    def _start(self, p):
        p.gathered = self._buffer(p, "gathered", (self.size, p.words.shape[0]))
        p.gathered[self.rank] = p.words
        for r in range(self.size):
            if r != self.rank:
                self._irecv(p, p.gathered[r], r, VOTES)
                self._isend(p, p.words, r, VOTES)

    def _finish(self, p):
        self._wait(p, "exchanging signs with every rank")
        return self.tally(p.gathered, p.n)
