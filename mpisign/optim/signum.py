r"""Signum and signSGD with majority vote over MPI.

Bernstein, Zhao, Azizzadenesheli, Anandkumar, "signSGD with majority vote is communication
efficient and fault tolerant", ICLR 2019, Algorithm 1, in the authors' own form:

.. math::
    m_i &\leftarrow \beta m_i + (1 - \beta) g_i           && \text{on each worker } i \\
    v   &\leftarrow \operatorname{sign}\Big(\sum_i \operatorname{sign}(m_i)\Big)
                                                           && \text{majority vote, 0 on a tie} \\
    p   &\leftarrow p - \eta\,(v + \lambda p)

The math is :class:`mpisign.optim.rules.SignumRule`; the books
:class:`mpisign.optim.books.SignOptimizer`; the vote :mod:`mpisign.optim.engine`. Momentum
buffers are in ``state[p]["momentum_buffer"]``, as in ``torch.optim.SGD``.

Documented rules:

* A ``.grad`` that is None counts as a zero gradient on that rank, so every rank always sends
  the same layout and no rank waits for a message that never comes. Parameters with
  ``requires_grad=False`` are left out of the layout (and never updated).
* A zero (or NaN) momentum coordinate is sent as ``(rank + step) % 2`` (see
  :mod:`mpisign.backends.packing`): coordinates that are zero on every rank do not drift.
* Non-finite gradient entries (NaN, +-inf) are replaced by 0 before the momentum update and
  counted in ``stats.nonfinite``: a rank with a broken gradient keeps at most its one vote, and
  no NaN or inf ever enters the momentum or the weights.
"""

from __future__ import annotations

from .books import SignOptimizer
from .engine import VoteStats
from .header import HyperparameterMismatch, LayoutMismatch, ParameterDivergence, StepMismatch
from .recovery import TooFewRanks
from .rules import SignumRule, number

__all__ = ["Signum", "SignSGD", "LayoutMismatch", "ParameterDivergence",
           "HyperparameterMismatch", "StepMismatch", "TooFewRanks", "VoteStats"]


class Signum(SignOptimizer):
    """Signum (momentum sign descent) with a majority vote of the signs over ``comm``.

    Args:
        params: parameters or param groups, as for any ``torch.optim.Optimizer``.
        lr: step size (every coordinate moves by exactly ``lr`` or 0, plus weight decay).
        momentum: beta of the local momentum, in [0, 1); 0 gives signSGD.
        weight_decay: lambda, applied as ``p -= lr * (v + lambda * p)``, outside the vote.
        comm: mpi4py intracommunicator; None means ``MPI.COMM_WORLD``. On a communicator of
            size 1 this is plain single-worker Signum with no MPI traffic. Or a
            ``torch.distributed`` process group, for a job without MPI (what it takes:
            :mod:`mpisign.optim.grouped`).
        topology: how the vote travels, a key of :data:`mpisign.TOPOLOGIES`: ``"server"`` (the
            paper's), ``"tree"``, ``"sharded"``, ``"allgather"``, ``"hierarchical"`` (exact
            counts inside each node, far fewer bytes between nodes); or ``"auto"``: the cost
            model's choice for this model's size, the number of ranks and the measured link
            (measured at the first step, logged once; see ``topology_used``).
        timeout: seconds a vote waits on its peers before raising ``VoteTimeout``
            (default ``$MPISIGN_TIMEOUT`` or 300).
        check_every: every this many steps, check that all ranks hold identical parameters
            (:meth:`check_consistency`); 0 turns it off.
        overlap: start each bucket's vote from a gradient hook as soon as the backward pass has
            produced all of the bucket's gradients, so communication overlaps the rest of the
            backward pass. Needs exactly one backward pass per ``step()`` (no gradient
            accumulation). Results are bit-identical to ``overlap=False``.
        bucket_mb: with ``overlap``, the size of a bucket in MiB of fp32 gradient (as DDP's
            ``bucket_cap_mb``); without it, all parameters travel as one message.
        monitor: a :class:`mpisign.optim.detection.DisagreementMonitor`: every step, the ranks
            exchange their disagreement fractions (one float each) into
            ``stats.disagreement_by_rank``, and the monitor flags outliers (``stats.suspects``).
            On several ranks the fractions travel in the next step's header, at no cost of
            their own: after step k, ``disagreement_by_rank`` holds step k-1's (on one rank,
            step k's).
        elastic: survive dead ranks (needs ULFM: Open MPI 5 started with ``mpirun --with-ft
            ulfm``; else :class:`mpisign.mpi.elastic.ElasticUnavailable` here). When a rank
            dies during a vote, the survivors shrink the communicator, agree on what each of
            them already applied, and redo the step's vote among themselves: no step is lost
            and their parameters stay bit-identical. ``opt.comm`` becomes the survivors'
            communicator and ``stats.lost_ranks`` names the dead (see
            :mod:`mpisign.optim.recovery`).
        min_ranks: with ``elastic``, the fewest survivors to carry on with (default 1: a vote
            has no quorum); below it every survivor raises :class:`TooFewRanks`.
        quorum: close each step's vote once this many ranks have voted (an int, or a fraction
            of the ranks, rounded up), plus up to ``grace`` seconds for the rest: a late rank
            abstains, and every rank applies the same result (``stats.counted`` names the ranks
            counted, ``stats.abstentions`` counts each rank's missed votes). A rank that fell
            behind can catch up: ``if opt.late(): opt.skip()`` takes the closed step without
            computing it. After the last step, ``opt.drain()`` (collective) leaves nothing
            pending. Needs any ``topology`` but ``"allgather"`` and ``"auto"``, and
            ``overlap=False``; a rank's own mistake is raised on every rank ``lag`` steps on,
            and every parameter needs a gradient at every step (see
            :mod:`mpisign.optim.quorate`). With ``elastic``, a dead rank is survived as without
            a quorum: the survivors go on from the furthest of them, and as many of them may be
            late as before (the quorum stays a majority of them; a rank that is only slow is
            never taken for dead). Default: every rank.
        grace: with ``quorum``, seconds the vote waits for the rest once the quorum is in.
        allow_minority: allow a ``quorum`` of half the ranks or fewer (a majority of a
            minority: not the paper's guarantee against adversarial ranks).
        lag: with ``quorum``, the steps after which each step's header is checked: how far a
            late rank may fall behind before the others wait for it, and how many steps on a
            rank's own mistake is raised on every rank (default 2).
        grad_scaler: the ``torch.amp.GradScaler`` that scales this optimizer's loss, for
            ``overlap=True``: the gradient hooks run in backward, before ``scaler.step(opt)``
            tells the optimizer the scale, and ask the scaler for it instead (bit for bit
            ``overlap=False``). Without it, GradScaler under overlap is refused at the first
            step whose hooks packed. Not needed without overlap.
    """

    def __init__(self, params, lr: float = 1e-4, momentum: float = 0.9,
                 weight_decay: float = 0.0, comm=None, topology: str = "server", **options):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay),
                         SignumRule(), comm, topology, **options)


class _SignSGDRule(SignumRule):
    """Signum's rule with the momentum held at 0, and a clear word when something writes it."""

    def check(self, group: dict, where: str = "") -> None:
        super().check(group, where)
        if number(group["momentum"]) != 0.0:
            raise ValueError(
                f"SignSGD has no momentum, but {where or 'the '}momentum is "
                f"{group['momentum']!r}: something wrote it (OneCycleLR and CyclicLR do, "
                f"unless cycle_momentum=False). Use Signum for momentum, or "
                f"cycle_momentum=False.")


class SignSGD(Signum):
    """signSGD with majority vote: :class:`Signum` with ``momentum=0`` (the sign of the
    gradient itself is sent). ``momentum`` is accepted only as 0, for code that builds
    optimizers from one config. Options as for :class:`Signum`."""

    def __init__(self, params, lr: float = 1e-4, weight_decay: float = 0.0, comm=None,
                 topology: str = "server", momentum: float = 0.0, **options):
        if number(momentum) != 0.0:
            raise ValueError(f"SignSGD has no momentum (it sends the sign of the gradient "
                             f"itself), got momentum={momentum!r}: use Signum for momentum")
        SignOptimizer.__init__(self, params, dict(lr=lr, momentum=0.0, weight_decay=weight_decay),
                               _SignSGDRule(), comm, topology, **options)
