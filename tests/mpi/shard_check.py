"""mpisign.shard and mpisign.on_root on real ranks (run by tests/test_script.py).

Every rank builds its sampler alone, with no communication; the checks gather what each rank
got. Asserted here, collectively: every rank's part has the same length (``len(sampler)``), a
second sampler with the same seed and epoch gives the same part, a DataLoader over the sampler
gives every rank the same number of batches, on_root and shard over a sub-communicator, and
bad arguments refused on every rank. Printed by rank 0, for the test to compare with a
one-process reference: ``@parts JSON`` (every rank's part, per case) and, from every rank,
``@on_root rank=R True|False``.

Usage: shard_check.py
"""

import json

import torch
from common import WORLD, case, expect_everywhere, progress
from torch.utils.data import DataLoader

from mpisign.script import ShardSampler, on_root, shard

comm = WORLD
rank, size = comm.Get_rank(), comm.Get_size()
SEED = 5
LENGTHS = (12, 10, 2)   # divides by 3; does not; fewer items than ranks


def parts():
    for n in LENGTHS:
        for drop_last in (False, True):
            if drop_last and n < size:
                continue   # refused: see bad_arguments
            for shuffle in (True, False):
                with case(f"parts n={n} drop_last={drop_last} shuffle={shuffle}"):
                    got = {}
                    for epoch in (0, 1):
                        progress(f"n={n}/epoch={epoch}")
                        sampler = shard(range(n), shuffle=shuffle, seed=SEED, drop_last=drop_last)
                        sampler.set_epoch(epoch)
                        mine = list(sampler)
                        again = ShardSampler(range(n), rank, size, shuffle=shuffle, seed=SEED,
                                             drop_last=drop_last)
                        again.set_epoch(epoch)
                        assert list(again) == mine == list(sampler), "not deterministic"
                        every = comm.allgather(mine)
                        assert [len(p) for p in every] == [len(sampler)] * size, \
                            f"parts of unequal lengths {[len(p) for p in every]}"
                        got[epoch] = every
                    if rank == 0:
                        for epoch, every in got.items():
                            print("@parts " + json.dumps(dict(n=n, size=size, seed=SEED,
                                  epoch=epoch, shuffle=shuffle, drop_last=drop_last,
                                  parts=every)), flush=True)


def loader():
    """Every rank runs as many batches (so calls opt.step() as often), the last one short."""
    with case("DataLoader(sampler=shard(...)) batches"):
        data = torch.arange(100, 110)
        batches = list(DataLoader(data, batch_size=3, sampler=shard(data, seed=SEED)))
        assert comm.allgather(len(batches)) == [2] * size, comm.allgather(len(batches))
        seen = torch.cat(comm.allgather(torch.cat(batches)))
        assert set(seen.tolist()) == set(data.tolist())   # 10 items, 12 places: 2 repeated


def roots():
    with case("on_root on COMM_WORLD and on a sub-communicator"):
        print(f"@on_root rank={rank} {on_root()}", flush=True)
        assert comm.allgather(on_root(comm)) == [r == 0 for r in range(size)]
        sub = comm.Split(rank % 2, key=rank)   # evens and odds: world ranks 0 and 1 lead
        try:
            assert comm.allgather(on_root(sub)) == [r in (0, 1) for r in range(size)]
            sampler = shard(range(7), comm=sub, shuffle=False)
            n_sub = sub.Get_size()
            kept = -(-7 // n_sub) * n_sub   # 7 items padded to a multiple of the ranks
            want = list(range(7)) + list(range(kept - 7))
            assert list(sampler) == want[sub.Get_rank()::n_sub], (list(sampler), want)
        finally:
            sub.Free()


def bad_arguments():
    with case("bad arguments refused on every rank"):
        with expect_everywhere(ValueError, "__len__"):
            shard(iter(range(10)))
        with expect_everywhere(ValueError, "seed"):
            shard(range(10), seed=0.5)
        with expect_everywhere(ValueError, "communicator"):
            shard(range(10), comm="world")
        if size > 1:
            with expect_everywhere(ValueError, "drop_last"):
                shard(range(size - 1), drop_last=True)
        with expect_everywhere(ValueError, "epoch"):
            shard(range(10)).set_epoch(-1)


if __name__ == "__main__":
    parts()
    loader()
    roots()
    bad_arguments()
    comm.Barrier()
    if rank == 0:
        print(f"shard_check OK on {size} ranks", flush=True)
