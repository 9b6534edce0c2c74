"""After a timeout, a roll call: the ranks that gave up agree on who is missing before they raise.

A wait that times out on a collective cannot tell which rank never came (``MPI_Iallgather``
names nobody), and a wait on a point-to-point message names only the peer this rank waited on:
with rank 2 stalled under a server vote, the root named rank 2 but the other workers, waiting on
the root, said nothing useful or blamed the root. So every rank that times out calls the roll:

1. it sends every other rank, on its own communicator (the optimizer's, majority_vote's) under
   a tag of its own (:data:`ROLL_TAG`), the step it gave up at;
2. it listens for the same from the others for ``grace`` seconds, or until every rank is heard;
3. the missing are the ranks it did not hear; it sends every other rank this verdict.

A peer that a point-to-point wait names ("no message from rank(s) [2]") is no proof: in a tree
a rank waits on its parent, which may itself wait on a stalled root. Only silence in the roll
call counts, which is why the listening does not stop early while some rank is unheard.

Ranks that time out within ``grace`` of one another hear one another, so they name the same
ranks. A stalled rank that wakes up later finds the calls and verdicts waiting for it
(:func:`check`, at the start of every step and before its votes are applied) and raises too,
naming itself, instead of applying a step the others did not. It looks (one ``MPI_Iprobe``) only
when it has been away longer than a quarter of the timeout since it last looked
(:class:`Watch`), which a rank that the others gave up on always was: an Iprobe that finds
nothing yields the core in an oversubscribed launch (90-220 us measured here, loaded), and a
healthy step never pays it.

The sends to a rank that never answers may never complete; their buffers are kept here for the
life of the process (a few bytes a rank), as MPI requires of a buffer in flight.
"""

from __future__ import annotations

import time

import numpy as np
from mpi4py import MPI

from .comm import VoteTimeout

__all__ = ["ROLL_TAG", "Verdict", "Waiting", "Watch", "call", "waiting", "grace_for",
           "after_timeout", "check"]

#: The roll call's tag: above every vote's (mpisign.collectives.base.TAG_BASE, the quorum
#: vote's channels), below the 32767 that MPI guarantees.
ROLL_TAG = 0x7F00
CALL, VERDICT = 0, 1   # word 0 of a message: what it is

_in_flight: list = []   # (request, buffer) of sends that may never complete


def grace_for(timeout: float) -> float:
    """How long a roll call listens: the ranks blocked on one stalled rank time out about a
    step apart, so the wait's own timeout, up to a minute."""
    return min(float(timeout), 60.0)


class Verdict:
    """What a roll call found: ``missing`` (the ranks not heard), the
    ``heard`` ranks and the step each gave up at."""

    def __init__(self, missing: list[int], heard: dict[int, int]):
        self.missing, self.heard = missing, heard

    def describe(self, rank: int) -> str:
        steps = sorted(set(self.heard.values()))
        who = (f"rank(s) {self.missing} did not answer (stalled or dead)" if self.missing else
               "every rank answered: none is missing, one was only slower than the timeout")
        return (f"roll call after the timeout: {who}; rank(s) {sorted(self.heard)} gave up "
                f"(at step(s) {steps})")


class Waiting:
    """Roll-call messages found waiting: ``calls`` (rank -> the step it gave up at) and
    ``verdicts`` (rank -> the ranks it found missing)."""

    def __init__(self):
        self.calls: dict[int, int] = {}
        self.verdicts: dict[int, list[int]] = {}
        self.failed = False   # a probe failed (a peer died under ULFM, a revoked communicator)

    def __bool__(self) -> bool:
        return bool(self.calls or self.verdicts)

    def describe(self, rank: int) -> str:
        gave_up = sorted(set(self.calls) | set(self.verdicts))
        named = sorted({r for missing in self.verdicts.values() for r in missing})
        text = f"rank(s) {gave_up} gave up after their timeout"
        if self.calls:
            text += f" (at step(s) {sorted(set(self.calls.values()))})"
        if rank in named:
            text += (" and named this rank missing: it did not answer in time (stopped, "
                     "swapping, in a debugger?)")
        elif named:
            text += f" and named rank(s) {named} missing"
        return text


def _message(kind: int, size: int, step: int, missing=()) -> np.ndarray:
    """``[kind, step, 1 for each missing rank]``: a call or a verdict."""
    msg = np.zeros(2 + size, dtype=np.int64)
    msg[:2] = kind, step
    for r in missing:
        msg[2 + r] = 1
    return msg


def call(comm: MPI.Intracomm, step: int, grace: float,
         already: Waiting | None = None) -> Verdict:
    """Tell every other rank of ``comm`` that this one gave up at ``step``, and hear the
    others for ``grace`` seconds, or until every rank is heard (``already``: calls received
    before, by :func:`waiting`)."""
    rank, size = comm.Get_rank(), comm.Get_size()
    _send_others(comm, _message(CALL, size, step))
    heard = {**(already.calls if already else {}), rank: step}
    deadline = time.monotonic() + grace
    while len(heard) < size and time.monotonic() < deadline:
        found = waiting(comm)
        heard.update(found.calls)
        if found.failed:
            break
        if not found:
            time.sleep(1e-3)
    missing = sorted(set(range(size)) - set(heard))
    _send_others(comm, _message(VERDICT, size, step, missing))
    return Verdict(missing, {r: s for r, s in sorted(heard.items())})


def _send_others(comm: MPI.Intracomm, msg: np.ndarray) -> None:
    """``msg`` to every other rank of ``comm``, its sends kept in flight (they may never
    complete: a stalled or dead peer)."""
    rank = comm.Get_rank()
    for r in range(comm.Get_size()):
        if r != rank:
            try:
                _in_flight.append((comm.Isend(msg, dest=r, tag=ROLL_TAG), msg))
            except MPI.Exception:   # a dead peer under ULFM: it is not heard, that is all
                pass


#: How long :func:`check` keeps probing once it is due: a message that has sat in a socket or a
#: shared-memory queue while this rank was stopped is matched only after a progress call or
#: two (the first probe after a SIGSTOP found nothing, and the rank applied one more step).
SETTLE_SECONDS = 0.05


def waiting(comm: MPI.Intracomm, settle: float = 0.0) -> Waiting:
    """The roll-call messages waiting on ``comm``, received: none, the usual case, after one
    local probe, or after probing for ``settle`` seconds."""
    found = Waiting()
    status = MPI.Status()
    size = comm.Get_size()
    msg = np.empty(2 + size, dtype=np.int64)
    until = time.monotonic() + settle
    while True:
        try:
            if not comm.Iprobe(source=MPI.ANY_SOURCE, tag=ROLL_TAG, status=status):
                if time.monotonic() >= until:
                    break
                continue
            source = status.Get_source()
            comm.Recv(msg, source=source, tag=ROLL_TAG)
        except MPI.Exception:
            # Under ULFM a wildcard probe fails once a peer has died (or the communicator was
            # revoked): not a roll call. The vote's own calls meet the failure, where an
            # elastic optimizer recovers from it.
            found.failed = True
            break
        if msg[0] == CALL:
            found.calls[source] = int(msg[1])
        else:
            found.verdicts[source] = [r for r in range(size) if msg[2 + r]]
    return found


class Watch:
    """When :func:`check` looks: only once this rank has been away from it longer than a
    quarter of the timeout. The others give up on a rank after waiting a whole timeout for it,
    so of the intervals between its looks that cover their wait, one is at least that long."""

    def __init__(self):
        self.last = time.monotonic()

    def due(self, timeout: float) -> bool:
        now = time.monotonic()
        due, self.last = now - self.last > timeout / 4, now
        return due


def after_timeout(comm: MPI.Intracomm, err: VoteTimeout, step: int, timeout: float,
                  who: str) -> VoteTimeout:
    """What to raise on a rank whose wait on ``comm`` timed out with ``err`` at ``step``: the
    same ``VoteTimeout``, with the roll call's verdict (a new call, or the verdicts waiting
    for a rank that was the stalled one). ``who``: this rank's caller in words, e.g. "Signum
    on rank 2"."""
    if err.rolled:
        return err
    found = waiting(comm)
    if found.verdicts:   # the others gave up long ago: this rank was the stalled one
        return gave_up(found, comm.Get_rank(), step, who)
    verdict = call(comm, step, grace_for(timeout), already=found)
    return VoteTimeout(f"{err}; {verdict.describe(comm.Get_rank())}", rolled=True)


def check(comm: MPI.Intracomm, step: int, timeout: float, who: str, watch: Watch) -> None:
    """Raise if some rank of ``comm`` has given up and called the roll: this rank was stalled
    past their timeout (its own wait may then complete from messages they left in flight), and
    must not apply a step that they did not. Nothing unless ``watch`` says a look is due; then
    probes for :data:`SETTLE_SECONDS`."""
    if not watch.due(timeout):
        return
    found = waiting(comm, SETTLE_SECONDS)
    if found:
        raise gave_up(found, comm.Get_rank(), step, who)


def gave_up(found: Waiting, rank: int, step: int, who: str) -> VoteTimeout:
    """The error of a rank that finds the others gave up (``found``) at ``step``."""
    return VoteTimeout(f"{who} at step {step}: {found.describe(rank)}; this rank raises too "
                       f"rather than apply a step that they did not", rolled=True)
