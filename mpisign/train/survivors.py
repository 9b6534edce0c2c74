"""``mpisign.train --elastic``: the run carries on when ranks die.

The optimizer survives a dead rank on its own (``Signum(elastic=True)``, see
:mod:`mpisign.optim.recovery`): at the next vote the survivors shrink their communicator, agree on
the step and finish it together. The rest of the run follows it here:

* the run's own collectives (the stop-signal agreement, the step records' and the epoch's
  sums, the evaluation, the checkpoint) go through :class:`Survivor`: one that meets a dead rank
  revokes the run's communicator, so that every survivor's next collective on it fails too, and
  is skipped (no stop, no record, figures of NaN, no checkpoint this time), on every survivor.
  The optimizer's next vote, or its consistency check at an epoch's end, then finds the
  dead rank itself and recovers;
* after each step, :meth:`Survivor.follow` moves the run onto the optimizer's new communicator: the
  stop-signal agreement, the metrics file (rank 0 may be a new rank), and from the next epoch
  the data, which is resharded over the survivors. An ``elastic`` record in ``metrics.jsonl``
  names the lost ranks (as ranks of the launch), the step and the new world size, and the
  checkpoints written after it record that world size.

**Under --quorum** the survivors may be steps apart when a rank dies: a late one was behind,
and the optimizer's recovery brought it forward to the furthest survivor's step (see
:mod:`mpisign.optim.recovery`). Its loop has not run the steps it was brought over, and the
others' records, checkpoints and stop agreements of those steps were on the old communicator
(they failed there, as the late rank never joined them). So where the survivors follow the
optimizer, they first agree where they stand in the loop: a step count, and whether they are
after a step's update or at an epoch's end after its check (the two places a recovery returns
to the loop). One that is behind takes the furthest's place (:attr:`Run.joined`): its step
count jumps, its batches go on from there, and if the others are at an epoch's end it joins
them after the check, without the sums and the evaluation they skipped. The stop agreement is
made anew on every survivor at that place, with the same lag, and a signal that any survivor
had agreed on is kept.

The run's schedule stays as the first launch set it: the steps in an epoch and in all, so the
learning rate, the checkpoints and ``--max-steps`` mean what they meant. With fewer ranks a
step sees fewer examples, and an epoch of the same steps covers that much less of the data.
"""

from __future__ import annotations

import logging

import numpy as np
from mpi4py import MPI

from .adversary import NON_BLIND_ATTACKS
from ..mpi.comm import bounded
from ..mpi.elastic import ElasticUnavailable, abandon, is_failure, require_ulfm, revoke
from .checkpoint import StopRequest
from .metrics import Metrics
from .options import ALLREDUCE, VOTING, UsageError

__all__ = ["check_elastic", "guard", "Survivor", "Unguarded", "AFTER_UPDATE", "AFTER_CHECK"]

log = logging.getLogger("mpisign.train")

# Where a survivor stands in the loop when it follows the optimizer onto the survivors, in
# the loop's order: after a step's update, or at an epoch's end after the parameters' check.
AFTER_UPDATE, AFTER_CHECK = 0, 1


def check_elastic(args) -> None:
    """--elastic's requirements, the same verdict on every rank (before any collective)."""
    if not args.elastic:
        return
    if args.optimizer in ALLREDUCE:
        raise UsageError(f"--elastic needs a voting optimizer ({', '.join(VOTING)}): the "
                         f"allreduce of --optimizer {args.optimizer} cannot lose a rank")
    if args.attack in NON_BLIND_ATTACKS and args.adversaries:
        raise UsageError(f"--elastic does not support --attack {args.attack}: its collective "
                         f"of all ranks cannot lose one")
    try:
        require_ulfm()
    except ElasticUnavailable as e:
        raise UsageError(str(e)) from None


class Unguarded:
    """The run's collectives without --elastic: a dead rank ends the job (every survivor's
    bounded wait, or MPI itself, stops it)."""

    def __call__(self, fn, *args, default=None, what: str = "", **kwargs):
        return fn(*args, **kwargs)

    def follow(self, where: int = AFTER_UPDATE) -> None:
        pass


class Survivor(Unguarded):
    """The run's collectives in an --elastic run (see the module docstring)."""

    def __init__(self, run):
        self.run = run
        self.launch = run.comm.Get_group()   # the elastic record names ranks of the launch

    def __call__(self, fn, *args, default=None, what: str = "", **kwargs):
        """``fn(*args, **kwargs)``; a collective that meets a dead rank is skipped: the run's
        communicator is revoked (every survivor's collective on it then fails too) and
        ``default`` is returned."""
        run = self.run
        try:
            return fn(*args, **kwargs)
        except MPI.Exception as error:
            # Once the optimizer has lost ranks, the run's collectives that were in flight on
            # the old communicator may fail in any way (a survivor ahead of the others can even
            # send a message that another one takes for a different collective's: ERR_TRUNCATE).
            if not (run.opt.comm is not run.comm or is_failure(error, run.comm)):
                raise
            revoke(run.comm)
            log.warning("rank %d: %s met a dead rank at step %d: skipped (the optimizer's next "
                        "vote finds it and the survivors carry on)", run.rank,
                        what or fn.__name__, run.step)
            return default

    def follow(self, where: int = AFTER_UPDATE) -> None:
        """After the optimizer has lost ranks: move the run onto its survivors' communicator;
        ``where``: this rank's place in the loop (under --quorum the survivors join the
        furthest one's, see the module docstring)."""
        run = self.run
        if run.opt.comm is run.comm:
            return
        comm = run.opt.comm
        lost = list(run.opt.stats.lost_ranks)
        run.comm = comm
        caught = run.stop.abandon()
        abandon(record.request for record in run.records)   # on the old communicator: no record
        run.records.clear()
        behind = self._join_the_furthest(where) if run.config.quorum is not None else None
        run.stop = StopRequest(comm, timeout=run.config.vote_timeout, lag=run.stop.lag)
        run.stop.caught = caught
        if run.rank == 0 and run.metrics.f is None:   # rank 0 of the launch is gone
            run.metrics = Metrics(run.built.out / "metrics.jsonl", append=True)
        run.metrics.write(type="elastic", step=run.step, lost_ranks=lost, world_size=run.world,
                          **({} if behind is None else {"brought_forward": behind}),
                          time=run.elapsed())
        if run.rank == 0:
            log.warning("step %d: rank(s) %s of the launch lost; %d rank(s) carry on, data "
                        "resharded from the next epoch", run.step, lost, run.world)

    def _join_the_furthest(self, where: int) -> list[dict]:
        """--quorum: the survivors' places in the loop, agreed (collective over them); this
        rank takes the furthest's if it is behind, and the signal any of them agreed on.
        Returns the survivors that were behind: their rank in the launch and their step."""
        run = self.run
        mine = np.array([run.step, where, run.caught], dtype=np.int64)
        every = np.empty((run.world, mine.size), dtype=np.int64)
        bounded(run.comm.Iallgather(mine, every), f"rank {run.rank}: where each survivor is "
                f"in the loop", run.config.vote_timeout)
        step, place = max((int(s), int(p)) for s, p in every[:, :2])
        run.caught = int(every[:, 2].max())
        late = [r for r in range(run.world) if (every[r, 0], every[r, 1]) != (step, place)]
        group = run.comm.Get_group()
        launch = MPI.Group.Translate_ranks(group, late, self.launch)
        group.Free()
        behind = [{"rank": int(r), "step": int(every[s, 0])} for r, s in zip(launch, late)]
        if (run.step, where) == (step, place):
            return behind
        if where == AFTER_CHECK:   # a survivor past an epoch's end: it would have recovered there
            raise RuntimeError(f"rank {run.rank}: a survivor is at step {step}, past this "
                               f"rank's epoch end at step {run.step}, which the loop cannot allow")
        log.warning("rank %d: brought forward from step %d to step %d by the recovery%s",
                    run.rank, run.step, step, ", at the epoch's end" if place else "")
        run.step, run.joined = step, place
        return behind


def guard(config, run) -> Unguarded:
    """How the run's own collectives meet a dead rank: chosen once, by --elastic."""
    return Survivor(run) if config.elastic else Unguarded()
