"""The training run, stage by stage, in the order it happens; every rank executes all of it.

1. :func:`configure`: check the options against the world size, logging, the defaults.
2. :func:`setup`: output directory, device, data, model, seeds and optimizer, in one :class:`Run`.
3. :func:`resume`: the run's state from the checkpoint in ``--out``, if there is one.
4. :func:`open_books`: ``run.json`` and ``metrics.jsonl``.
5. :func:`train_epochs`: epochs of :func:`train_step`, a ``step`` record every ``--log-every``
   steps (:func:`log_step`), and at each epoch's end :func:`end_epoch`: evaluation, the
   ``epoch`` record, a checkpoint (:func:`save`).
6. :func:`finish`: a signal's checkpoint, or the last evaluation, and ``done``.
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
from dataclasses import astuple, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from mpi4py import MPI

import mpisign

from .adversary import ATTACKS, NON_BLIND_ATTACKS, Omniscient, attack_gradients, make_attack
from ..mpi.comm import bounded
from ..optim.state import broadcast_parameters
from . import checkpoint
from .baseline import AllreduceMean
from .checkpoint import StopRequest
from .data import (Data, DataNotFound, batches_per_epoch, default_workers, eval_batches,
                   load_data, train_batches)
from .metrics import Interval, Metrics, Tally, Traffic, log_interval, run_record
from .models import build_model
from .options import DEFAULT_EPOCHS, DEFAULT_EXAMPLES, DEFAULT_LR, UsageError
from .survivors import check_elastic, follow, survive

__all__ = ["Run", "train", "learning_rate", "evaluate", "load_checkpoint"]

log = logging.getLogger("mpisign.train")

#: Options that must not change on --resume: the checkpoint's state depends on them.
FIXED_ON_RESUME = ("model", "dataset", "optimizer", "batch_size", "seed", "adversaries",
                   "attack", "momentum")


@dataclass
class Run:
    """One rank's run: what :func:`setup` builds, and the progress the stages advance."""

    args: argparse.Namespace
    comm: MPI.Comm
    out: Path
    device: torch.device
    stop: StopRequest
    data: Data
    steps_per_epoch: int
    total_steps: int
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    baseline: AllreduceMean | None       # --optimizer sgd: the allreduce before opt.step()
    attack_rng: torch.Generator
    attack: Callable | None              # this rank's blind attack on its gradients
    omniscient: Omniscient | None        # the non-blind attack, a collective of every rank
    # Progress, kept in checkpoints.
    step: int = 0
    evaluated: int = 0                   # epochs evaluated so far
    elapsed_before: float = 0.0          # seconds in the run's earlier launches
    epoch_started: float = 0.0           # elapsed() when the current epoch began
    epoch_tally: Tally = field(default_factory=Tally)
    # This launch only.
    resumed_from: Path | None = None
    metrics: Metrics | None = None
    t_launch: float = 0.0
    lr: float = 0.0                      # the last step's
    interval: Interval = field(default_factory=Interval)
    last_traffic: Traffic | None = None  # the counters at the last step record
    saved_at: int = -1                   # the step of the last checkpoint
    caught: int = 0                      # the signal all ranks agreed to stop on (0: none)

    @property
    def rank(self) -> int:
        return self.comm.Get_rank()

    @property
    def world(self) -> int:
        return self.comm.Get_size()

    @property
    def epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)

    def elapsed(self) -> float:
        """Wall seconds of training, across resumes."""
        return self.elapsed_before + time.perf_counter() - self.t_launch


def train(args, comm) -> int:
    """The run, top to bottom; every rank executes it."""
    configure(args, comm)
    run = setup(args, comm)
    resume(run)
    open_books(run)
    train_epochs(run)
    finish(run)
    return 0


# -- 1. configure ---------------------------------------------------------------------------------
def configure(args, comm) -> None:
    """Check the options, set up logging, fill in the defaults that depend on other options."""
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
    if args.adversaries and args.adversaries * 2 >= world:
        log.warning("%d of %d ranks are adversaries: majority vote is only guaranteed to "
                    "withstand fewer than half", args.adversaries, world)
    if rank < args.adversaries and args.attack in ("inf", "nan"):
        logging.getLogger("mpisign.optim").setLevel(logging.ERROR)  # expected, counted in metrics


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
    check_elastic(args)


# -- 2. setup -------------------------------------------------------------------------------------
def setup(args, comm) -> Run:
    """Everything the run needs, in an order every rank follows (several steps are
    collective, and the random numbers drawn depend on it)."""
    out = _output_dir(args, comm)
    device = _device(args, comm)
    stop = StopRequest(comm, timeout=args.vote_timeout)
    data, steps_per_epoch, total_steps = _load_data(args, comm)
    model = _build_model(args, comm, data, device)
    attack_rng, attack = _seed_rank(args, comm.Get_rank())
    opt, baseline, omniscient = _build_optimizer(args, comm, model)
    return Run(args=args, comm=comm, out=out, device=device, stop=stop, data=data,
               steps_per_epoch=steps_per_epoch, total_steps=total_steps, model=model, opt=opt,
               baseline=baseline, attack_rng=attack_rng, attack=attack, omniscient=omniscient)


def _output_dir(args, comm) -> Path:
    """--out, by default ``runs/<date>-<optimizer>`` as rank 0 names it."""
    if args.out is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        args.out = comm.bcast(f"runs/{stamp}-{args.optimizer}" if comm.Get_rank() == 0 else None,
                              root=0)
    return Path(args.out)


def _device(args, comm) -> torch.device:
    """The CPU, or for --device cuda the GPU of this rank's node-local rank (collective)."""
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    local_rank = node.Get_rank()
    node.Free()
    if args.device != "cuda":
        return torch.device("cpu")
    device = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def _load_data(args, comm) -> tuple[Data, int, int]:
    """The data, the steps per epoch and the steps in all. Every rank loads the data; a
    missing directory stops every rank with one message."""
    data = collectively(comm, load_data, args.dataset, args.data_dir)
    if args.workers is None:
        args.workers = default_workers(data.train)
    world = comm.Get_size()
    steps_per_epoch = batches_per_epoch(len(data.train), world, args.batch_size)
    if steps_per_epoch == 0:
        raise UsageError(f"--batch-size {args.batch_size} is larger than each rank's share "
                         f"({-(-len(data.train) // world)} of {len(data.train)} examples)")
    if args.epochs is None:
        args.epochs = default_epochs(data)
    return data, steps_per_epoch, args.max_steps or args.epochs * steps_per_epoch


def _build_model(args, comm, data: Data, device: torch.device) -> torch.nn.Module:
    """The same seed on every rank, then rank 0's values broadcast to be sure."""
    torch.manual_seed(args.seed)
    model = build_model(args.model, data.in_channels, data.num_classes, data.image_size)
    model.to(device)
    broadcast_parameters(model, comm, timeout=args.vote_timeout)
    return model


def _seed_rank(args, rank: int) -> tuple[torch.Generator, Callable | None]:
    """Seed this rank's own random numbers (dropout, the random attack) from here on; the
    attack's generator, and the blind attack if this rank is an adversary."""
    seeds = np.random.SeedSequence([args.seed, rank]).generate_state(3)
    torch.manual_seed(int(seeds[0]))
    np.random.seed(int(seeds[1]) % 2**32)
    attack_rng = torch.Generator().manual_seed(int(seeds[2]))
    attack = (make_attack(args.attack, generator=attack_rng, factor=args.attack_factor)
              if rank < args.adversaries and args.attack in ATTACKS else None)
    return attack_rng, attack


def _build_optimizer(args, comm, model):
    """Signum / signSGD, or torch SGD and the allreduce that feeds it; the non-blind attack
    (collective: built on every rank, see mpisign.train.adversary.Omniscient)."""
    baseline = None
    if args.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                              weight_decay=args.weight_decay)
        baseline = AllreduceMean(model.parameters(), comm)
    else:
        opt = mpisign.Signum(model.parameters(), lr=args.lr, momentum=args.momentum,
                             weight_decay=args.weight_decay, comm=comm, topology=args.topology,
                             timeout=args.vote_timeout, check_every=args.check_every,
                             monitor=mpisign.DisagreementMonitor() if args.monitor else None,
                             elastic=args.elastic)
    omniscient = (Omniscient(comm, args.adversaries, topology=args.topology,
                             timeout=args.vote_timeout)
                  if args.attack in NON_BLIND_ATTACKS and args.adversaries else None)
    return opt, baseline, omniscient


# -- 3. resume ------------------------------------------------------------------------------------
def resume(run: Run) -> None:
    """Continue from the checkpoint in --out, if there is one: model, optimizer, random
    generators and the books' counters, as they were when it was taken."""
    where = collectively(run.comm, find_checkpoint, run.args, run.out)
    if where is None:
        return
    common, own = collectively(run.comm, load_checkpoint, where, run.args, run.data, run.comm)
    run.model.load_state_dict(common["model"])
    run.opt.load_state_dict(own["optimizer"])
    if own.get("rank") != run.rank:   # a rank new to the run (see load_checkpoint)
        run.opt.state.clear()          # its momentum starts at zero
    else:
        checkpoint.restore_rng(own["rng"])
        run.attack_rng.set_state(own["attack_rng"])
        run.epoch_tally = Tally(*own["epoch_sums"])
    saved_spe = common.get("steps_per_epoch")   # in checkpoints since elastic runs
    if saved_spe and saved_spe != run.steps_per_epoch:
        # The schedule stays the first launch's (steps per epoch and in all), whatever the
        # number of ranks now or when the checkpoint was written (after an elastic shrink).
        run.steps_per_epoch = saved_spe
        run.total_steps = run.args.max_steps or run.args.epochs * saved_spe
    run.step, run.evaluated = common["step"], common["evaluated_epochs"]
    run.elapsed_before, run.epoch_started = common["elapsed"], common["epoch_started_at"]
    run.resumed_from = where
    log.info("resuming from %s at step %d", where, run.step)


def find_checkpoint(args, out: Path) -> Path | None:
    """The checkpoint to resume from; refuses to write over a run that was not asked to resume."""
    where = checkpoint.latest(out)
    if where is not None and not args.resume:
        raise UsageError(f"{out} already holds a checkpoint ({where.name}): pass --resume to "
                         f"continue that run, or choose another --out")
    if where is None and args.resume:
        log.warning("--resume: no checkpoint in %s, starting afresh", out)
    return where


def load_checkpoint(where: Path, args, data, comm) -> tuple[dict, dict]:
    """This rank's part of the checkpoint, after checking it belongs to a run like this one."""
    common = checkpoint.load_file(where / "common.pt")
    rank = comm.Get_rank()
    # A different number of ranks: those the checkpoint has load their own state; a new rank
    # takes rank 0's optimizer state (hyperparameters, step) without its momentum.
    own = checkpoint.load_file(where / f"rank-{rank if rank < common['world_size'] else 0:05d}.pt")
    if common["world_size"] != comm.Get_size():
        if args.optimizer == "sgd":
            raise UsageError(f"{where} was written by {common['world_size']} ranks, this job "
                             f"has {comm.Get_size()}: --optimizer sgd resumes on as many ranks")
        if rank == 0:
            log.warning("resuming %d ranks' checkpoint on %d ranks: %s", common["world_size"],
                        comm.Get_size(),
                        f"ranks {common['world_size']}..{comm.Get_size() - 1} start with zero "
                        f"momentum (about 1/(1-momentum) steps to warm up)"
                        if comm.Get_size() > common["world_size"] else
                        f"the momentum of ranks {comm.Get_size()}..{common['world_size'] - 1} "
                        f"is dropped")
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


# -- 4. the books ---------------------------------------------------------------------------------
def open_books(run: Run) -> None:
    """``run.json`` (rank 0; a resumed run keeps its earlier launches in it), then
    ``metrics.jsonl``, appended to on a resume; the run's clock starts."""
    record = run_record(run.args, run.comm, run.data, run.model, run.device,
                        run.steps_per_epoch, run.total_steps,
                        run.step if run.resumed_from else None)
    if run.rank == 0:
        _write_run_json(run, record)
    run.metrics = Metrics(run.out / "metrics.jsonl" if run.rank == 0 else None,
                          append=run.resumed_from is not None)
    if run.resumed_from is not None:
        run.metrics.write(type="resume", step=run.step, path=str(run.resumed_from),
                          world_size=run.world,
                          slurm_restart_count=record["slurm"].get("SLURM_RESTART_COUNT"),
                          time=run.elapsed_before)
    run.t_launch = time.perf_counter()


def _write_run_json(run: Run, record: dict) -> None:
    out = run.out
    out.mkdir(parents=True, exist_ok=True)
    if run.resumed_from is not None and (out / "run.json").is_file():
        previous = json.loads((out / "run.json").read_text())
        record["previous_launches"] = previous.pop("previous_launches", []) + [previous]
    (out / "run.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    log.info("%s, %d ranks on %d node(s), %s %s, %d parameters, %d steps/epoch, "
             "%d steps, out: %s", run.data.name, run.world, len(record["nodes"]),
             run.args.optimizer, run.args.topology if run.baseline is None else "allreduce",
             record["model"]["parameters"], run.steps_per_epoch, run.total_steps, out)


# -- 5. the loop ----------------------------------------------------------------------------------
def train_epochs(run: Run) -> None:
    """Epochs of this rank's batches until the run's steps are done or a signal stops every
    rank; each epoch that ends is evaluated and checkpointed, also when a resume starts there."""
    run.last_traffic = _traffic(run)
    run.model.train()
    while not run.caught:
        epoch, first = divmod(run.step, run.steps_per_epoch)
        if first == 0 and epoch > run.evaluated:
            end_epoch(run, epoch)
        if run.step >= run.total_steps:
            return
        train_epoch(run, epoch, first)


def train_epoch(run: Run, epoch: int, first: int) -> None:
    """This rank's batches of ``epoch`` from batch ``first`` on, until the epoch ends, the
    run's steps are done or a signal stops every rank."""
    args = run.args
    bar = _progress(args, run.rank, epoch, run.epochs, first, run.steps_per_epoch)
    for x, y in train_batches(run.data.train, rank=run.rank, world=run.world,
                              batch_size=args.batch_size, seed=args.seed, epoch=epoch,
                              start=first, workers=args.workers, count=run.steps_per_epoch):
        train_step(run, x, y)
        if bar is not None:
            bar.update(1)
        if run.step % args.log_every == 0:
            log_step(run, bar)
        if run.caught:
            break
        if args.checkpoint_every and run.step % args.checkpoint_every == 0:
            save(run, "every")
        if run.step >= run.total_steps:
            break
    if bar is not None:
        bar.close()


def train_step(run: Run, x, y) -> None:
    """One step (collective): forward, backward and the attack, then the optimizer's vote or
    allreduce and update; the ranks agree meanwhile whether a signal stops them."""
    run.lr = learning_rate(run.args, run.step, run.steps_per_epoch)
    for group in run.opt.param_groups:
        group["lr"] = run.lr
    run.stop.post()
    t0 = time.perf_counter()
    x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
    out = run.model(x)
    loss = F.cross_entropy(out, y)
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    if run.attack is not None:
        attack_gradients(run.model.parameters(), run.attack)
    elif run.omniscient is not None:
        run.omniscient(run.opt, run.step)   # collective: the honest ranks' vote, then a broadcast
    _sync(run.device)
    t1 = time.perf_counter()
    if run.baseline is not None:
        run.baseline()
    run.opt.step()
    _sync(run.device)
    t2 = time.perf_counter()
    run.caught = survive(run, run.stop.wait, default=0, what="the stop-signal agreement")
    run.step += 1
    follow(run)   # --elastic: onto the survivors, if the optimizer lost ranks
    batch = Tally(loss.item() * len(y), (out.argmax(1) == y).sum().item(), len(y))
    run.epoch_tally.add(batch)
    run.interval.add(batch, compute_s=t1 - t0, comm_s=t2 - t1)


def log_step(run: Run, bar) -> None:
    """Collective: the ``step`` record of the steps since the last one."""
    traffic = _traffic(run)
    watched = run.baseline is None and run.opt.monitor is not None
    record = survive(run, log_interval, run.metrics, run.comm, run.interval, traffic,
                     run.last_traffic, run.step, run.steps_per_epoch, run.lr, run.elapsed(),
                     {"suspects": run.opt.stats.suspects} if watched else None,
                     timeout=run.args.vote_timeout, what="the step record's sums")
    if bar is not None and record is not None:
        bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['acc']:.3f}",
                        ms=f"{1e3 * record['step_s']:.0f}", refresh=False)
    run.interval, run.last_traffic = Interval(), traffic


def end_epoch(run: Run, epoch: int) -> None:
    """Collective, once ``epoch`` has ended: its training figures over all ranks, the test
    set's, the check that every rank holds the same parameters, the ``epoch`` record and a
    checkpoint."""
    nan = Tally(math.nan, math.nan, 1.0)
    totals = survive(run, _summed, run.comm, run.epoch_tally, run.args.vote_timeout,
                     default=nan, what="the epoch's sums")
    test_loss, test_acc = survive(run, evaluate, run.model, run.data, run.args, run.comm,
                                  run.device, default=(math.nan, math.nan), what="evaluation")
    if run.baseline is None:
        run.opt.check_consistency()
        follow(run)   # --elastic: a dead rank that the check met
    run.evaluated = epoch
    now = run.elapsed()
    run.metrics.write(type="epoch", epoch=epoch, step=run.step, train_loss=totals.loss,
                      train_acc=totals.acc, test_loss=test_loss, test_acc=test_acc, time=now,
                      epoch_time=now - run.epoch_started)
    if run.rank == 0:
        log.info("epoch %d: train loss %.4f acc %.4f, test loss %.4f acc %.4f, %.1f s",
                 epoch, totals.loss, totals.acc, test_loss, test_acc, now - run.epoch_started)
    run.epoch_tally = Tally()
    run.epoch_started = run.elapsed()
    save(run, "epoch")


def save(run: Run, why: str) -> None:
    """Collective: a checkpoint (see :mod:`mpisign.train.checkpoint`), noted in the books.
    Rank 0 writes the model and the run's counters; every rank its optimizer state (Signum's
    momentum is its own), random generators and epoch sums."""
    common = {"model": run.model.state_dict(), "step": run.step,
              "evaluated_epochs": run.evaluated, "elapsed": run.elapsed(),
              "epoch_started_at": run.epoch_started, "config": vars(run.args),
              "world_size": run.world, "steps_per_epoch": run.steps_per_epoch,
              "dataset": run.data.name, "mpisign": mpisign.__version__}
    own = {"rank": run.rank, "optimizer": run.opt.state_dict(), "rng": checkpoint.capture_rng(),
           "attack_rng": run.attack_rng.get_state(), "epoch_sums": list(astuple(run.epoch_tally))}
    where = survive(run, checkpoint.save, run.out, run.step, common, own, run.comm,
                    keep=run.args.keep_checkpoints, timeout=run.args.vote_timeout,
                    what="the checkpoint")
    if where is None:
        return
    run.metrics.write(type="checkpoint", step=run.step, why=why, path=str(where),
                      time=run.elapsed())
    run.saved_at = run.step


# -- 6. finish ------------------------------------------------------------------------------------
def finish(run: Run) -> None:
    """The end: after a signal, a ``stopped`` record; after a run that ended mid-epoch, the
    test set's figures; a checkpoint unless one was just taken, and ``done``."""
    if run.caught:
        name = signal.Signals(run.caught).name
        run.metrics.write(type="stopped", step=run.step, signal=name, time=run.elapsed())
        if run.rank == 0:
            log.info("%s: checkpointing at step %d and exiting", name, run.step)
    elif run.step % run.steps_per_epoch:
        test_loss, test_acc = evaluate(run.model, run.data, run.args, run.comm, run.device)
        run.metrics.write(type="final", step=run.step, test_loss=test_loss, test_acc=test_acc,
                          time=run.elapsed())
        if run.rank == 0:
            log.info("step %d: test loss %.4f acc %.4f", run.step, test_loss, test_acc)
    if run.saved_at != run.step:
        save(run, "signal" if run.caught else "end")
    if not run.caught:
        run.metrics.write(type="done", step=run.step, time=run.elapsed())
    if run.omniscient is not None:
        run.omniscient.free()


# -- pieces of the stages -------------------------------------------------------------------------
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


def default_epochs(data) -> int:
    """--epochs when not given: :data:`DEFAULT_EPOCHS`, or on the digits fallback as many as
    see :data:`DEFAULT_EXAMPLES` examples (announced)."""
    if not data.note:
        return DEFAULT_EPOCHS
    epochs = max(DEFAULT_EPOCHS, math.ceil(DEFAULT_EXAMPLES / len(data.train)))
    log.info("%s is small: %d epochs, to see %d examples as the default run does",
             data.name, epochs, DEFAULT_EXAMPLES)
    return epochs


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


def _summed(comm, tally: Tally, timeout: float | None) -> Tally:
    """Collective: an epoch's sums over every rank."""
    sums = np.array(astuple(tally), dtype=np.float64)
    # Wait on MPI: the epoch's training figures need every rank's sums.
    bounded(comm.Iallreduce(MPI.IN_PLACE, sums, op=MPI.SUM),
            f"epoch sums on rank {comm.Get_rank()}", timeout)
    return Tally(*sums)


def _traffic(run: Run) -> Traffic:
    """This rank's communication counters now."""
    if run.baseline is not None:
        sent = run.baseline.bytes_sent
        return Traffic(sent, sent, float("nan"), float("nan"))
    st = run.opt.stats
    return Traffic(st.bytes_sent, st.bytes_received, st.disagreement, st.nonfinite)


def _progress(args, rank: int, epoch: int, epochs: int, first: int, steps_per_epoch: int):
    if rank != 0 or not args.progress:
        return None
    from tqdm import tqdm

    # Not a terminal (a Slurm log): a line every 30 s instead of a redraw every 0.1 s.
    interval = 0.1 if sys.stderr.isatty() else 30.0
    return tqdm(total=steps_per_epoch, initial=first, desc=f"epoch {epoch + 1}/{epochs}",
                mininterval=interval, dynamic_ncols=True, leave=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        # Wait on the CUDA stream: the step's timings must cover the kernels, not their launch.
        torch.cuda.synchronize(device)
