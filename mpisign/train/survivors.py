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

The run's schedule stays as the first launch set it: the steps in an epoch and in all, so the
learning rate, the checkpoints and ``--max-steps`` mean what they meant. With fewer ranks a
step sees fewer examples, and an epoch of the same steps covers that much less of the data.
"""

from __future__ import annotations

import logging

from mpi4py import MPI

from .adversary import NON_BLIND_ATTACKS
from ..mpi.elastic import ElasticUnavailable, is_failure, require_ulfm
from .checkpoint import StopRequest
from .metrics import Metrics
from .options import ALLREDUCE, VOTING, UsageError

__all__ = ["check_elastic", "guard", "Survivor", "Unguarded"]

log = logging.getLogger("mpisign.train")


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

    def follow(self) -> None:
        pass


class Survivor(Unguarded):
    """The run's collectives in an --elastic run (see the module docstring)."""

    def __init__(self, run):
        self.run = run

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
            try:
                run.comm.Revoke()
            except MPI.Exception:
                pass
            log.warning("rank %d: %s met a dead rank at step %d: skipped (the optimizer's next "
                        "vote finds it and the survivors carry on)", run.rank,
                        what or fn.__name__, run.step)
            return default

    def follow(self) -> None:
        """After the optimizer has lost ranks: move the run onto its survivors' communicator."""
        run = self.run
        if run.opt.comm is run.comm:
            return
        comm = run.opt.comm
        lost = list(run.opt.stats.lost_ranks)
        run.comm = comm
        run.stop = StopRequest(comm, timeout=run.config.vote_timeout)   # elastic: no quorum
        if run.rank == 0 and run.metrics.f is None:   # rank 0 of the launch is gone
            run.metrics = Metrics(run.built.out / "metrics.jsonl", append=True)
        run.metrics.write(type="elastic", step=run.step, lost_ranks=lost, world_size=run.world,
                          time=run.elapsed())
        if run.rank == 0:
            log.warning("step %d: rank(s) %s of the launch lost; %d rank(s) carry on, data "
                        "resharded from the next epoch", run.step, lost, run.world)


def guard(config, run) -> Unguarded:
    """How the run's own collectives meet a dead rank: chosen once, by --elastic."""
    return Survivor(run) if config.elastic else Unguarded()
