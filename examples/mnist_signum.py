"""Fashion-MNIST with a small CNN on several MPI ranks, with mpisign.Signum: pytorch/examples'
mnist/main.py with the lines marked ``# mpisign`` changed (examples/README.md shows the diff).
It reads the idx files of Debian's dataset-fashion-mnist directly (no download).

    python examples/mnist_signum.py                                        # one process
    python -m mpisign.launch -n 4 -- python examples/mnist_signum.py       # 4 local ranks
    srun --mpi=pmix python -m mpi4py examples/mnist_signum.py              # under Slurm
    python examples/mnist_signum.py --epochs 1 --max-steps 50 --test-limit 1000   # a quick look

Every rank trains on its own part of the training set (mpisign.shard) and steps by the
majority of the ranks' signs; every rank evaluates its part of the test set and the sums are
added over the ranks; rank 0 alone prints and saves.
"""

import argparse
import gzip
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from mpi4py import MPI  # mpisign
from torch.optim.lr_scheduler import StepLR
from torch.utils.data import DataLoader, Dataset, Subset

import mpisign  # mpisign


class FashionMNIST(Dataset):
    """The idx/gzip files of Fashion-MNIST, held as uint8, normalised item by item."""
    MEAN, STD = 0.2860, 0.3530

    def __init__(self, data_dir, train=True):
        prefix = "train" if train else "t10k"
        self.images = torch.from_numpy(read_idx(Path(data_dir, f"{prefix}-images-idx3-ubyte.gz")))
        self.labels = torch.from_numpy(read_idx(Path(data_dir, f"{prefix}-labels-idx1-ubyte.gz")))

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        image = (self.images[i].float().div(255) - self.MEAN) / self.STD
        return image.unsqueeze(0), self.labels[i].long()


def read_idx(path):
    """An idx file: a zero word, the type byte (8: uint8), the rank, each size (big-endian
    uint32), then the data."""
    if not path.exists():
        raise SystemExit(f"no {path}: install Debian's dataset-fashion-mnist "
                         f"(apt-get install dataset-fashion-mnist) or pass --data-dir")
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = np.frombuffer(raw, ">u4", ndim, offset=4)
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout2(x)
        x = self.fc2(x)
        return F.log_softmax(x, dim=1)


def train(args, model, device, train_loader, optimizer, epoch, steps):
    """One epoch, or less if --max-steps comes first; returns the steps taken so far."""
    model.train()
    for batch_idx, (data, target) in enumerate(train_loader):
        if args.max_steps and steps == args.max_steps:
            break
        data, target = data.to(device), target.to(device)
        optimizer.zero_grad()
        output = model(data)
        loss = F.nll_loss(output, target)
        loss.backward()
        optimizer.step()
        steps += 1
        if batch_idx % args.log_interval == 0:
            if mpisign.on_root():  # mpisign: rank 0 prints; the break below is every rank's
                print("Train Epoch: {} [{}/{} ({:.0f}%)]\tLoss: {:.6f}".format(
                    epoch, batch_idx * len(data), len(train_loader.sampler),  # mpisign
                    100.0 * batch_idx / len(train_loader), loss.item()))
            if args.dry_run:
                break
    return steps


def test(model, device, test_loader, comm):  # mpisign
    model.eval()
    test_loss = 0
    correct = 0
    with torch.no_grad():
        for data, target in test_loader:
            data, target = data.to(device), target.to(device)
            output = model(data)
            test_loss += F.nll_loss(output, target, reduction="sum").item()
            pred = output.argmax(dim=1, keepdim=True)
            correct += pred.eq(target.view_as(pred)).sum().item()

    n_test = comm.allreduce(len(test_loader.dataset))  # mpisign: sums over every rank's part
    test_loss, correct = comm.allreduce(test_loss), comm.allreduce(correct)  # mpisign
    test_loss /= n_test
    if mpisign.on_root(comm):  # mpisign
        print("\nTest set: Average loss: {:.4f}, Accuracy: {}/{} ({:.0f}%)\n".format(
            test_loss, correct, n_test, 100.0 * correct / n_test))


def main():
    parser = argparse.ArgumentParser(description="PyTorch Fashion-MNIST Example")
    parser.add_argument("--batch-size", type=int, default=64, metavar="N",
                        help="input batch size for training (default: 64)")
    parser.add_argument("--test-batch-size", type=int, default=1000, metavar="N",
                        help="input batch size for testing (default: 1000)")
    parser.add_argument("--epochs", type=int, default=14, metavar="N",
                        help="number of epochs to train (default: 14)")
    parser.add_argument("--lr", type=float, default=1e-3, metavar="LR",  # mpisign
                        help="learning rate: each step moves every weight by exactly lr "
                             "(default: 1e-3)")
    parser.add_argument("--gamma", type=float, default=0.7, metavar="M",
                        help="learning rate step gamma (default: 0.7)")
    parser.add_argument("--no-cuda", action="store_true",
                        help="train on the CPU even where there is a GPU")
    parser.add_argument("--dry-run", action="store_true",
                        help="quickly check a single pass")
    parser.add_argument("--seed", type=int, default=1, metavar="S",
                        help="random seed (default: 1)")
    parser.add_argument("--log-interval", type=int, default=10, metavar="N",
                        help="how many batches to wait before logging training status")
    parser.add_argument("--save-model", action="store_true",
                        help="save the trained model to --save-path")
    parser.add_argument("--save-path", default="fashion_mnist_cnn.pt",
                        help="where --save-model writes (default: fashion_mnist_cnn.pt)")
    parser.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist",
                        help="the idx .gz files (default: /usr/share/datasets/fashion-mnist)")
    parser.add_argument("--max-steps", type=int, default=0, metavar="N",
                        help="stop training after N steps in all (default: 0, no limit)")
    parser.add_argument("--test-limit", type=int, default=0, metavar="N",
                        help="evaluate on the first N test images only (default: 0, all)")
    args = parser.parse_args()
    if args.max_steps < 0 or args.test_limit < 0:
        parser.error("--max-steps and --test-limit must be >= 0")

    comm = MPI.COMM_WORLD  # mpisign
    use_cuda = not args.no_cuda and torch.cuda.is_available()
    torch.manual_seed(args.seed)
    node_rank = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()  # mpisign: one GPU a rank
    device = torch.device(f"cuda:{node_rank % torch.cuda.device_count()}" if use_cuda  # mpisign
                          else "cpu")

    train_ds = FashionMNIST(args.data_dir, train=True)
    test_ds = FashionMNIST(args.data_dir, train=False)
    if args.test_limit:
        test_ds = Subset(test_ds, range(min(args.test_limit, len(test_ds))))
    train_loader = DataLoader(train_ds, batch_size=args.batch_size,
                              sampler=mpisign.shard(train_ds, comm, seed=args.seed))  # mpisign
    test_part = Subset(test_ds, range(comm.rank, len(test_ds), comm.size))  # mpisign: once each
    test_loader = DataLoader(test_part, batch_size=args.test_batch_size)  # mpisign

    model = Net().to(device)
    mpisign.broadcast_parameters(model, comm)  # mpisign: every rank starts from rank 0's weights
    optimizer = mpisign.Signum(model.parameters(), lr=args.lr, comm=comm)  # mpisign

    scheduler = StepLR(optimizer, step_size=1, gamma=args.gamma)
    steps = 0
    for epoch in range(1, args.epochs + 1):
        train_loader.sampler.set_epoch(epoch)  # mpisign: a new order, the same on every rank
        steps = train(args, model, device, train_loader, optimizer, epoch, steps)
        test(model, device, test_loader, comm)  # mpisign
        scheduler.step()
        if args.max_steps and steps == args.max_steps:
            break

    if args.save_model and mpisign.on_root(comm):  # mpisign: every rank holds the same weights
        torch.save(model.state_dict(), args.save_path)
        print(f"Saved the model to {args.save_path}")


if __name__ == "__main__":
    main()
