"""Train an image classifier with Signum / signSGD majority vote over MPI, or the fp32 baseline.

One process per rank; every rank trains the same model on its own shard of the data and the
optimizer's majority vote keeps their parameters identical. Rank 0 alone prints and writes the
books; every rank writes its own part of a checkpoint (Signum's momentum is per worker).

On this machine, or a laptop (Fashion-MNIST from Debian's dataset-fashion-mnist, else digits)::

    mpirun -n 4 python -m mpisign.train
    mpirun -n 4 python -m mpisign.train --optimizer sgd --out runs/sgd
    mpirun -n 4 python -m mpisign.train --topology tree --epochs 5 --out runs/tree
    mpirun -n 7 python -m mpisign.train --adversaries 3 --attack invert --out runs/adv3of7
    mpirun -n 7 python -m mpisign.train --adversaries 3 --attack omniscient   # not blind
    mpirun -n 4 python -m mpisign.train --out runs/tree --resume      # continue a run
    python -m mpisign.plot runs/sgd runs/tree runs/adv3of7

More ranks than cores, or root in a container: ``python -m mpisign.launch -n 4 -- python -m
mpisign.train ...`` sets what Open MPI needs, or by hand::

    OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_mpi_yield_when_idle=1 \\
    OMP_NUM_THREADS=1 mpirun -n 4 --oversubscribe python -m mpisign.train

On a Slurm cluster, one GPU per rank (see slurm/train.sbatch, slurm/multinode.sbatch)::

    srun python -m mpisign.train --model resnet18 --dataset cifar10 --data-dir $DATA \\
        --device cuda --out runs/$SLURM_JOB_ID --resume

Output in ``--out``: ``metrics.jsonl`` (a record every ``--log-every`` steps, one per epoch,
and events), ``run.json`` (configuration, MPI library, ranks and nodes, versions, Slurm job),
``checkpoints/`` (see :mod:`mpisign.checkpoint`). SIGUSR1 or SIGTERM on any rank (Slurm's
``--signal``; Open MPI's mpirun forwards SIGUSR1 to the ranks, but ends the job on SIGTERM)
makes every rank stop after the current step, checkpoint and exit 0; ``--resume`` then
continues bit for bit on CPU. An unhandled exception on any rank aborts the whole job.

Timing: ``compute_s`` is forward + backward (+ the attack; ``omniscient``'s extra vote among
the honest ranks and its broadcast count here), ``comm_s`` the optimizer step:
packing, the vote and the update for Signum, the allreduce and the update for SGD. Bytes: what
the vote posted to MPI, exactly; for ``sgd`` the ring-allreduce volume ``8 d (M-1) / M``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import signal
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from mpi4py import MPI

import mpisign

from . import checkpoint
from .adversary import ATTACKS, NON_BLIND_ATTACKS, Omniscient, attack_gradients, make_attack
from .allreduce import AllreduceMean
from .checkpoint import StopRequest
from .comm import bounded
from .data import (DATASETS, DataNotFound, batches_per_epoch, default_workers, load_data,
                   eval_batches, train_batches)
from .metrics import INTERVAL_FIELDS, Metrics, log_interval, run_record
from .models import MODELS, build_model
from .state import broadcast_parameters
from .world import SingletonWorld, check_world

log = logging.getLogger("mpisign.train")

#: Learning rate when --lr is not given. Sign descent moves every coordinate by lr.
DEFAULT_LR = {"signum": 1e-3, "signsgd": 1e-3, "sgd": 0.05}
#: Options that must not change on --resume: the checkpoint's state depends on them.
#: --epochs when not given: 2 epochs of Fashion-MNIST, i.e. 120,000 examples seen. When the
#: default data set falls back to the small digits, the run sees as many examples instead, so
#: that a first run shows learning rather than 10 steps.
DEFAULT_EPOCHS = 2
DEFAULT_EXAMPLES = 120_000
#: Options that must not change on --resume: the checkpoint's state depends on them.
FIXED_ON_RESUME = ("model", "dataset", "optimizer", "batch_size", "seed", "adversaries",
                   "attack", "momentum")


class UsageError(Exception):
    """A bad option or missing input: every rank exits 2 with the message, no traceback."""


# -- command line ---------------------------------------------------------------------------------
class Parser(argparse.ArgumentParser):
    """argparse whose help and errors are printed by rank 0 only (all ranks parse and exit)."""

    def _print_message(self, message, file=None):
        if MPI.COMM_WORLD.Get_rank() == 0:
            super()._print_message(message, file)


def positive_int(text: str) -> int:
    """argparse type: an int > 0 (shared with mpisign.diagnostics)."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    """argparse type: an int >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m mpisign.train",
               description="Data-parallel training with Signum/signSGD majority vote over MPI "
                           "(Bernstein et al., ICLR 2019), or the fp32 allreduce SGD baseline. "
                           "Launch with mpirun/srun, one process per rank.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", choices=MODELS, default="cnn",
                   help="small CNN, or torchvision ResNet (no pretrained weights)")
    g.add_argument("--dataset", choices=DATASETS, default=None,
                   help="default: fashion-mnist if installed, else digits (announced)")
    g.add_argument("--data-dir", default=None,
                   help="where the data lives (fashion-mnist default: "
                        "/usr/share/datasets/fashion-mnist; required for cifar10, imagefolder)")
    g.add_argument("--workers", type=nonnegative_int, default=None,
                   help="DataLoader workers per rank (default: 0 in memory, a few for images)")
    g = p.add_argument_group("optimizer")
    g.add_argument("--optimizer", choices=("signum", "signsgd", "sgd"), default="signum",
                   help="sgd: plain SGD on the fp32 allreduce mean of the gradients")
    g.add_argument("--topology", choices=[*sorted(mpisign.TOPOLOGIES), "auto"],
                   default="server", help="how the vote travels (signum, signsgd); auto: the "
                   "cost model's choice for this model, rank count and measured link")
    g.add_argument("--lr", type=_finite_float, default=None,
                   help=f"learning rate (default: {DEFAULT_LR})")
    g.add_argument("--momentum", type=_finite_float, default=None,
                   help="momentum in [0, 1) (default 0.9 for signum and sgd; signsgd has none)")
    g.add_argument("--weight-decay", type=_finite_float, default=0.0)
    g.add_argument("--batch-size", type=positive_int, default=64, help="per rank")
    g.add_argument("--vote-timeout", type=_finite_float, default=None,
                   help="seconds a vote, or any other wait on the other ranks (evaluation, "
                        "metrics, checkpoint, stop signal), waits before it raises "
                        "VoteTimeout and the job aborts (default $MPISIGN_TIMEOUT or 300)")
    g.add_argument("--monitor", action=argparse.BooleanOptionalAction, default=True,
                   help="watch each rank's disagreement with the vote over 20 steps "
                        "(mpisign.DisagreementMonitor): rank 0 warns about ranks that stand "
                        "out, and step records list them as 'suspects'")
    g.add_argument("--check-every", type=nonnegative_int, default=0,
                   help="check every N steps that all ranks hold identical parameters "
                        "(always checked at epoch ends); 0: epoch ends only")
    g = p.add_argument_group("schedule")
    g.add_argument("--epochs", type=positive_int, default=None,
                   help=f"default {DEFAULT_EPOCHS}; when the default data set falls back to "
                        f"digits, as many as see {DEFAULT_EXAMPLES:,} examples")
    g.add_argument("--max-steps", type=positive_int, default=None,
                   help="stop after this many steps in all (overrides --epochs)")
    g.add_argument("--warmup-epochs", type=float, default=0.0,
                   help="linear warmup of the learning rate over this many epochs")
    g.add_argument("--lr-decay-epochs", type=float, nargs="*", default=[], metavar="EPOCH",
                   help="step decay: multiply the learning rate by --lr-decay at these epochs")
    g.add_argument("--lr-decay", type=_finite_float, default=0.1)
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("adversaries (Byzantine workers)")
    g.add_argument("--adversaries", type=nonnegative_int, default=0, metavar="K",
                   help="the first K ranks corrupt their gradients before the vote")
    g.add_argument("--attack", choices=(*ATTACKS, *NON_BLIND_ATTACKS), default="invert",
                   help="blind multiplicative attack, or omniscient: minus the honest ranks' "
                        "majority (see mpisign.adversary)")
    g.add_argument("--attack-factor", type=float, default=1e20,
                   help="multiplier of --attack scale")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None,
                   help="metrics, run.json and checkpoints (default runs/<date>-<optimizer>)")
    g.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint in --out (start afresh if it has none)")
    g.add_argument("--checkpoint-every", type=nonnegative_int, default=0, metavar="N",
                   help="also checkpoint every N steps (always at epoch ends, on SIGUSR1/"
                        "SIGTERM and at the end)")
    g.add_argument("--keep-checkpoints", type=positive_int, default=1, metavar="N",
                   help="keep the newest N checkpoints (more give python -m mpisign.diagnostics "
                        "a sequence over training)")
    g.add_argument("--log-every", type=positive_int, default=20, metavar="N",
                   help="a metrics record every N steps")
    g.add_argument("--eval-batch-size", type=positive_int, default=1000)
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="tqdm progress bar on rank 0")
    g.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: one GPU per rank, chosen by node-local rank")
    return p


def check_args(args, world: int) -> None:
    """Cross-option checks; the same on every rank, before any collective."""
    if args.optimizer == "signsgd" and args.momentum:
        raise UsageError("--optimizer signsgd has no momentum; use --optimizer signum "
                         "--momentum BETA")
    if args.momentum is not None and not 0.0 <= args.momentum < 1.0:
        raise UsageError(f"--momentum must be in [0, 1), got {args.momentum}")
    if args.lr is not None and args.lr <= 0:
        raise UsageError(f"--lr must be > 0, got {args.lr}")
    if args.vote_timeout is not None and args.vote_timeout <= 0:
        raise UsageError(f"--vote-timeout must be > 0 seconds, got {args.vote_timeout}")
    if args.weight_decay < 0:
        raise UsageError(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if args.warmup_epochs < 0 or any(e <= 0 for e in args.lr_decay_epochs):
        raise UsageError("--warmup-epochs must be >= 0 and --lr-decay-epochs > 0")
    if args.adversaries > world:
        raise UsageError(f"--adversaries {args.adversaries} is more than the {world} ranks "
                         f"this job has")
    if args.attack in NON_BLIND_ATTACKS and args.adversaries >= world:
        raise UsageError(f"--attack {args.attack} copies the honest ranks: --adversaries must "
                         f"be less than the {world} ranks, got {args.adversaries}")
    if args.resume and args.out is None:
        raise UsageError("--resume needs --out: the directory of the run to continue")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but torch sees no CUDA device on this node")


def collectively(comm, fn, *args):
    """Run ``fn`` on every rank; if it fails with a user error on any rank, every rank raises
    the same UsageError (instead of the others entering the next collective and waiting)."""
    try:
        result, err = fn(*args), None
    except (UsageError, DataNotFound, FileNotFoundError, checkpoint.CheckpointError) as e:
        result, err = None, str(e)
    errors = comm.allgather(err)
    failed = [r for r, e in enumerate(errors) if e]
    if failed:
        where = "" if len(failed) == comm.Get_size() else f" (on rank(s) {failed})"
        raise UsageError(errors[failed[0]] + where)
    return result


# -- pieces of the run -----------------------------------------------------------------------------
def learning_rate(args, step: int, steps_per_epoch: int) -> float:
    """``args.lr`` times a linear warmup, times ``lr_decay`` per decay epoch passed."""
    lr = args.lr
    warmup = args.warmup_epochs * steps_per_epoch
    if warmup > 0 and step < warmup:
        lr *= (step + 1) / warmup
    passed = sum(step >= e * steps_per_epoch for e in args.lr_decay_epochs)
    return lr * args.lr_decay ** passed


@torch.no_grad()
def evaluate(model, data, args, comm, device) -> tuple[float, float]:
    """Loss and accuracy over the whole test set: each rank scores its part, sums are added."""
    if list(model.buffers()):
        # BN statistics: rank 0's, everywhere.
        broadcast_parameters(list(model.buffers()), comm, timeout=args.vote_timeout)
    model.eval()
    sums = np.zeros(3)
    for x, y in eval_batches(data.test, rank=comm.Get_rank(), world=comm.Get_size(),
                             batch_size=args.eval_batch_size, workers=args.workers):
        x, y = x.to(device), y.to(device)
        out = model(x)
        sums += (F.cross_entropy(out, y, reduction="sum").item(),
                 (out.argmax(1) == y).sum().item(), len(y))
    # Wait on MPI: the full-test-set figures need every rank's sums.
    bounded(comm.Iallreduce(MPI.IN_PLACE, sums, op=MPI.SUM),
            f"evaluation sums on rank {comm.Get_rank()}", args.vote_timeout)
    model.train()
    return sums[0] / sums[2], sums[1] / sums[2]


# -- the run ---------------------------------------------------------------------------------------
def main(argv=None) -> int:
    # Config: options, then the checks that need the world size. ---------------------------------
    comm = MPI.COMM_WORLD
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        # Before anything is written: N tasks that each see a world of 1 must not share --out.
        check_world(comm)
        return train(args, comm)
    except UsageError as e:
        parser.error(str(e))  # rank 0 prints; every rank exits 2
    except SingletonWorld as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")  # not a usage error: no usage text


def train(args, comm) -> int:
    """The run, top to bottom; every rank executes it."""
    rank, world = comm.Get_rank(), comm.Get_size()
    check_args(args, world)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    if rank != 0:
        # What the run and its data say is the same on every rank: rank 0 alone says it.
        # The library's loggers keep their warnings: those are about this rank.
        for name in ("mpisign.train", "mpisign.data"):
            logging.getLogger(name).setLevel(logging.ERROR)
    args.lr = DEFAULT_LR[args.optimizer] if args.lr is None else args.lr
    if args.momentum is None:
        args.momentum = 0.0 if args.optimizer == "signsgd" else 0.9
    adversary = rank < args.adversaries
    if args.adversaries and args.adversaries * 2 >= world:
        log.warning("%d of %d ranks are adversaries: majority vote is only guaranteed to "
                    "withstand fewer than half", args.adversaries, world)
    if adversary and args.attack in ("inf", "nan"):
        logging.getLogger("mpisign.optim").setLevel(logging.ERROR)  # expected, counted in metrics

    # Init: output directory (named by rank 0), device by node-local rank, seeds. ---------------
    if args.out is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        args.out = comm.bcast(f"runs/{stamp}-{args.optimizer}" if rank == 0 else None, root=0)
    out = Path(args.out)
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local_rank = node.Get_rank()
    node.Free()
    if args.device == "cuda":
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    stop = StopRequest(comm, timeout=args.vote_timeout)

    # Data: every rank loads it; a missing directory stops every rank with one message. ---------
    data = collectively(comm, load_data, args.dataset, args.data_dir)
    if args.workers is None:
        args.workers = default_workers(data.train)
    steps_per_epoch = batches_per_epoch(len(data.train), world, args.batch_size)
    if steps_per_epoch == 0:
        raise UsageError(f"--batch-size {args.batch_size} is larger than each rank's share "
                         f"({-(-len(data.train) // world)} of {len(data.train)} examples)")
    if args.epochs is None:
        args.epochs = default_epochs(data)
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)

    # Model: the same seed on every rank, then rank 0's values broadcast to be sure. -----------
    torch.manual_seed(args.seed)
    model = build_model(args.model, data.in_channels, data.num_classes, data.image_size)
    model.to(device)
    broadcast_parameters(model, comm, timeout=args.vote_timeout)
    # From here on each rank draws its own random numbers (dropout, the random attack).
    seeds = np.random.SeedSequence([args.seed, rank]).generate_state(3)
    torch.manual_seed(int(seeds[0]))
    np.random.seed(int(seeds[1]) % 2**32)
    attack_rng = torch.Generator().manual_seed(int(seeds[2]))
    attack = (make_attack(args.attack, generator=attack_rng, factor=args.attack_factor)
              if adversary and args.attack in ATTACKS else None)

    # Optimizer. -------------------------------------------------------------------------------
    allreduce = None
    if args.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                              weight_decay=args.weight_decay)
        allreduce = AllreduceMean(model.parameters(), comm)
    else:
        opt = mpisign.Signum(model.parameters(), lr=args.lr, momentum=args.momentum,
                             weight_decay=args.weight_decay, comm=comm, topology=args.topology,
                             timeout=args.vote_timeout, check_every=args.check_every,
                             monitor=mpisign.DisagreementMonitor() if args.monitor else None)
    # The non-blind attack: collective, built on every rank (mpisign.adversary.Omniscient).
    omniscient = (Omniscient(comm, args.adversaries, topology=args.topology,
                             timeout=args.vote_timeout)
                  if args.attack in NON_BLIND_ATTACKS and args.adversaries else None)

    # Resume: from the checkpoint in --out, if there is one. -----------------------------------
    step, evaluated, elapsed_before, epoch_started = 0, 0, 0.0, 0.0
    epoch_sums = np.zeros(3)   # this rank's loss sum, correct, count in the current epoch
    resume_from = collectively(comm, find_checkpoint, args, out)
    if resume_from is not None:
        common, own = collectively(comm, load_checkpoint, resume_from, args, data, comm)
        model.load_state_dict(common["model"])
        opt.load_state_dict(own["optimizer"])
        checkpoint.restore_rng(own["rng"])
        attack_rng.set_state(own["attack_rng"])
        epoch_sums = np.asarray(own["epoch_sums"], dtype=np.float64)
        step, evaluated = common["step"], common["evaluated_epochs"]
        elapsed_before, epoch_started = common["elapsed"], common["epoch_started_at"]
        log.info("resuming from %s at step %d", resume_from, step)
    record = run_record(args, comm, data, model, device, steps_per_epoch, total_steps,
                        step if resume_from else None)
    metrics = None
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if resume_from is not None and (out / "run.json").is_file():
            previous = json.loads((out / "run.json").read_text())
            record["previous_launches"] = previous.pop("previous_launches", []) + [previous]
        (out / "run.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
        log.info("%s, %d ranks on %d node(s), %s %s, %d parameters, %d steps/epoch, "
                 "%d steps, out: %s", data.name, world, len(record["nodes"]), args.optimizer,
                 args.topology if allreduce is None else "allreduce",
                 record["model"]["parameters"], steps_per_epoch, total_steps, out)
    metrics = Metrics(out / "metrics.jsonl" if rank == 0 else None,
                      append=resume_from is not None)
    if resume_from is not None:
        metrics.write(type="resume", step=step, path=str(resume_from), world_size=world,
                      slurm_restart_count=record["slurm"].get("SLURM_RESTART_COUNT"),
                      time=elapsed_before)
    t_launch = time.perf_counter()

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - t_launch

    def save(why: str) -> None:
        common = {"model": model.state_dict(), "step": step, "evaluated_epochs": evaluated,
                  "elapsed": elapsed(), "epoch_started_at": epoch_started,
                  "config": vars(args), "world_size": world, "dataset": data.name,
                  "mpisign": mpisign.__version__}
        own = {"rank": rank, "optimizer": opt.state_dict(), "rng": checkpoint.capture_rng(),
               "attack_rng": attack_rng.get_state(), "epoch_sums": epoch_sums.tolist()}
        where = checkpoint.save(out, step, common, own, comm, keep=args.keep_checkpoints,
                                timeout=args.vote_timeout)
        metrics.write(type="checkpoint", step=step, why=why, path=str(where), time=elapsed())

    # Loop: epochs of this rank's batches; books every --log-every steps. ----------------------
    interval = np.zeros(len(INTERVAL_FIELDS))   # this rank's sums since the last step record
    traffic_before = _traffic(opt, allreduce)
    saved_at, caught = -1, 0
    model.train()
    while True:
        epoch, first = divmod(step, steps_per_epoch)
        if first == 0 and epoch > evaluated:   # an epoch just ended: evaluate it
            # Wait on MPI: the epoch's training figures summed over ranks.
            train_sums = epoch_sums.copy()
            bounded(comm.Iallreduce(MPI.IN_PLACE, train_sums, op=MPI.SUM),
                    f"epoch sums on rank {rank}", args.vote_timeout)
            test_loss, test_acc = evaluate(model, data, args, comm, device)
            if allreduce is None:
                opt.check_consistency()
            evaluated = epoch
            metrics.write(type="epoch", epoch=epoch, step=step,
                          train_loss=train_sums[0] / max(1, train_sums[2]),
                          train_acc=train_sums[1] / max(1, train_sums[2]),
                          test_loss=test_loss, test_acc=test_acc, time=elapsed(),
                          epoch_time=elapsed() - epoch_started)
            if rank == 0:
                log.info("epoch %d: train loss %.4f acc %.4f, test loss %.4f acc %.4f, %.1f s",
                         epoch, train_sums[0] / max(1, train_sums[2]),
                         train_sums[1] / max(1, train_sums[2]), test_loss, test_acc,
                         elapsed() - epoch_started)
            epoch_sums[:] = 0
            epoch_started = elapsed()
            save("epoch")
            saved_at = step
        if step >= total_steps:
            break
        bar = _progress(args, rank, epoch, epochs, first, steps_per_epoch)
        for x, y in train_batches(data.train, rank=rank, world=world,
                                  batch_size=args.batch_size, seed=args.seed, epoch=epoch,
                                  start=first, workers=args.workers):
            lr = learning_rate(args, step, steps_per_epoch)
            for group in opt.param_groups:
                group["lr"] = lr
            stop.post()
            t0 = time.perf_counter()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            out_ = model(x)
            loss = F.cross_entropy(out_, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if attack is not None:
                attack_gradients(model.parameters(), attack)
            elif omniscient is not None:
                omniscient(opt, step)   # collective: the honest ranks' vote, then a broadcast
            _sync(device)
            t1 = time.perf_counter()
            if allreduce is not None:
                allreduce()
            opt.step()
            _sync(device)
            t2 = time.perf_counter()
            caught = stop.wait()
            step += 1
            sums = (loss.item() * len(y), (out_.argmax(1) == y).sum().item(), len(y))
            epoch_sums += sums
            interval += (*sums, t1 - t0, t2 - t1, 1)
            if bar is not None:
                bar.update(1)
            if step % args.log_every == 0:
                traffic = _traffic(opt, allreduce)
                per_step = [(traffic[i] - traffic_before[i]) / interval[5] for i in (0, 1)]
                watched = allreduce is None and opt.monitor is not None
                record = log_interval(metrics, comm, interval, (*per_step, *traffic[2:]), step,
                                      steps_per_epoch, lr, elapsed(),
                                      {"suspects": opt.stats.suspects} if watched else None,
                                      timeout=args.vote_timeout)
                if bar is not None and record is not None:
                    bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['acc']:.3f}",
                                    ms=f"{1e3 * record['step_s']:.0f}", refresh=False)
                interval[:] = 0
                traffic_before = traffic
            if caught:
                break
            if args.checkpoint_every and step % args.checkpoint_every == 0:
                save("every")
                saved_at = step
            if step >= total_steps:
                break
        if bar is not None:
            bar.close()
        if caught:
            break

    # End: a signal's checkpoint, or the final evaluation when the run ended mid-epoch. ----------
    if caught:
        name = signal.Signals(caught).name
        metrics.write(type="stopped", step=step, signal=name, time=elapsed())
        if rank == 0:
            log.info("%s: checkpointing at step %d and exiting", name, step)
    elif step % steps_per_epoch:
        test_loss, test_acc = evaluate(model, data, args, comm, device)
        metrics.write(type="final", step=step, test_loss=test_loss, test_acc=test_acc,
                      time=elapsed())
        if rank == 0:
            log.info("step %d: test loss %.4f acc %.4f", step, test_loss, test_acc)
    if saved_at != step:
        save("signal" if caught else "end")
    if not caught:
        metrics.write(type="done", step=step, time=elapsed())
    if omniscient is not None:
        omniscient.free()
    return 0


# -- helpers of the loop ---------------------------------------------------------------------------
def find_checkpoint(args, out: Path) -> Path | None:
    """The checkpoint to resume from; refuses to write over a run that was not asked to resume."""
    where = checkpoint.latest(out)
    if where is not None and not args.resume:
        raise UsageError(f"{out} already holds a checkpoint ({where.name}): pass --resume to "
                         f"continue that run, or choose another --out")
    if where is None and args.resume:
        log.warning("--resume: no checkpoint in %s, starting afresh", out)
    return where


def default_epochs(data) -> int:
    """--epochs when not given: :data:`DEFAULT_EPOCHS`, or on the digits fallback as many as
    see :data:`DEFAULT_EXAMPLES` examples (announced)."""
    if not data.note:
        return DEFAULT_EPOCHS
    epochs = max(DEFAULT_EPOCHS, math.ceil(DEFAULT_EXAMPLES / len(data.train)))
    log.info("%s is small: %d epochs, to see %d examples as the default run does",
             data.name, epochs, DEFAULT_EXAMPLES)
    return epochs


def load_checkpoint(where: Path, args, data, comm) -> tuple[dict, dict]:
    """This rank's part of the checkpoint, after checking it belongs to a run like this one."""
    common, own = checkpoint.load(where, comm.Get_rank())
    if common["world_size"] != comm.Get_size():
        raise UsageError(f"{where} was written by {common['world_size']} ranks, this job has "
                         f"{comm.Get_size()}: resume with the same number of ranks (each "
                         f"rank's Signum momentum is its own)")
    saved = common["config"]
    differ = [k for k in FIXED_ON_RESUME if saved.get(k) != getattr(args, k)]
    if common["dataset"] != data.name:
        differ.append("dataset")
    if differ:
        raise UsageError(f"--resume: {', '.join(sorted(set(differ)))} differ from the run in "
                         f"{where} ({', '.join(f'{k}={saved.get(k)!r}' for k in differ)}); "
                         f"they cannot change mid-run")
    changed = {k: (saved[k], v) for k, v in vars(args).items()
               if k in saved and saved[k] != v and k not in ("resume",)}
    if changed and comm.Get_rank() == 0:
        log.info("--resume with changed options (was, now): %s", changed)
    return common, own


def _progress(args, rank: int, epoch: int, epochs: int, first: int, steps_per_epoch: int):
    if rank != 0 or not args.progress:
        return None
    from tqdm import tqdm

    # Not a terminal (a Slurm log): a line every 30 s instead of a redraw every 0.1 s.
    interval = 0.1 if sys.stderr.isatty() else 30.0
    return tqdm(total=steps_per_epoch, initial=first, desc=f"epoch {epoch + 1}/{epochs}",
                mininterval=interval, dynamic_ncols=True, leave=True)


def _traffic(opt, allreduce) -> tuple:
    """This rank's cumulative bytes sent and received, last disagreement, non-finite entries."""
    if allreduce is not None:
        return allreduce.bytes_sent, allreduce.bytes_sent, float("nan"), float("nan")
    st = opt.stats
    return st.bytes_sent, st.bytes_received, st.disagreement, st.nonfinite


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        # Wait on the CUDA stream: the step's timings must cover the kernels, not their launch.
        torch.cuda.synchronize(device)


def run(argv=None) -> int:
    """``main`` that turns an unhandled exception on any rank into ``MPI_Abort`` of the job."""
    try:
        return main(argv)
    except SystemExit:
        raise
    except BaseException:
        comm = MPI.COMM_WORLD
        sys.stderr.write(f"[rank {comm.Get_rank()}] unhandled exception, aborting all "
                         f"{comm.Get_size()} ranks:\n{traceback.format_exc()}")
        sys.stderr.flush()
        comm.Abort(1)
        return 1


if __name__ == "__main__":
    sys.exit(run())
