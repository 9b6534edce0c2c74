r"""Lion with a majority vote of the update signs: Distributed Lion, its "MaVo" form.

Lion (Chen et al., "Symbolic Discovery of Optimization Algorithms", NeurIPS 2023, Program 1)
moves every coordinate by exactly ``lr``, the sign of an interpolation of momentum and
gradient; Distributed Lion (Liu et al., NeurIPS 2024, arXiv 2404.00438) lets each worker take
that sign on its own momentum and combines the workers' signs by a majority vote, 1 bit a
coordinate each way. On each rank :math:`i`, per step:

.. math::
    c_i &\leftarrow \operatorname{sign}\big(\beta_1 m_i + (1 - \beta_1) g_i\big)
                                                         && \text{sent, 1 bit a coordinate} \\
    v   &\leftarrow \operatorname{sign}\Big(\sum_i c_i\Big)   && \text{majority, 0 on a tie} \\
    p   &\leftarrow p\,(1 - \eta\lambda) - \eta\, v        && \text{decoupled weight decay} \\
    m_i &\leftarrow \beta_2 m_i + (1 - \beta_2) g_i        && \text{after the sign is taken}

On one rank (``comm`` of size 1) this is Lion itself, rounded as the published PyTorch Lion
(PyPI's ``lion-pytorch``) rounds it: ``c = m * b1`` then ``c += (1 - b1) * g``; ``p *= 1 - lr *
wd`` then ``p += -lr * sign(c)``; ``m *= b2`` then ``m += (1 - b2) * g`` (tests/test_lion.py
compares them bit for bit, and says where timm's Lion rounds otherwise).

The math is :class:`LionRule`; the books :class:`mpisign.optim.books.SignOptimizer`; the vote
:mod:`mpisign.optim.engine`, the same as Signum's: every topology, overlap, elastic recovery,
the step header, GradScaler, the monitor. Its rules, as Signum's: a ``.grad`` that is None
counts as a zero gradient (the rank votes with ``b1 * m``, and ``m`` decays only if some rank
had the gradient); an exact 0 in ``c`` is sent as ``(rank + step) % 2``; non-finite gradient
entries count as 0 and in ``stats.nonfinite``. The momentum is ``state[p]["exp_avg"]``.
"""

from __future__ import annotations

import torch

from .books import SignOptimizer
from .rules import Rule, check_range, number

__all__ = ["Lion", "LionRule"]

_HALF = (torch.float16, torch.bfloat16)


class LionRule(Rule):
    """Lion's math (module docstring): what a rank sends, how a parameter moves."""

    hparams = ("lr", "betas", "weight_decay")
    value_names = ("lr", "beta1", "beta2", "weight_decay")

    def check(self, group: dict, where: str = "") -> None:
        check_range("lr", group["lr"], where)
        betas = group["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"{where}betas must be a pair (beta1, beta2), each in [0, 1), "
                             f"got {betas!r}")
        check_range("betas[0]", betas[0], where, below_one=True)
        check_range("betas[1]", betas[1], where, below_one=True)
        check_range("weight_decay", group["weight_decay"], where)

    def values(self, group: dict) -> list:
        b1, b2 = group["betas"]
        return [number(group["lr"]), number(b1), number(b2), number(group["weight_decay"])]

    @staticmethod
    def exp_avg(state, p: torch.Tensor) -> torch.Tensor:
        st = state[p]
        if "exp_avg" not in st:
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        return st["exp_avg"]

    def send(self, params: list, grads: list, state, group: dict, scale: float):
        """``c = b1 * m + (1 - b1) * g``, then ``m = b2 * m + (1 - b2) * g``. No gradient
        here: vote with ``b1 * m``, and decay ``m`` only once the vote says that some rank had
        this gradient (if none had, the parameter and its momentum stay as they are)."""
        b1, b2 = (number(b) for b in group["betas"])
        bufs = [self.exp_avg(state, p) for p in params]
        sources = [None] * len(params)
        here = [i for i, g in enumerate(grads) if g is not None]
        # Tensor by tensor, as the published Lion: torch's _foreach ops round float16 and
        # bfloat16 otherwise (and are a loop of these on the CPU anyway).
        for i in here:
            m, g = bufs[i], grads[i]
            sources[i] = m.mul(b1).add_(g, alpha=(1 - b1) * scale)
            m.mul_(b2).add_(g, alpha=(1 - b2) * scale)
        absent = [i for i, g in enumerate(grads) if g is None]
        if not absent:
            return sources, None
        for i in absent:
            sources[i] = bufs[i] * b1

        def after(voted: list) -> None:
            for i in absent:
                if voted[i]:
                    bufs[i].mul_(b2)
        return sources, after

    def move(self, backend, p: torch.Tensor, plus, tie, group: dict) -> None:
        """``p = p * (1 - lr * wd) - lr * v``: Lion's decoupled weight decay. A float16 or
        bfloat16 parameter steps by ``lr`` rounded to its dtype, as torch's ``add_(v,
        alpha=-lr)`` rounds ``alpha`` there (on every device alike here)."""
        lr = number(group["lr"])
        step = float(torch.tensor(lr, dtype=p.dtype)) if p.dtype in _HALF else lr
        backend.apply_decayed(p, plus, tie, step, 1.0 - lr * number(group["weight_decay"]))

    def fused(self, backend):
        """The backend's ``lion_update_and_pack``: :meth:`send` of this class, the scrub and
        the pack in one pass, where every parameter has its gradient here. A subclass that
        changes ``send`` computes something else: none."""
        kernel = getattr(backend, "lion_update_and_pack", None)
        if kernel is None or type(self).send is not LionRule.send:
            return None

        def lion_update_and_pack(params, grads, state, group, scale, zero_bit, outs,
                                 zeros=None):
            if any(g is None for g in grads):
                return None
            b1, b2 = (number(b) for b in group["betas"])
            return kernel(grads, [self.exp_avg(state, p) for p in params],
                          b1, (1 - b1) * scale, b2, (1 - b2) * scale, zero_bit, outs,
                          **({"zeros": zeros} if zeros else {}))
        return lion_update_and_pack


class Lion(SignOptimizer):
    """Lion with a majority vote of the update signs over ``comm`` (Distributed Lion, MaVo).

    Args:
        params: parameters or param groups, as for any ``torch.optim.Optimizer``.
        lr: step size: every coordinate moves by exactly ``lr`` or 0, plus weight decay. Lion
            wants an lr 3-10x smaller than AdamW's (its authors).
        betas: ``(beta1, beta2)``, each in [0, 1): beta1 interpolates the sent sign between
            momentum and gradient, beta2 is the momentum's decay.
        weight_decay: lambda, decoupled: ``p *= 1 - lr * lambda`` before the step; 3-10x
            AdamW's (its authors).
        comm, topology, timeout, check_every, overlap, bucket_mb, monitor, elastic, min_ranks:
            as :class:`mpisign.Signum` documents them. On a communicator of size 1 this is
            plain Lion with no MPI traffic.
    """

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0,
                 comm=None, topology: str = "server", **options):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay),
                         LionRule(), comm, topology, **options)
