"""mpisign.train.data: the idx reader, the digits fallback, per-rank shards, the test-set split."""

import gzip
import logging
import struct

import numpy as np
import pytest
import torch

from mpisign.train import data
from mpisign.train.data import (DataNotFound, InMemory, batches_per_epoch, load_data, read_idx,
                                eval_batches, train_batches)


def write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I",
                                                                    *array.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_fashion(tmp_path):
    """A Fashion-MNIST directory with 50 train and 20 test images, one file not gzipped."""
    rng = np.random.default_rng(0)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (50, 28, 28)))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, 50))
    write_idx(tmp_path / "t10k-images-idx3-ubyte", rng.integers(0, 256, (20, 28, 28)))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, 20))
    return tmp_path


def test_read_idx_round_trip(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for name in ("a.gz", "a"):
        write_idx(tmp_path / name, a)
        assert np.array_equal(read_idx(tmp_path / name), a)


def test_read_idx_rejects_a_truncated_file(tmp_path):
    write_idx(tmp_path / "a", np.zeros((4, 5), dtype=np.uint8))
    raw = (tmp_path / "a").read_bytes()
    (tmp_path / "a").write_bytes(raw[:-3])
    with pytest.raises(ValueError, match="header says"):
        read_idx(tmp_path / "a")


def test_fashion_mnist_from_a_directory(tiny_fashion):
    d = load_data("fashion-mnist", str(tiny_fashion))
    assert (len(d.train), len(d.test), d.in_channels, d.image_size) == (50, 20, 1, 28)
    x, y = d.train.batch(torch.arange(5))
    assert x.shape == (5, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_default_is_fashion_mnist_when_present(tiny_fashion):
    assert load_data(None, str(tiny_fashion)).name == "fashion-mnist"


def test_default_falls_back_to_digits_loudly(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="mpisign.data"):
        d = load_data(None, str(tmp_path))
    assert d.name == "digits" and "FELL BACK" in d.note
    assert "dataset-fashion-mnist" in caplog.text
    assert (len(d.train), len(d.test), d.image_size) == (1437, 360, 8)


def test_explicit_fashion_mnist_that_is_missing_is_an_error(tmp_path):
    with pytest.raises(DataNotFound, match="apt-get install dataset-fashion-mnist"):
        load_data("fashion-mnist", str(tmp_path))


def test_digits_split_is_fixed_and_disjoint():
    a, b = data.load_digits(), data.load_digits()
    assert torch.equal(a.test.images, b.test.images)
    train = {x.numpy().tobytes() for x in a.train.images}
    assert sum(x.numpy().tobytes() in train for x in a.test.images) < 5  # duplicates in digits


@pytest.mark.parametrize("name, message", [
    ("cifar10", "cifar-10-batches-py"), ("imagefolder", "train/<class>"),
])
def test_torchvision_sets_need_a_directory(name, message, tmp_path):
    with pytest.raises(DataNotFound, match="needs --data-dir"):
        load_data(name, None)
    with pytest.raises(DataNotFound, match="not a directory"):
        load_data(name, str(tmp_path / "missing"))
    with pytest.raises(DataNotFound, match=message.replace("<", ".").replace(">", ".")):
        load_data(name, str(tmp_path))


def _toy(n: int) -> InMemory:
    return InMemory(np.zeros((n, 1, 2, 2), np.uint8), np.arange(n), 1.0, 0.0, 1.0)


@pytest.mark.parametrize("n, world, batch", [(100, 3, 8), (64, 4, 16), (10, 1, 3)])
def test_shards_cover_the_data_and_every_rank_runs_the_same_steps(n, world, batch):
    ds = _toy(n)
    steps = batches_per_epoch(n, world, batch)
    seen = []
    for rank in range(world):
        labels = [y for _, y in train_batches(ds, rank=rank, world=world, batch_size=batch,
                                              seed=1, epoch=0)]
        assert len(labels) == steps and all(len(y) == batch for y in labels)
        seen += torch.cat(labels).tolist()
    assert len(set(seen)) == len(seen) or n % world  # disjoint unless padded
    assert len(set(seen)) >= world * steps * batch - world


def test_shards_are_seeded_per_epoch_and_resume_mid_epoch():
    ds = _toy(60)

    def labels(epoch, start=0, seed=0):
        return [y.tolist() for _, y in train_batches(ds, rank=1, world=2, batch_size=5,
                                                     seed=seed, epoch=epoch, start=start)]
    assert labels(0) == labels(0) and labels(0) != labels(1) and labels(0) != labels(0, seed=1)
    assert labels(2, start=4) == labels(2)[4:]


@pytest.mark.parametrize("world", [1, 3, 7])
def test_test_batches_split_the_test_set_exactly(world):
    ds = _toy(50)
    got = sorted(int(v) for r in range(world)
                 for _, y in eval_batches(ds, rank=r, world=world, batch_size=4) for v in y)
    assert got == list(range(50))
