"""Where each parameter's signs sit in the optimizer's packed message.

Every trainable parameter gets whole uint64 words, so its bits start on a word boundary and its
slice of the vote is a plain slice of words. Parameters travel in buckets, one vote each: one
bucket for all without overlap; runs of about ``bucket_words`` words in reverse order with
overlap (the backward pass produces the last layers' gradients first). The layout's digest (of
shapes, dtypes, groups and bucketing) goes into every step's header, so ranks that built
different layouts find out before any sign is sent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..backends import packing
from .header import digest64

__all__ = ["Slot", "Bucket", "Layout", "build_layout", "check_param", "trainable"]


@dataclass
class Slot:
    """One parameter's place in the packed message: words ``[word0, word0 + words)``."""

    param: torch.Tensor
    group: int
    word0: int
    words: int


@dataclass
class Bucket:
    """Parameters whose packed signs travel as one message (one vote)."""

    index: int
    slots: list
    word0: int
    word1: int
    ready: set = field(default_factory=set)  # ids of params whose gradient hook fired
    pending: object = None                   # the vote in flight (collectives.Pending)
    packed: bool = False     # this step: this rank's signs are in the layout's words
    applied: bool = False    # this step: the vote's result is in the parameters
    disagree: int = 0        # this step: this rank's votes against the majority
    seen: dict = field(default_factory=dict)   # packed by a hook: each .grad, its version
    seen_scale: float | None = None            # ... and the GradScaler unscale it used

    def next_step(self) -> None:
        self.pending, self.ready, self.seen, self.seen_scale = None, set(), {}, None
        self.packed = self.applied = False
        self.disagree = 0


@dataclass
class Layout:
    signature: tuple          # ids of the parameters, by group: a new one means a new layout
    description: list         # (group, shape, dtype) of each parameter
    digest: int               # of the description and bucketing (the step header's)
    overlap: bool
    slots: list = field(default_factory=list)
    buckets: list = field(default_factory=list)
    words: int = 0
    coordinates: int = 0
    packed: object = None     # this rank's words, where the signs backend keeps them

    def summary(self) -> str:
        """For error messages: what this rank's layout holds."""
        return (f"{len(self.description)} parameters, "
                f"{sum(math.prod(sh) for _, sh, _ in self.description)} coordinates, "
                f"overlap={self.overlap}, layout digest {self.digest:016x}")


def check_param(p: torch.Tensor) -> None:
    """ValueError unless ``p`` is a real floating-point tensor (a sign needs an order)."""
    if not p.is_floating_point():
        raise ValueError(f"parameters must be real floating point, got {p.dtype}"
                         + (": a sign method needs an order; optimize torch.view_as_real(p) "
                            "instead" if p.is_complex() else ""))


def trainable(param_groups: list) -> list:
    """``(group index, parameter)`` of every parameter with ``requires_grad``, in order."""
    return [(gi, p) for gi, g in enumerate(param_groups) for p in g["params"] if p.requires_grad]


def signature(param_groups: list) -> tuple:
    return tuple(tuple(id(p) for p in g["params"] if p.requires_grad) for g in param_groups)


def build_layout(param_groups: list, overlap: bool, bucket_words: int, signs) -> Layout:
    """The layout of ``param_groups``' trainable parameters, its words from ``signs``
    (:class:`mpisign.backends.signs.Signs`): no bucket at all when no parameter requires a
    gradient (a step votes on nothing, as torch's optimizers do nothing; its header still
    checks that every rank agrees). Raises ValueError for a parameter that is not real
    floating point."""
    order = trainable(param_groups)
    for _, p in order:
        check_param(p)
    description = [(gi, tuple(p.shape), str(p.dtype)) for gi, p in order]
    layout = Layout(signature(param_groups), description,
                    digest64(repr((description, overlap, bucket_words)).encode()), overlap)
    if overlap:
        order.reverse()
    word = 0
    bucket: list[Slot] = []
    for gi, p in order:
        slot = Slot(p, gi, word, packing.n_words(p.numel()))
        word += slot.words
        layout.slots.append(slot)
        bucket.append(slot)
        if overlap and word - bucket[0].word0 >= bucket_words:
            layout.buckets.append(Bucket(len(layout.buckets), bucket, bucket[0].word0, word))
            bucket = []
    if bucket:
        layout.buckets.append(Bucket(len(layout.buckets), bucket, bucket[0].word0, word))
    layout.words = word
    layout.coordinates = sum(p.numel() for _, p in order)
    layout.packed = signs.words(word)
    return layout
