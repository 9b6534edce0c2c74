"""Advice a sign optimizer gives once, at its first step, where a setting is almost surely a
mistake: never an error (some users know what they do), one warning from rank 0.

The learning rate. A sign method moves every coordinate by exactly ``lr`` a step (plus weight
decay): ``lr`` is the step itself, not a multiplier of a gradient's size. A value carried over from
SGD (0.1), Adadelta (1.0) or a word-language-model script (20) moves every weight by more than its
own size each step. Measured on the training command's small CNN (one rank, Signum, 150 steps,
``python -m mpisign.train --max-steps 150 --lr LR``): on Fashion-MNIST, whose initial weights have
an RMS of 0.0137, lr 0.003 reached 81% test accuracy and lr 0.01 stayed at chance (10%); on the
8x8 digits (RMS 0.039), lr 0.01 reached 96% and lr 0.03 stayed at chance. Training broke at
``lr / RMS`` of 0.73 and 0.77 and worked at 0.22 and 0.26: the warning fires above 0.5.
"""

from __future__ import annotations

import math
import os
import sys
import warnings

import torch

__all__ = ["LearningRateWarning", "LR_TO_RMS", "check_learning_rate"]

#: The warning fires where ``lr`` exceeds this fraction of the parameters' root mean square.
LR_TO_RMS = 0.5


class LearningRateWarning(UserWarning):
    """A learning rate that no sign method would want (see :mod:`mpisign.optim.guidance`)."""


def check_learning_rate(name: str, groups: list) -> str | None:
    """Warn (:class:`LearningRateWarning`) and return the message if some group's ``lr`` is
    above :data:`LR_TO_RMS` times the RMS of the parameters it moves; else None. A group
    whose parameters are all 0 (biases, before any step) says nothing about a scale: skipped."""
    for i, group in enumerate(groups):
        params = [p for p in group["params"] if p.requires_grad and p.numel()]
        if not params:
            continue
        lr = float(group["lr"])
        with torch.no_grad():
            squares = sum(float(p.detach().double().square().sum()) for p in params)
        rms = math.sqrt(squares / sum(p.numel() for p in params))
        if not (math.isfinite(rms) and rms > 0 and lr > LR_TO_RMS * rms):
            continue
        where = f"param_groups[{i}]'s " if len(groups) > 1 else ""
        message = (
            f"{name}: {where}lr={lr:g} moves every coordinate by {lr:g} each step, "
            f"{lr / rms:.2g}x the root mean square of the parameters it optimizes ({rms:.3g}). "
            f"A sign optimizer's lr is the step itself, not a multiplier of the gradient: "
            f"training stalled at chance above about {LR_TO_RMS}x on the small CNN. Usual "
            f"values are Adam-like: Signum 1e-4 to 1e-3, Lion 3e-5 to 3e-4 (3-10x below "
            f"AdamW's), never SGD's 0.1 or Adadelta's 1.0. (Warned once, by rank 0; the step "
            f"goes on.)")
        warnings.warn(message, LearningRateWarning, stacklevel=_caller_level())
        return message
    return None


#: Where a warning should not point: mpisign's own files, and torch's wrappers of ``step``.
_INSIDE = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
           os.path.dirname(os.path.abspath(torch.__file__)))


def _caller_level() -> int:
    """``warnings.warn``'s stacklevel of the first frame outside mpisign and torch: the user's
    ``opt.step()`` line (torch's optimizer wraps ``step`` in a varying number of frames)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_INSIDE):
        frame, level = frame.f_back, level + 1
    return level
