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
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["ATTACKS", "make_attack", "attack_gradients"]

ATTACKS = ("invert", "random", "scale", "inf", "nan", "zero")

Attack = Callable[[torch.Tensor], None]


def make_attack(name: str, *, generator: torch.Generator | None = None,
                factor: float = 1e20) -> Attack:
    """An in-place ``attack(grad)`` for ``name`` (one of :data:`ATTACKS`).

    ``generator`` drives ``random`` (a CPU ``torch.Generator``; keep its state in checkpoints
    for reproducible runs); ``factor`` is the multiplier of ``scale``.
    """
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
