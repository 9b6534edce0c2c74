"""Data for ``python -m mpisign.train``: offline data sets, one shard per rank, full-set evaluation.

Data sets (``load_data(name, data_dir)``):

* ``fashion-mnist`` (the default): the idx/gzip files of Debian's ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist/*-ubyte.gz``), read directly, kept in memory as uint8.
* ``digits``: scikit-learn's bundled 8x8 digits (1797 images, no download); a fixed seeded split
  holds out 360 for testing. The default falls back to it, loudly, when Fashion-MNIST is missing.
* ``cifar10``: torchvision's CIFAR-10 from ``--data-dir`` (``cifar-10-batches-py``), never
  downloaded: compute nodes have no internet.
* ``imagefolder``: an ImageNet-style tree ``DATA_DIR/{train,val}/<class>/<image>``.

Training data: every epoch, each rank takes its own shard of a permutation seeded by
``(seed, epoch)`` (``torch.utils.data.DistributedSampler``), cut into full batches, so every rank
runs the same number of steps. Evaluation: rank r scores test items ``r, r + M, r + 2M, ...``
and the sums are added over ranks, so every test item is scored exactly once.
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .objectives import Classification

__all__ = ["DATASETS", "FASHION_MNIST_DIR", "DataNotFound", "Data", "InMemory", "load_data",
           "batches_per_epoch", "train_batches", "eval_batches"]

# The name its log lines carry, which loop.configure quiets on ranks other than 0.
log = logging.getLogger("mpisign.data")

DATASETS = ("fashion-mnist", "digits", "cifar10", "imagefolder")
#: Where Debian's ``dataset-fashion-mnist`` package installs the files.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte",
}


class DataNotFound(FileNotFoundError):
    """The data set is not where it was looked for; the message says what to put where."""


class InMemory(Dataset):
    """Images kept as uint8 ``(N, C, H, W)``, normalized per batch: ``(x * scale - mean) / std``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, scale: float, mean: float,
                 std: float):
        if images.ndim != 4 or images.dtype != np.uint8 or len(images) != len(labels):
            raise ValueError(f"expected uint8 images (N, C, H, W) and N labels, got "
                             f"{images.dtype} {images.shape} and {len(labels)} labels")
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.scale, self.mean, self.std = scale, mean, std

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, idx) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[idx].to(torch.float32).mul_(self.scale).sub_(self.mean).div_(self.std)
        return x, self.labels[idx]

    def __getitem__(self, i):
        x, y = self.batch(torch.tensor([i]))
        return x[0], y[0]


@dataclass
class Data:
    """A loaded data set and what a model needs to know about it."""

    name: str
    train: Dataset
    test: Dataset
    in_channels: int
    image_size: int
    num_classes: int
    source: str          # where it was read from
    note: str = ""       # e.g. why the default fell back to digits

    #: What a model learns from it (:mod:`mpisign.train.objectives`).
    objective = Classification()

    def describe(self) -> dict:
        return dict(name=self.name, source=self.source, train=len(self.train),
                    test=len(self.test), in_channels=self.in_channels,
                    image_size=self.image_size, num_classes=self.num_classes, note=self.note)

    # The interface the training loop uses; mpisign.train.corpus.Corpus has it too.
    def steps_per_epoch(self, world: int, batch_size: int) -> int:
        return batches_per_epoch(len(self.train), world, batch_size)

    def share(self, world: int) -> str:
        """What each rank's share of an epoch is, for an error message."""
        return f"{-(-len(self.train) // world)} of {len(self.train)} examples"

    def train_batches(self, **kwargs):
        """:func:`train_batches` of the training set."""
        return train_batches(self.train, **kwargs)

    def eval_batches(self, **kwargs):
        """:func:`eval_batches` of the test set."""
        return eval_batches(self.test, **kwargs)

    def default_workers(self) -> int:
        return default_workers(self.train)

    def seen(self, steps: int, world: int, batch_size: int) -> dict:
        return {}   # the books count steps and epochs; nothing more to add


# -- Fashion-MNIST: idx files ---------------------------------------------------------------------
def read_idx(path: Path) -> np.ndarray:
    """Read one idx file (optionally gzipped): 2 zero bytes, a type code (0x08 = uint8), the
    number of dimensions, the dimensions as big-endian int32, then the data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not a uint8 idx file (header {raw[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", raw[4: 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape}, file holds {data.size} bytes of data")
    return data.reshape(shape).copy()  # writable: torch.from_numpy wants it


def _find_idx(data_dir: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (data_dir / name).is_file():
            return data_dir / name
    return None


def fashion_mnist_present(data_dir: str | None) -> bool:
    d = Path(data_dir or FASHION_MNIST_DIR)
    return all(_find_idx(d, s) for s in FASHION_MNIST_FILES.values())


def load_fashion_mnist(data_dir: str | None) -> Data:
    d = Path(data_dir or FASHION_MNIST_DIR)
    paths = {k: _find_idx(d, s) for k, s in FASHION_MNIST_FILES.items()}
    missing = [FASHION_MNIST_FILES[k] + ".gz" for k, p in paths.items() if p is None]
    if missing:
        raise DataNotFound(
            f"Fashion-MNIST not found in {d}: missing {', '.join(missing)}. Install it with "
            f"`apt-get install dataset-fashion-mnist` (Debian/Ubuntu; files go to "
            f"{FASHION_MNIST_DIR}), or copy the four *-ubyte.gz files from "
            f"https://github.com/zalandoresearch/fashion-mnist into a directory and pass it as "
            f"--data-dir; or use --dataset digits, which needs no files.")
    arrays = {k: read_idx(p) for k, p in paths.items()}
    # Mean and std of the training pixels in [0, 1], the usual constants for Fashion-MNIST.
    mean, std = 0.2860, 0.3530
    train = InMemory(arrays["train_images"][:, None], arrays["train_labels"], 1 / 255, mean, std)
    test = InMemory(arrays["test_images"][:, None], arrays["test_labels"], 1 / 255, mean, std)
    return Data("fashion-mnist", train, test, 1, 28, 10, str(d))


# -- digits: bundled with scikit-learn ------------------------------------------------------------
def load_digits(test_size: int = 360, split_seed: int = 0) -> Data:
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError as e:
        raise DataNotFound("the digits data set comes with scikit-learn: "
                           "pip install scikit-learn") from e
    bunch = sk_digits()
    images = bunch.images.astype(np.uint8)[:, None]   # values 0..16
    order = np.random.default_rng(split_seed).permutation(len(images))
    test_idx, train_idx = order[:test_size], order[test_size:]
    x = images[train_idx] / 16.0
    mean, std = float(x.mean()), float(x.std())
    train = InMemory(images[train_idx], bunch.target[train_idx], 1 / 16, mean, std)
    test = InMemory(images[test_idx], bunch.target[test_idx], 1 / 16, mean, std)
    return Data("digits", train, test, 1, 8, 10, "sklearn.datasets.load_digits")


# -- torchvision data sets from --data-dir -------------------------------------------------------
def _need_dir(data_dir: str | None, what: str, layout: str) -> Path:
    if not data_dir:
        raise DataNotFound(f"--dataset {what} needs --data-dir: {layout}")
    d = Path(data_dir)
    if not d.is_dir():
        raise DataNotFound(f"--data-dir {d} is not a directory. {layout}")
    return d


def load_cifar10(data_dir: str | None) -> Data:
    import torchvision.transforms as T
    from torchvision.datasets import CIFAR10

    layout = ("put CIFAR-10's python version there: DATA_DIR/cifar-10-batches-py/"
              "{data_batch_1..5, test_batch, batches.meta}, e.g. unpack "
              "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz into DATA_DIR on a "
              "machine with internet (compute nodes are assumed to have none: nothing is "
              "downloaded).")
    d = _need_dir(data_dir, "cifar10", layout)
    if d.name == "cifar-10-batches-py":
        d = d.parent
    if not (d / "cifar-10-batches-py" / "data_batch_1").is_file():
        raise DataNotFound(f"CIFAR-10 not found in {d}: {layout}")
    norm = T.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    train_tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                          norm])
    test_tf = T.Compose([T.ToTensor(), norm])
    train = CIFAR10(str(d), train=True, transform=train_tf, download=False)
    test = CIFAR10(str(d), train=False, transform=test_tf, download=False)
    return Data("cifar10", train, test, 3, 32, 10, str(d))


def load_imagefolder(data_dir: str | None, image_size: int = 224) -> Data:
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    layout = ("expected an ImageNet-style tree: DATA_DIR/train/<class>/<image> and "
              "DATA_DIR/val/<class>/<image>, the same class folders in both.")
    d = _need_dir(data_dir, "imagefolder", layout)
    for split in ("train", "val"):
        if not (d / split).is_dir():
            raise DataNotFound(f"{d / split} is missing: {layout}")
    norm = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    train_tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(),
                          T.ToTensor(), norm])
    test_tf = T.Compose([T.Resize(int(image_size * 8 / 7)), T.CenterCrop(image_size),
                         T.ToTensor(), norm])
    train = ImageFolder(str(d / "train"), transform=train_tf)
    test = ImageFolder(str(d / "val"), transform=test_tf)
    if train.classes != test.classes:
        raise DataNotFound(f"{d}: train/ and val/ hold different class folders")
    return Data("imagefolder", train, test, 3, image_size, len(train.classes), str(d))


def load_data(name: str | None, data_dir: str | None = None) -> Data:
    """Load ``name``; ``None`` means Fashion-MNIST if its files are present, else digits."""
    if name is None:
        if fashion_mnist_present(data_dir):
            return load_fashion_mnist(data_dir)
        where = data_dir or FASHION_MNIST_DIR
        note = (f"Fashion-MNIST not found in {where}; FELL BACK to scikit-learn's 8x8 digits. "
                f"Install it with `apt-get install dataset-fashion-mnist`, or pass --dataset.")
        log.warning("\n%s\n%s\n%s", "!" * 78, note, "!" * 78)
        data = load_digits()
        data.note = note
        return data
    if name == "fashion-mnist":
        return load_fashion_mnist(data_dir)
    if name == "digits":
        return load_digits()
    if name == "cifar10":
        return load_cifar10(data_dir)
    if name == "imagefolder":
        return load_imagefolder(data_dir)
    raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")


# -- batches ---------------------------------------------------------------------------------
def batches_per_epoch(n_train: int, world: int, batch_size: int) -> int:
    """Full batches each rank runs per epoch (the sampler pads the shards to equal size)."""
    return -(-n_train // world) // batch_size


def _loader(dataset: Dataset, batches: list, workers: int):
    if isinstance(dataset, InMemory):
        return (dataset.batch(torch.as_tensor(b)) for b in batches)
    return iter(DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                           persistent_workers=False, pin_memory=torch.cuda.is_available()))


def train_batches(dataset: Dataset, *, rank: int, world: int, batch_size: int, seed: int,
                  epoch: int, start: int = 0, workers: int = 0, count: int | None = None):
    """This rank's batches of ``epoch``, from batch ``start`` on (to resume mid-epoch), up to
    batch ``count`` (default: the shard's full batches). A run whose epochs have more steps
    than this world's shards have batches (resumed on more ranks than it began with) goes
    round the shard again, in the next epoch's order."""
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                 seed=seed, drop_last=False)
    idx: list = []
    rounds = 0
    while True:
        sampler.set_epoch(epoch + rounds)
        idx += list(sampler)
        rounds += 1
        n = len(idx) // batch_size
        if count is None or n >= count:
            break
    n = n if count is None else count
    batches = [idx[b * batch_size: (b + 1) * batch_size] for b in range(start, n)]
    return _loader(dataset, batches, workers)


def eval_batches(dataset: Dataset, *, rank: int, world: int, batch_size: int,
                 workers: int = 0):
    """This rank's part of the test set: items rank, rank + world, ... (each item once overall)."""
    idx = list(range(rank, len(dataset), world))
    batches = [idx[i: i + batch_size] for i in range(0, len(idx), batch_size)]
    return _loader(dataset, batches, workers)


def default_workers(dataset: Dataset) -> int:
    """DataLoader workers: none for in-memory tensors, a few for decoded images."""
    if isinstance(dataset, InMemory):
        return 0
    return min(4, max(1, (os.cpu_count() or 2) // 4))
