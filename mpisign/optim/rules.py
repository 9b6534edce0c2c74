r"""Rules: the math of a sign method, apart from its books and its vote.

A rule is stateless. It says which hyperparameters a param group holds, which state it keeps
per parameter (in the optimizer's ``state[p]``), what each rank sends (the value whose sign
is packed, 1 bit a coordinate) and how a parameter moves once the vote is in. The vote engine
(:mod:`mpisign.optim.engine`) does everything else, the same for every rule: layout, packing,
the collective, the step header, gradient presence, overlap, recovery, statistics.

:class:`SignumRule` (Bernstein et al., ICLR 2019, Algorithm 1):

.. math::
    m_i &\leftarrow \beta m_i + (1 - \beta) g_i && \text{sent: } \operatorname{sign}(m_i) \\
    p   &\leftarrow p - \eta\,(v + \lambda p)   && v = \operatorname{sign}\Big(\sum_i
                                                     \operatorname{sign}(m_i)\Big)

with ``momentum=0`` the sign of the gradient itself is sent (signSGD).

A fused kernel is one implementation of one rule (:meth:`Rule.fused`): the engine asks for it
once per layout, and a rule whose ``send`` is not the one the kernel computes never gets it.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

__all__ = ["Rule", "SignumRule", "number", "check_range"]


def number(value) -> float | None:
    """``value`` as a float if torch would take it as a hyperparameter: a real number, a numpy
    scalar or a one-element tensor (a scheduler may write either); else None."""
    if type(value) is float or type(value) is int:
        return float(value)   # the usual case, read about 25 times a step: no ABC check
    if isinstance(value, bool):
        return None
    if isinstance(value, torch.Tensor):
        return float(value) if value.numel() == 1 and not value.is_complex() else None
    if isinstance(value, (numbers.Real, np.floating, np.integer)):
        return float(value)
    return None


def check_range(name: str, value, where: str = "", below_one: bool = False) -> float:
    """``value`` as a float, or ValueError: a finite number >= 0 (and < 1 with ``below_one``)."""
    if isinstance(value, torch.Tensor) and value.numel() != 1:   # torch.optim's own words
        raise ValueError(f"{where}Tensor {name} must be 1-element, got {value.numel()} elements")
    x = number(value)
    if below_one:
        if x is None or not 0.0 <= x < 1.0:
            raise ValueError(f"{where}{name} must be in [0, 1), got {value!r}")
    elif x is None or not math.isfinite(x) or x < 0:
        raise ValueError(f"{where}{name} must be a finite number >= 0, got {value!r}")
    return x


class Rule:
    """The interface. A new sign optimizer is a rule plus a thin class of books; the recipe:

    1. subclass :class:`Rule`; name its hyperparameters in ``hparams`` (keys of a param group;
       ``lr`` first) and check them in :meth:`check`;
    2. :meth:`send`: from each parameter's gradient (cleaned of NaN/inf, unscaled by
       ``scale``; None where this rank has none), the tensor whose sign this rank sends,
       updating the state the rule keeps in ``state[p]``; return also what must wait for the
       vote (or None);
    3. :meth:`move`: how a parameter moves given the packed vote, through the backend's
       ``apply`` (``p -= lr * (v + wd * p)``) or your own;
    4. subclass :class:`mpisign.optim.books.SignOptimizer`, pass ``defaults`` and the rule;
    5. add it to the contract tests (tests/test_rules.py shows a toy rule on 3 ranks).
    """

    #: The hyperparameters of a param group this rule reads: validated, compared across ranks
    #: by the step header (a digest of all; the first three values by value, to name them in
    #: errors).
    hparams: tuple = ("lr", "weight_decay")

    @property
    def value_names(self) -> tuple:
        """The names of :meth:`values`, in order: :attr:`hparams` unless a hyperparameter
        holds several numbers (Lion's ``betas``)."""
        return self.hparams

    def check(self, group: dict, where: str = "") -> None:
        """Raise ValueError (before any communication) for a bad hyperparameter in ``group``."""
        check_range("lr", group["lr"], where)
        check_range("weight_decay", group["weight_decay"], where)

    def values(self, group: dict) -> list:
        """``group``'s hyperparameters as floats, in the order of :attr:`value_names`."""
        return [number(group[name]) for name in self.hparams]

    def send(self, params: list, grads: list, state, group: dict, scale: float):
        """``(sources, after)``: the tensor each parameter votes with (its sign is sent; an
        exact 0 or NaN is sent as the zero rule's bit), and None or a function
        ``after(voted)`` the engine calls once it knows, for each parameter, whether some rank
        had its gradient (``voted[i]``; a parameter that no rank has a gradient for does not
        move). ``grads[i]`` is None where this rank has no gradient; ``scale`` multiplies a
        gradient to unscale it (GradScaler); ``state`` is the optimizer's ``state``."""
        raise NotImplementedError

    def move(self, backend, p: torch.Tensor, plus, tie, group: dict) -> None:
        """Step ``p`` by the vote ``(plus, tie)`` (packed words): ``p -= lr * (v + wd * p)``."""
        backend.apply(p, plus, tie, number(group["lr"]), number(group["weight_decay"]))

    def fused(self, backend):
        """A kernel of ``backend`` that does :meth:`send` and the pack in one pass for this
        rule, or None: ``kernel(params, grads, state, group, scale, zero_bit, outs, zeros)``
        (``grads[i]``: ``params[i]``'s gradient, or None) returns how many non-finite gradient
        entries it voted as 0, or None when it did not take these tensors (nothing done).
        Asked once per layout."""
        return None


class SignumRule(Rule):
    """Signum: the sign of the local momentum (``momentum=0``: of the gradient, signSGD)."""

    hparams = ("lr", "momentum", "weight_decay")

    def check(self, group: dict, where: str = "") -> None:
        check_range("lr", group["lr"], where)
        check_range("momentum", group["momentum"], where, below_one=True)
        check_range("weight_decay", group["weight_decay"], where)

    @staticmethod
    def momentum_buffer(state, p: torch.Tensor) -> torch.Tensor:
        st = state[p]
        if "momentum_buffer" not in st:
            st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        return st["momentum_buffer"]

    def send(self, params: list, grads: list, state, group: dict, scale: float):
        """The updated momentum (or the gradient). No gradient here: vote with ``beta * m``,
        and decay ``m`` only once the vote says that some rank had this gradient (if none had,
        the parameter and its momentum stay as they are)."""
        beta = number(group["momentum"])
        if not beta:
            # The sign of a scaled gradient is the sign of the gradient; None votes as 0.
            return [g if g is not None else torch.zeros_like(p)
                    for p, g in zip(params, grads)], None
        bufs = [self.momentum_buffer(state, p) for p in params]
        here = [i for i, g in enumerate(grads) if g is not None]
        if here:
            torch._foreach_mul_([bufs[i] for i in here], beta)
            torch._foreach_add_([bufs[i] for i in here], [grads[i] for i in here],
                                alpha=(1 - beta) * scale)
        absent = [i for i, g in enumerate(grads) if g is None]
        if not absent:
            return bufs, None
        sources = list(bufs)
        for i in absent:
            sources[i] = bufs[i] * beta

        def after(voted: list) -> None:
            for i in absent:
                if voted[i]:
                    bufs[i].mul_(beta)
        return sources, after

    def fused(self, backend):
        """The backend's ``update_and_pack`` (:class:`mpisign.backends.host.CompiledSigns`):
        :meth:`send` of this class, scrub and pack in one pass, where every parameter has its
        gradient here. A subclass that changes ``send`` computes something else: none."""
        kernel = getattr(backend, "update_and_pack", None)
        if kernel is None or type(self).send is not SignumRule.send:
            return None

        def update_and_pack(params, grads, state, group, scale, zero_bit, outs, zeros=None):
            if any(g is None for g in grads):
                return None
            beta = number(group["momentum"])
            bufs = ([self.momentum_buffer(state, p) for p in params] if beta
                    else [None] * len(params))
            return kernel(grads, bufs, beta, (1 - beta) * scale, zero_bit, outs,
                          **({"zeros": zeros} if zeros else {}))
        return update_and_pack
