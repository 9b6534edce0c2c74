"""What your own training script needs beside the optimizer: this rank's part of the data, and
the rank that prints and saves.

    train_loader = DataLoader(train_ds, batch_size=64, sampler=mpisign.shard(train_ds))
    for epoch in range(epochs):
        train_loader.sampler.set_epoch(epoch)      # a new order every epoch, the same on all ranks
        ...
    if mpisign.on_root():
        torch.save(model.state_dict(), "model.pt")

:func:`shard` is ``torch.utils.data.DistributedSampler`` without ``torch.distributed``: that
sampler asks the default process group for the rank and the world size ("Default process group
has not been initialized") unless both are given, and mpisign's ranks have an mpi4py
communicator instead. Both samplers cut the same parts (see :class:`ShardSampler`). Neither
function communicates: each rank computes the same permutation from ``(seed, epoch)`` alone and
keeps its own part of it. A complete example is ``examples/mnist_signum.py``.
"""

from __future__ import annotations

import numbers

import torch
from mpi4py import MPI
from torch.utils.data import Sampler

from .mpi.comm import check_comm

__all__ = ["ShardSampler", "shard", "on_root"]


class ShardSampler(Sampler[int]):
    """Rank ``rank``'s part, out of ``size`` ranks, of the indices of ``dataset``.

    Every epoch the indices are permuted by a ``torch.Generator`` seeded with ``seed + epoch``
    (or kept in order, ``shuffle=False``) and dealt out in turn: rank r takes positions
    r, r + size, r + 2 size, ... Every rank takes the same number, because every rank must call
    ``opt.step()`` equally often (the vote waits for all of them): when ``len(dataset)`` does
    not divide by ``size``, the permutation is padded from its start (a few items are seen twice
    in the epoch), or with ``drop_last`` its tail is left out (a few are not seen). The parts
    are disjoint where nothing was padded, and their union is every index where nothing was
    dropped. They are ``DistributedSampler(dataset, num_replicas=size, rank=rank,
    shuffle=shuffle, seed=seed, drop_last=drop_last)``'s, index for index.

    For evaluation, where every test item should count once and ranks need not take equal
    steps, take ``Subset(test_ds, range(rank, len(test_ds), size))`` instead (no padding).
    """

    def __init__(self, dataset, rank: int, size: int, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False):
        try:
            n = len(dataset)
        except TypeError:
            raise ValueError(
                f"shard needs a dataset with a length (a map-style Dataset, a list, a range), "
                f"got {type(dataset).__name__} without __len__; an IterableDataset has to "
                f"split its stream itself, e.g. itertools.islice(stream, rank, None, size)"
            ) from None
        if not _is_int(size) or size < 1:
            raise ValueError(f"size (the number of ranks) must be an int >= 1, got {size!r}")
        if not _is_int(rank) or not 0 <= rank < size:
            raise ValueError(f"rank must be an int in [0, {size}), got {rank!r}")
        if not isinstance(shuffle, bool) or not isinstance(drop_last, bool):
            raise ValueError(f"shuffle and drop_last must be True or False, got "
                             f"shuffle={shuffle!r}, drop_last={drop_last!r}")
        if not _is_int(seed):
            raise ValueError(f"seed must be an int, the same on every rank (each rank permutes "
                             f"alone, from the seed), got {seed!r}")
        if n == 0:
            raise ValueError("the dataset is empty: there is nothing to shard")
        if drop_last and n < size:
            raise ValueError(f"with drop_last, {n} items over {size} ranks leave every rank "
                             f"none: use drop_last=False (items are repeated) or fewer ranks")
        self.dataset = dataset
        self.rank, self.size = int(rank), int(size)
        self.shuffle, self.seed, self.drop_last = shuffle, int(seed), drop_last
        self.epoch = 0
        self.total = n
        # Every rank's count: the floor with drop_last, the ceiling when padding.
        self.num_samples = n // size if drop_last else -(-n // size)

    def set_epoch(self, epoch: int) -> None:
        """Take epoch ``epoch``'s order on the next pass. Call it on every rank with the same
        epoch, before each epoch, or every epoch repeats the first one's order."""
        if not _is_int(epoch) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self.epoch = int(epoch)

    def indices(self) -> list[int]:
        """This rank's indices for the current epoch, in the order the loader takes them."""
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.total, generator=g).tolist()
        else:
            order = list(range(self.total))
        kept = self.num_samples * self.size
        while len(order) < kept:   # pad by wrapping around, as often as it takes (n < size)
            order += order[:kept - len(order)]
        return order[self.rank:kept:self.size]

    def __iter__(self):
        return iter(self.indices())

    def __len__(self) -> int:
        return self.num_samples

    def __repr__(self) -> str:
        return (f"ShardSampler(rank={self.rank}, size={self.size}, items={self.total}, "
                f"per_rank={self.num_samples}, shuffle={self.shuffle}, seed={self.seed}, "
                f"epoch={self.epoch}, drop_last={self.drop_last})")


def shard(dataset, comm=None, shuffle: bool = True, seed: int = 0,
          drop_last: bool = False) -> ShardSampler:
    """This rank's part of ``dataset`` over the ranks of ``comm`` (None: ``MPI.COMM_WORLD``),
    as a sampler for ``DataLoader(dataset, batch_size=..., sampler=shard(dataset))`` (a loader
    given a sampler takes no ``shuffle=``). Call ``loader.sampler.set_epoch(epoch)`` before
    each epoch. No communication: call it on every rank with the same ``seed``. See
    :class:`ShardSampler` for the parts."""
    comm = check_comm(MPI.COMM_WORLD if comm is None else comm)
    return ShardSampler(dataset, comm.Get_rank(), comm.Get_size(), shuffle=shuffle, seed=seed,
                        drop_last=drop_last)


def on_root(comm=None) -> bool:
    """Whether this is rank 0 of ``comm`` (None: ``MPI.COMM_WORLD``): the rank that prints
    and saves. No communication.

    Printing and saving, from rank 0 only (every rank holds the same parameters)::

        if mpisign.on_root():
            print(f"epoch {epoch}: loss {loss.item():.4f}")
            torch.save(model.state_dict(), "model.pt")

    Evaluation on every rank's part of the test set, the sums added over the ranks
    (``comm.allreduce`` sums by default; a collective, so every rank calls it), printed once::

        part = Subset(test_ds, range(comm.rank, len(test_ds), comm.size))
        loss_sum, correct = evaluate(model, DataLoader(part, batch_size=1000))
        loss_sum, correct = comm.allreduce(loss_sum), comm.allreduce(correct)
        if mpisign.on_root():
            print(f"loss {loss_sum / len(test_ds):.4f}, accuracy {correct / len(test_ds):.1%}")

    Or on rank 0 alone, for a small test set: the other ranks go on and wait for it at their
    next vote, for up to ``$MPISIGN_TIMEOUT`` seconds (300) before ``VoteTimeout``::

        if mpisign.on_root():
            print(evaluate(model, DataLoader(test_ds, batch_size=1000)))
    """
    return check_comm(MPI.COMM_WORLD if comm is None else comm).Get_rank() == 0


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)
