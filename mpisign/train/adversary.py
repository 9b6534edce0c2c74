r"""Blind multiplicative adversaries: workers that corrupt their gradient before it is sent.

Bernstein et al. (ICLR 2019), Section 4: an adversary multiplies its gradient estimate
elementwise by a vector v that is not conditioned on the estimate itself:

.. math::
    \tilde g_i = v \odot g_i

Majority vote converges while fewer than half the workers do this; a mean over workers (the
fp32 allreduce baseline) is wrecked by a single one (``scale``, ``inf``, ``nan``).

==========  ===============================================  =============================
attack      v                                                 what majority vote sees
==========  ===============================================  =============================
invert      -1                                                every vote flipped
random      +-1, fresh uniform draws every call               a coin-flip vote
scale       ``factor`` (default 1e20; try 1e-20)               nothing: signs are unchanged
inf         +inf (0 * inf is NaN)                             non-finite: counted, voted as 0
nan         NaN                                               non-finite: counted, voted as 0
zero        0                                                 a zero vote (the zero rule)
==========  ===============================================  =============================

In ``python -m mpisign.train --adversaries K --attack NAME`` the first K ranks apply the attack
to every parameter's ``.grad`` after the backward pass, before the vote (or allreduce).

    attack = make_attack("random", generator=torch.Generator().manual_seed(1))
    for p in model.parameters():
        if p.grad is not None:
            attack(p.grad)          # in place

One attack is *not* blind, to be honest about the limits: :class:`Omniscient` (``--attack
omniscient``) lets the adversaries see the honest ranks' votes before they send their own, and
send the opposite of the honest majority. The theory does not cover it. With K adversaries and
H = M - K honest ranks, a coordinate on which ``a`` honest ranks vote "+" gets ``a`` votes for "+"
in all: it keeps the honest sign only where the honest ranks agree by more than K votes
(``|2a - H| > K``), ties (even M) where ``|2a - H| = K``, and flips where they are split more
closely. With 3 of 7: a 4-0 honest coordinate survives, a 3-1 one flips, a 2-2 one is decided
by the adversaries' zero-rule bits (which alternate with the step).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from mpi4py import MPI

from ..optim import Signum
from ..vote import majority_vote

__all__ = ["ATTACKS", "NON_BLIND_ATTACKS", "make_attack", "attack_gradients", "Omniscient"]

ATTACKS = ("invert", "random", "scale", "inf", "nan", "zero")
#: Attacks that read the honest ranks' gradients: collective, see :class:`Omniscient`.
NON_BLIND_ATTACKS = ("omniscient",)

Attack = Callable[[torch.Tensor], None]


def make_attack(name: str, *, generator: torch.Generator | None = None,
                factor: float = 1e20) -> Attack:
    """An in-place ``attack(grad)`` for ``name`` (one of :data:`ATTACKS`).

    ``generator`` drives ``random`` (a CPU ``torch.Generator``; keep its state in checkpoints
    for reproducible runs); ``factor`` is the multiplier of ``scale``.
    """
    if name in NON_BLIND_ATTACKS:
        raise ValueError(f"{name!r} is not blind: it needs every rank's gradient, use "
                         f"Omniscient(comm, adversaries)")
    if name not in ATTACKS:
        raise ValueError(f"attack must be one of {ATTACKS}, got {name!r}")
    if name == "invert":
        return lambda g: g.neg_()
    if name == "scale":
        if not factor > 0:
            raise ValueError(f"the scale factor must be > 0, got {factor!r}")
        return lambda g: g.mul_(factor)
    if name == "inf":
        return lambda g: g.mul_(float("inf"))
    if name == "nan":
        return lambda g: g.fill_(float("nan"))
    if name == "zero":
        return lambda g: g.zero_()
    gen = generator if generator is not None else torch.Generator()

    def random_signs(g: torch.Tensor) -> None:
        # Drawn on the CPU so a seeded generator gives the same signs on any device.
        v = torch.randint(0, 2, g.shape, generator=gen, dtype=torch.int8).mul_(2).sub_(1)
        g.mul_(v.to(device=g.device, dtype=g.dtype))

    return random_signs


def attack_gradients(params, attack: Attack) -> None:
    """Apply ``attack`` in place to the ``.grad`` of every parameter that has one."""
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                attack(p.grad)


class Omniscient:
    r"""The non-blind attack: the first ``adversaries`` ranks of ``comm`` send the opposite of
    what the honest ranks agree on, computed from the honest ranks' own gradients.

    Called on every rank of ``comm`` after the backward pass and before the optimizer's step
    (it is collective), it does:

    1. Each rank takes what it would send if honest: for :class:`mpisign.Signum` the momentum it
       is about to vote with, :math:`\beta m_i + (1 - \beta) g_i` (NaN/inf entries as 0, as
       Signum treats them); for any other optimizer (the fp32 allreduce baseline) its gradient.
    2. The honest ranks alone combine theirs on a sub-communicator: a majority vote
       (:func:`mpisign.majority_vote`, ``topology``) for Signum, an fp32 sum for the baseline.
    3. The first honest rank broadcasts the result to every rank (int8 signs or fp32 mean).
    4. Each adversary sets its ``.grad`` to minus the honest majority (and zeroes its momentum
       buffer, so that the sign it sends is exactly that), or to minus the honest mean.

    Cost: one extra vote among the honest ranks plus a broadcast of ``d`` bytes (fp32 mean:
    ``4 d``) per step, on top of the real vote: a simulation of an adversary that eavesdrops
    on every honest worker, not something a real adversary gets for free.

    Against the vote (Signum): where ``a`` of the ``H`` honest ranks vote "+", the adversaries
    all vote against the honest majority, so the honest sign wins only if ``|2a - H| > K``
    (a tie if equal, M even; flipped if less); where the honest ranks tie, the adversaries
    send 0, i.e. the zero rule's alternating bit.
    Against the mean: the step is ``(M - 2K) / M`` times the honest mean, slower but not
    reversed while ``K < M / 2`` (the mean needs no cleverness to break: ``scale``, ``inf``).

    Args:
        comm: the intracommunicator the optimizer votes (or averages) over.
        adversaries: K, the ranks ``0 .. K-1`` attack; at least one rank must be honest.
        topology: how the honest ranks' vote travels (any key of ``mpisign.TOPOLOGIES``).
        timeout: seconds the honest vote waits on its peers (default as ``majority_vote``).
    """

    def __init__(self, comm, adversaries: int, *, topology: str = "server",
                 timeout: float | None = None):
        size = comm.Get_size()
        if not isinstance(adversaries, int) or not 0 < adversaries < size:
            raise ValueError(f"the omniscient attack needs 0 < adversaries < {size} (the ranks "
                             f"of comm): someone must be honest to copy; got {adversaries!r}")
        self.comm = comm
        self.adversaries = adversaries
        self.topology = topology
        self.timeout = timeout
        self.rank = comm.Get_rank()
        self.is_adversary = self.rank < adversaries
        # The honest ranks' own communicator (COMM_NULL on adversaries); collective on comm.
        self.honest = comm.Split(MPI.UNDEFINED if self.is_adversary else 0, key=self.rank)

    def __call__(self, optimizer, step: int) -> None:
        """Attack the ``.grad`` of ``optimizer``'s parameters in place; collective on comm."""
        voting = isinstance(optimizer, Signum)
        params = [(p, g.get("momentum", 0.0)) for g in optimizer.param_groups
                  for p in g["params"] if p.requires_grad]
        if not params:
            return
        # Step 1: what each rank would send if it were honest.
        flat = torch.cat([self._would_send(p, beta if voting else 0.0, optimizer).reshape(-1)
                          for p, beta in params])
        # Step 2: the honest ranks combine theirs, among themselves.
        if voting:
            shared = np.empty(flat.numel(), dtype=np.int8)
            if not self.is_adversary:
                majority = majority_vote(flat, self.honest, self.topology, step=step,
                                         timeout=self.timeout)
                shared[:] = majority.numpy()
        else:
            shared = flat.to(torch.float32).numpy().copy()
            if not self.is_adversary:
                # Wait on MPI: the honest sum, in fp32 like the baseline's own allreduce.
                self.honest.Allreduce(MPI.IN_PLACE, shared, op=MPI.SUM)
                shared /= self.comm.Get_size() - self.adversaries
        # Step 3: the first honest rank tells everyone. Wait on MPI: adversaries need it now.
        self.comm.Bcast(shared, root=self.adversaries)
        if not self.is_adversary:
            return
        # Step 4: the adversaries send the opposite.
        opposite = -torch.from_numpy(shared)
        start = 0
        with torch.no_grad():
            for p, beta in params:
                n = p.numel()
                p.grad = opposite[start:start + n].to(p.dtype).view_as(p).to(p.device)
                start += n
                buf = optimizer.state[p].get("momentum_buffer") if voting else None
                if buf is not None:
                    buf.zero_()   # so its momentum is (1 - beta) * grad: the exact sign

    @staticmethod
    def _would_send(p: torch.Tensor, beta: float, optimizer) -> torch.Tensor:
        g = torch.zeros_like(p) if p.grad is None else \
            torch.nan_to_num(p.grad.detach(), nan=0.0, posinf=0.0, neginf=0.0)
        if not beta:
            return g.cpu()
        buf = optimizer.state[p].get("momentum_buffer")
        if buf is None:   # Signum's first step: its buffer starts at 0
            return g.mul(1 - beta).cpu()
        return buf.mul(beta).add_(g, alpha=1 - beta).cpu()   # Signum's own order of operations

    def free(self) -> None:
        """Release the honest ranks' communicator."""
        if self.honest != MPI.COMM_NULL:
            self.honest.Free()
