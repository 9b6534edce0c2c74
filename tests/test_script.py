"""mpisign.script (shard, ShardSampler, on_root) and examples/mnist_signum.py.

The parts 3 real ranks got (tests/mpi/shard_check.py, launched once for the module) are
compared with a reference computed here another way: torch.randperm with the same seed, padded
or cut by hand and dealt out by a numpy reshape; and with torch's DistributedSampler given the
rank and world size by hand, whose parts shard promises to reproduce.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mpi4py import MPI
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

import mpirun
from mpisign.mpi.world import LAUNCHER_SIZE_VARS
from mpisign.script import ShardSampler, on_root, shard

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "mnist_signum.py"
FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(
    not (FASHION / "train-images-idx3-ubyte.gz").exists(),
    reason=f"Fashion-MNIST is not installed in {FASHION} (apt-get install dataset-fashion-mnist)")


def reference(n: int, size: int, seed: int, epoch: int, shuffle: bool,
              drop_last: bool) -> list[list[int]]:
    """Every rank's part, in one process: the epoch's permutation padded from its start (or
    cut), as a (per_rank, size) array whose column r is rank r's part."""
    g = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(n, generator=g).numpy() if shuffle else np.arange(n)
    if drop_last:
        order = order[:n - n % size]
    else:
        order = np.resize(order, -(-n // size) * size)   # np.resize repeats from the start
    return order.reshape(-1, size).T.tolist()


# -- 3 ranks ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def three_ranks() -> str:
    return mpirun.run(3, "shard_check.py", timeout=120)


def cases(out: str) -> list[dict]:
    found = [json.loads(line.split(" ", 1)[1]) for line in out.splitlines()
             if line.startswith("@parts ")]
    assert len(found) == 20, f"expected 20 @parts lines (5 settings x 2 shuffles x 2 epochs), " \
                             f"got {len(found)}"
    return found


def name(c: dict) -> str:
    return f"n={c['n']} epoch={c['epoch']} shuffle={c['shuffle']} drop_last={c['drop_last']}"


def test_parts_match_a_one_process_reference(three_ranks):
    for c in cases(three_ranks):
        want = reference(c["n"], c["size"], c["seed"], c["epoch"], c["shuffle"], c["drop_last"])
        assert c["parts"] == want, name(c)


def test_parts_are_distributed_samplers(three_ranks):
    for c in cases(three_ranks):
        for r, part in enumerate(c["parts"]):
            d = DistributedSampler(range(c["n"]), num_replicas=c["size"], rank=r,
                                   shuffle=c["shuffle"], seed=c["seed"], drop_last=c["drop_last"])
            d.set_epoch(c["epoch"])
            assert part == list(d), f"{name(c)} rank {r}"


def test_parts_are_equal_disjoint_and_complete(three_ranks):
    for c in cases(three_ranks):
        n, parts = c["n"], c["parts"]
        every = [i for p in parts for i in p]
        assert len({len(p) for p in parts}) == 1, name(c)
        if c["drop_last"]:   # the tail left out: disjoint, a multiple of the ranks
            assert len(set(every)) == len(every) == n - n % 3, name(c)
            assert set(every) <= set(range(n)), name(c)
        else:                # padded: every index, and only the padding twice
            assert set(every) == set(range(n)), name(c)
            assert len(every) == -(-n // 3) * 3, name(c)
        if n % 3 == 0:
            assert sorted(every) == list(range(n)), name(c)


def test_epochs_differ_and_shuffle_false_keeps_order(three_ranks):
    by_setting: dict = {}
    for c in cases(three_ranks):
        by_setting.setdefault((c["n"], c["shuffle"], c["drop_last"]), {})[c["epoch"]] = c["parts"]
    for (n, shuffle, drop_last), epochs in by_setting.items():
        if shuffle and n > 2:
            assert epochs[0] != epochs[1], f"n={n} drop_last={drop_last}: same order twice"
        if not shuffle:   # the same order every epoch: rank r takes r, r + 3, ...
            assert epochs[0] == epochs[1], f"n={n} drop_last={drop_last}"
            assert [p[0] for p in epochs[0]] == [r % n for r in range(3)], epochs[0]


def test_on_root_on_exactly_one_rank(three_ranks):
    said = dict(re.findall(r"@on_root rank=(\d+) (True|False)", three_ranks))
    assert said == {"0": "True", "1": "False", "2": "False"}


# -- one process -----------------------------------------------------------------------------
@pytest.mark.parametrize("comm", [None, MPI.COMM_SELF], ids=["COMM_WORLD", "COMM_SELF"])
def test_a_world_of_one_gets_every_index(comm):
    sampler = shard(range(11), comm=comm, seed=3)
    assert len(sampler) == 11 and sorted(sampler) == list(range(11))
    assert list(sampler) == torch.randperm(11, generator=torch.Generator().manual_seed(3)).tolist()
    assert list(shard(range(11), comm=comm, shuffle=False, drop_last=True)) == list(range(11))
    assert on_root(comm)


def test_set_epoch_changes_the_order_not_the_items():
    sampler = ShardSampler(range(50), rank=1, size=4, seed=9)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert first != second and len(first) == len(second) == len(sampler) == 13
    sampler.set_epoch(0)
    assert list(sampler) == first


def test_works_without_a_process_group():
    """What shard is for: torch's DistributedSampler needs the rank and the world size from
    torch.distributed, which an MPI job does not initialise."""
    assert not torch.distributed.is_initialized()
    with pytest.raises((ValueError, RuntimeError), match="process group"):
        DistributedSampler(range(10))
    data = torch.arange(10.0)
    batches = list(DataLoader(data, batch_size=4, sampler=shard(data, comm=MPI.COMM_SELF)))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(torch.cat(batches).tolist()) == data.tolist()


class Stream(IterableDataset):
    def __iter__(self):
        return iter(range(5))


@pytest.mark.parametrize("kwargs, match", [
    (dict(dataset=object()), "__len__"),
    (dict(dataset=Stream()), "IterableDataset"),
    (dict(dataset=range(0)), "empty"),
    (dict(dataset=range(10), seed=0.5), "seed"),
    (dict(dataset=range(10), seed="0"), "seed"),
    (dict(dataset=range(10), seed=True), "seed"),
    (dict(dataset=range(10), shuffle="yes"), "shuffle"),
    (dict(dataset=range(10), drop_last=1), "drop_last"),
    (dict(dataset=range(10), comm="world"), "communicator"),
    (dict(dataset=range(10), comm=MPI.COMM_NULL), "communicator"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        shard(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(rank=3, size=3), "rank"),
    (dict(rank=-1, size=3), "rank"),
    (dict(rank=0, size=0), "size"),
    (dict(rank=0, size=3, drop_last=True), "none"),   # 2 items over 3 ranks
], ids=["rank=size", "rank<0", "size=0", "drop_last leaves none"])
def test_bad_sampler_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ShardSampler(range(2), **kwargs)


@pytest.mark.parametrize("epoch", [-1, 1.0, "1", None])
def test_bad_epoch(epoch):
    with pytest.raises(ValueError, match="epoch"):
        shard(range(10)).set_epoch(epoch)


# -- the example -----------------------------------------------------------------------------
QUICK = ["--epochs", "3", "--dry-run", "--max-steps", "2", "--test-limit", "60",
         "--test-batch-size", "30", "--log-interval", "1"]


def saved_model(path: Path) -> dict:
    state = torch.load(path, weights_only=True)
    assert state["fc2.weight"].shape == (10, 128), sorted(state)
    return state


@needs_fashion
def test_example_on_two_ranks(tmp_path):
    """Two epochs of one step each (--dry-run; --max-steps 2 ends the run before the third):
    rank 0 alone prints and saves."""
    save = tmp_path / "model.pt"
    # An absolute path: mpirun.run takes it as it is, not under tests/mpi/.
    out = mpirun.run(2, str(EXAMPLE), *QUICK, "--save-model", "--save-path", str(save),
                     timeout=90)
    assert out.count("Test set:") == 2, out
    assert [int(e) for e in re.findall(r"Train Epoch: (\d+) ", out)] == [1, 2], out
    assert out.count("Saved the model") == 1, out
    assert re.search(r"Accuracy: \d+/60 ", out), out   # every test item counted once
    saved_model(save)


@needs_fashion
def test_example_alone_without_a_launcher(tmp_path):
    """``python examples/mnist_signum.py``: one process, COMM_WORLD of size 1, no MPI traffic."""
    env = mpirun.mpi_env()
    for var in LAUNCHER_SIZE_VARS:   # as if typed in a shell, whatever launched pytest
        env.pop(var, None)
    proc = subprocess.run([sys.executable, str(EXAMPLE), *QUICK, "--save-model"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("Test set:") == 2 and "Accuracy: " in proc.stdout, proc.stdout
    saved_model(tmp_path / "fashion_mnist_cnn.pt")
