"""The vote of one rank: its own signs. No message and no tally; not a topology a user picks,
but what the optimizer votes with on a communicator of size 1, so its step has one path."""

from __future__ import annotations

from .base import SignVote

__all__ = ["LocalVote"]


class LocalVote(SignVote):
    """``(words, None)``: one voter, no tie."""

    name = "local"

    def __init__(self, comm, timeout=None, tally=None):
        super().__init__(comm, timeout, tally)
        if self.size != 1:
            raise ValueError(f"LocalVote is for a communicator of one rank, not {self.size}")

    def _start(self, p):
        pass

    def _finish(self, p):
        return p.words, None
