"""``--dataset pystdlib``: the Python standard library's own source, as bytes, for ``--model gpt``.

No download: every machine with Python has it, under ``sysconfig.get_paths()["stdlib"]``.

The corpus (:func:`load_pystdlib`):

* the files: every ``.py`` file under that directory, except third-party packages
  (``site-packages``, ``dist-packages``) and test suites (``test``, ``tests``, ``idle_test``
  folders), as relative POSIX paths, sorted;
* the split, by file: a file is held out for validation when the SHA-256 of its relative path,
  read as a number, is divisible by :data:`VAL_EVERY`. A file's side depends on its path alone,
  never on the order of the files or on which other files exist, and no file is on both sides;
* the caps: each side is its files' bytes one after another, at most :data:`FILE_BYTES` of a
  file (``pydoc_data/topics.py`` alone is 0.75 MB of prose), in the order of the same hashes (a
  fixed order that mixes the packages, where the sorted order would read the first few letters
  of the alphabet), cut at :data:`TRAIN_BYTES` and :data:`VAL_BYTES`. The text is bytes
  (vocabulary 256), not decoded.

Training batches (:meth:`Corpus.train_batches`): an epoch tiles the training text with windows
of ``context + 1`` bytes (inputs, and the same shifted by one as targets), from a random offset
below ``context``, in a random order; both drawn from ``(seed, epoch)``, the same on every rank.
Rank r takes windows r, r + M, r + 2M, ... of that order, as many on every rank, so the ranks'
windows in an epoch are disjoint and every rank runs the same steps. An epoch is therefore the
training text once over: ``TRAIN_BYTES / (batch * context * M)`` steps.

Evaluation (:meth:`Corpus.eval_batches`): the validation text tiled by windows from offset 0,
the same fixed set every time; rank r scores windows r, r + M, ..., and the sums are added.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .objectives import NextToken

__all__ = ["CORPORA", "TRAIN_BYTES", "VAL_BYTES", "VAL_EVERY", "FILE_BYTES", "Corpus",
           "ByteWindows", "load_corpus", "load_pystdlib", "stdlib_files", "is_validation"]

CORPORA = ("pystdlib",)
#: The caps on each side of the split: a few MB of training text reads in well under a second.
TRAIN_BYTES = 4 << 20
VAL_BYTES = 256 << 10
#: One file in VAL_EVERY (by the hash of its path) is held out: about 1 MB of the 12 MB.
VAL_EVERY = 10
#: The most any one file gives: no file stands for a large part of either side.
FILE_BYTES = 64 << 10
#: Folders whose files are not the standard library's own source.
SKIPPED_FOLDERS = ("site-packages", "dist-packages", "test", "tests", "idle_test")


def stdlib_files(root: Path) -> list[str]:
    """The ``.py`` files under ``root`` that are the library's own, as sorted relative paths."""
    found = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in SKIPPED_FOLDERS]
        where = Path(folder).relative_to(root)
        found += [(where / n).as_posix() for n in names
                  if n.endswith(".py") and (Path(folder) / n).is_file()]
    return sorted(found)


def _digest(path: str) -> int:
    return int.from_bytes(hashlib.sha256(path.encode()).digest()[:8], "big")


def is_validation(path: str) -> bool:
    """Whether the file at relative ``path`` is held out (its path alone decides)."""
    return _digest(path) % VAL_EVERY == 0


def _read(root: Path, files: list[str], cap: int) -> tuple[np.ndarray, list[str]]:
    """``files``' bytes (at most :data:`FILE_BYTES` of each) one after another in the order of
    their paths' hashes, cut at ``cap``; and the files that were read, in that order."""
    parts, size, used = [], 0, []
    for name in sorted(files, key=_digest):
        if size >= cap:
            break
        parts.append((root / name).read_bytes()[:FILE_BYTES])
        size += len(parts[-1])
        used.append(name)
    return np.frombuffer(b"".join(parts)[:cap], dtype=np.uint8), used


@dataclass
class ByteWindows:
    """One side of the split: its bytes, cut into windows of ``context + 1`` bytes."""

    text: torch.Tensor    # uint8
    context: int

    def __len__(self) -> int:
        """The windows that tile the text from offset 0."""
        return max(0, (len(self.text) - 1) // self.context)

    def batch(self, starts) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs ``(B, context)`` and targets (the next bytes), int64, of windows at ``starts``."""
        idx = torch.as_tensor(np.asarray(starts, dtype=np.int64))[:, None] + \
            torch.arange(self.context + 1)
        w = self.text[idx].long()
        return w[:, :-1], w[:, 1:]

    def epoch_shard(self, seed: int, epoch: int, rank: int, world: int) -> np.ndarray:
        """This rank's window starts in ``epoch``: a tiling from a random offset, in a random
        order, both from ``(seed, epoch)``; every M-th window from the rank's, as many on
        every rank. One window fewer than :meth:`__len__`, so that every offset fits."""
        rng = np.random.default_rng([seed, epoch])
        offset = int(rng.integers(self.context))
        starts = offset + rng.permutation(self.per_epoch) * self.context
        return starts[rank::world][: self.per_epoch // world]

    @property
    def per_epoch(self) -> int:
        """The windows of an epoch's tiling (from an offset below ``context``)."""
        return max(0, len(self.text) // self.context - 1)


@dataclass
class Corpus:
    """A loaded text corpus: the interface of :class:`mpisign.train.data.Data` for bytes."""

    name: str
    train: ByteWindows
    test: ByteWindows
    source: str                        # where it was read from
    files: dict = field(default_factory=dict)   # "train", "val": the files read on each side
    vocab_size: int = 256
    note: str = ""
    objective = NextToken()

    def describe(self) -> dict:
        sha = {k: hashlib.sha256(w.text.numpy().tobytes()).hexdigest()[:16]
               for k, w in (("train", self.train), ("val", self.test))}
        return dict(name=self.name, source=self.source, vocab_size=self.vocab_size,
                    context=self.train.context, train_bytes=len(self.train.text),
                    val_bytes=len(self.test.text), train_files=len(self.files.get("train", ())),
                    val_files=len(self.files.get("val", ())), val_windows=len(self.test),
                    sha256=sha, note=self.note)

    def steps_per_epoch(self, world: int, batch_size: int) -> int:
        return self.train.per_epoch // world // batch_size

    def share(self, world: int) -> str:
        """What each rank's share of an epoch is, for an error message."""
        return f"{self.train.per_epoch // world} windows of {self.train.context + 1} bytes"

    def train_batches(self, *, rank: int, world: int, batch_size: int, seed: int, epoch: int,
                      start: int = 0, workers: int = 0, count: int | None = None):
        """This rank's batches of ``epoch`` from batch ``start`` to ``count`` (default: the
        epoch's); past the epoch's end (a resume on more ranks), the next epoch's order."""
        shards, rounds, n = [], 0, 0
        while True:
            shards.append(self.train.epoch_shard(seed, epoch + rounds, rank, world))
            rounds += 1
            n = sum(len(s) for s in shards) // batch_size
            if count is None or n >= count or not len(shards[-1]):
                break
        starts = np.concatenate(shards)
        n = n if count is None else min(n, count)
        return (self.train.batch(starts[b * batch_size: (b + 1) * batch_size])
                for b in range(start, n))

    def eval_batches(self, *, rank: int, world: int, batch_size: int, workers: int = 0):
        """This rank's validation windows: r, r + M, ... of the fixed tiling."""
        starts = np.arange(len(self.test))[rank::world] * self.test.context
        return (self.test.batch(starts[i: i + batch_size])
                for i in range(0, len(starts), batch_size))

    def default_workers(self) -> int:
        return 0   # windows are cut from a tensor in memory

    def seen(self, steps: int, world: int, batch_size: int) -> dict:
        """What ``steps`` steps of ``world`` ranks have trained on: tokens (bytes predicted)."""
        return {"tokens": steps * world * batch_size * self.train.context}


def load_pystdlib(context: int, train_bytes: int = TRAIN_BYTES, val_bytes: int = VAL_BYTES,
                  root: str | Path | None = None) -> Corpus:
    """The standard library's source under ``root`` (default: this Python's), split by file,
    each side capped; windows of ``context + 1`` bytes."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = stdlib_files(root)
    train, train_used = _read(root, [f for f in files if not is_validation(f)], train_bytes)
    val, val_used = _read(root, [f for f in files if is_validation(f)], val_bytes)
    if len(train) <= 2 * context or len(val) <= context:
        raise FileNotFoundError(f"{root} holds too little Python source for --dataset pystdlib "
                                f"({len(train)} training and {len(val)} validation bytes, "
                                f"from {len(files)} files); is it the standard library?")
    return Corpus("pystdlib", ByteWindows(torch.from_numpy(train.copy()), context),
                  ByteWindows(torch.from_numpy(val.copy()), context), str(root),
                  {"train": train_used, "val": val_used})


def load_corpus(name: str, context: int) -> Corpus:
    """The corpus ``name`` (one of :data:`CORPORA`), cut into windows of ``context + 1``."""
    if name == "pystdlib":
        return load_pystdlib(context)
    raise ValueError(f"corpus must be one of {CORPORA}, got {name!r}")
