"""What the model is trained to do, fixed by the data: classify an image, or predict the next
token. The loop asks its objective for the loss of a batch and for the figures that the books
carry; it never asks which one it has.

* :class:`Classification` (the image data sets): cross-entropy over classes; the books carry
  ``loss`` and ``acc`` (accuracy).
* :class:`NextToken` (the text corpora): cross-entropy of each position's next token, averaged
  over tokens (nats per token); the books carry ``loss`` and ``ppl``, the perplexity
  ``exp(loss)``. A language model has no accuracy to report, and none is written.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .metrics import Tally

__all__ = ["Classification", "NextToken"]


class Classification:
    """Logits ``(B, classes)`` against labels ``(B,)``."""

    #: The figure the books carry beside the loss (a record's key, and the progress bar's).
    figure = "acc"

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The batch's mean loss, to differentiate."""
        return F.cross_entropy(out, y)

    def tally(self, out: torch.Tensor, y: torch.Tensor, loss: torch.Tensor | None = None) -> Tally:
        """The batch's sums: loss (``loss`` is its mean, if already computed), correct, count."""
        total = (F.cross_entropy(out, y, reduction="sum").item() if loss is None
                 else loss.item() * len(y))
        return Tally(total, (out.argmax(1) == y).sum().item(), len(y))

    def figures(self, sums: Tally, prefix: str = "") -> dict:
        """The record's fields for ``sums``: ``{prefix}loss`` and ``{prefix}acc``."""
        return {f"{prefix}loss": sums.loss, f"{prefix}{self.figure}": sums.acc}

    def say(self, sums: Tally) -> str:
        """A log line's words for ``sums``."""
        return f"loss {sums.loss:.4f} acc {sums.acc:.4f}"


class NextToken(Classification):
    """Logits ``(B, T, vocab)`` against the next tokens ``(B, T)``: every position counts."""

    figure = "ppl"

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.flatten(0, -2), y.flatten())

    def tally(self, out: torch.Tensor, y: torch.Tensor, loss: torch.Tensor | None = None) -> Tally:
        """Loss summed over the batch's tokens, and their count (nothing counts as correct)."""
        total = (F.cross_entropy(out.flatten(0, -2), y.flatten(), reduction="sum").item()
                 if loss is None else loss.item() * y.numel())
        return Tally(total, 0.0, y.numel())

    def figures(self, sums: Tally, prefix: str = "") -> dict:
        """``{prefix}loss`` (nats per token) and ``{prefix}ppl`` (its exp)."""
        return {f"{prefix}loss": sums.loss, f"{prefix}ppl": perplexity(sums.loss)}

    def say(self, sums: Tally) -> str:
        return f"loss {sums.loss:.4f} ppl {perplexity(sums.loss):.2f}"


def perplexity(loss: float) -> float:
    """``exp(loss)``; NaN stays NaN, and an overflow is inf (written as null)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf
