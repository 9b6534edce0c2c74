"""The training run, stage by stage, in the order it happens; every rank executes all of it.

1. :func:`configure`: check the options against the world size, logging, the defaults: the
   run's options from here on are a frozen :class:`~mpisign.train.options.Config`.
2. :func:`setup`: output directory, device, data, model, seeds and optimizer, in one
   :class:`Built`, and the :class:`Run` that progresses over it.
3. :func:`mpisign.train.checkpoint.resume`: the run's state from the checkpoint in ``--out``,
   if there is one.
4. :func:`open_books`: ``run.json`` and ``metrics.jsonl``.
5. :func:`train_epochs`: epochs of :func:`train_step`, a ``step`` record every ``--log-every``
   steps (:func:`log_step`), and at each epoch's end :func:`end_epoch`: evaluation, the
   ``epoch`` record, a checkpoint (:func:`save`).
6. :func:`finish`: a signal's checkpoint, or the last evaluation, and ``done``.
"""

from __future__ import annotations

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

from ..mpi.comm import bounded
from ..optim.rules import SignumRule
from ..optim.state import broadcast_parameters
from . import checkpoint
from .adversary import ATTACKS, NON_BLIND_ATTACKS, Omniscient, attack_gradients, make_attack
from .checkpoint import StopRequest, collectively, load_checkpoint, resume
from .data import Data, batches_per_epoch, default_workers, eval_batches, load_data, train_batches
from .metrics import Interval, Metrics, Tally, Traffic, log_interval, run_record
from .models import build_model
from .options import DEFAULT_EPOCHS, DEFAULT_EXAMPLES, DEFAULT_LR, Config, UsageError
from .survivors import Unguarded, check_elastic, guard
from .updates import VoteUpdate, build_update

__all__ = ["Built", "Run", "train", "learning_rate", "evaluate", "load_checkpoint"]

log = logging.getLogger("mpisign.train")

@dataclass(frozen=True)
class Built:
    """What :func:`setup` builds, once: the run's options, where it writes, what it trains."""

    config: Config
    out: Path
    device: torch.device
    data: Data
    model: torch.nn.Module
    update: VoteUpdate                   # the optimizer, and how the gradients reach it
    attack_rng: torch.Generator
    attack: Callable | None              # this rank's blind attack on its gradients
    omniscient: Omniscient | None        # the non-blind attack, a collective of every rank


@dataclass
class Run:
    """One rank's run over what was :class:`Built`: the communicator and schedule it is on now,
    and the progress the stages advance."""

    built: Built
    comm: MPI.Comm                       # an --elastic run moves onto the survivors'
    stop: StopRequest
    steps_per_epoch: int                 # a resume keeps the first launch's schedule
    total_steps: int
    guard: Unguarded = field(default_factory=Unguarded)  # the run's collectives and dead ranks
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
    def config(self) -> Config:
        return self.built.config

    @property
    def opt(self) -> torch.optim.Optimizer:
        return self.built.update.opt

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
    config = configure(args, comm)
    run = setup(config, comm)
    resume(run)
    open_books(run)
    train_epochs(run)
    finish(run)
    return 0


# -- 1. configure ---------------------------------------------------------------------------------
def configure(args, comm) -> Config:
    """Check the options, set up logging, fill in the defaults that depend on other options;
    the options from here on, frozen."""
    rank, world = comm.Get_rank(), comm.Get_size()
    check_args(args, world)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    if rank != 0:
        # What the run and its data say is the same on every rank: rank 0 alone says it.
        # The library's loggers keep their warnings: those are about this rank.
        for name in ("mpisign.train", "mpisign.data"):
            logging.getLogger(name).setLevel(logging.ERROR)
    momentum = args.momentum
    if momentum is None:
        momentum = 0.0 if args.optimizer == "signsgd" else 0.9
    config = Config(**{**vars(args), "momentum": momentum,
                       "lr": DEFAULT_LR[args.optimizer] if args.lr is None else args.lr})
    if args.adversaries and args.adversaries * 2 >= world:
        log.warning("%d of %d ranks are adversaries: majority vote is only guaranteed to "
                    "withstand fewer than half", args.adversaries, world)
    if rank < args.adversaries and args.attack in ("inf", "nan"):
        logging.getLogger("mpisign.optim").setLevel(logging.ERROR)  # expected, counted in metrics
    return config


def check_args(args, world: int) -> None:
    """Cross-option checks; the same on every rank, before any collective."""
    if args.optimizer == "signsgd" and args.momentum:
        raise UsageError("--optimizer signsgd has no momentum; use --optimizer signum "
                         "--momentum BETA")
    if args.lr is not None and args.lr <= 0:
        raise UsageError(f"--lr must be > 0, got {args.lr}")
    try:   # the optimizer's own checks of its hyperparameters, under the options' names
        SignumRule().check({"lr": 1.0 if args.lr is None else args.lr,
                            "momentum": 0.0 if args.momentum is None else args.momentum,
                            "weight_decay": args.weight_decay}, where="--")
    except ValueError as e:
        raise UsageError(str(e).replace("weight_decay", "weight-decay")) from None
    if args.vote_timeout is not None and args.vote_timeout <= 0:
        raise UsageError(f"--vote-timeout must be > 0 seconds, got {args.vote_timeout}")
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
def setup(config: Config, comm) -> Run:
    """Everything the run needs, in an order every rank follows (several steps are
    collective, and the random numbers drawn depend on it)."""
    config, out = _output_dir(config, comm)
    device = _device(config, comm)
    stop = StopRequest(comm, timeout=config.vote_timeout)
    config, data, steps_per_epoch, total_steps = _load_data(config, comm)
    model = _build_model(config, comm, data, device)
    attack_rng, attack = _seed_rank(config, comm.Get_rank())
    update, omniscient = _build_optimizer(config, comm, model)
    built = Built(config=config, out=out, device=device, data=data, model=model, update=update,
                  attack_rng=attack_rng, attack=attack, omniscient=omniscient)
    run = Run(built=built, comm=comm, stop=stop, steps_per_epoch=steps_per_epoch,
              total_steps=total_steps)
    run.guard = guard(config, run)
    return run


def _output_dir(config: Config, comm) -> tuple[Config, Path]:
    """--out, by default ``runs/<date>-<optimizer>`` as rank 0 names it."""
    if config.out is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        config = config.replace(out=comm.bcast(f"runs/{stamp}-{config.optimizer}"
                                               if comm.Get_rank() == 0 else None, root=0))
    return config, Path(config.out)


def _device(config: Config, comm) -> torch.device:
    """The CPU, or for --device cuda the GPU of this rank's node-local rank (collective)."""
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    local_rank = node.Get_rank()
    node.Free()
    if config.device != "cuda":
        return torch.device("cpu")
    device = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def _load_data(config: Config, comm) -> tuple[Config, Data, int, int]:
    """The data, the steps per epoch and the steps in all, and the options that depend on the
    data filled in. Every rank loads the data; a missing directory stops every rank with one
    message."""
    data = collectively(comm, load_data, config.dataset, config.data_dir)
    config = config.replace(
        workers=default_workers(data.train) if config.workers is None else config.workers,
        epochs=default_epochs(data) if config.epochs is None else config.epochs)
    world = comm.Get_size()
    steps_per_epoch = batches_per_epoch(len(data.train), world, config.batch_size)
    if steps_per_epoch == 0:
        raise UsageError(f"--batch-size {config.batch_size} is larger than each rank's share "
                         f"({-(-len(data.train) // world)} of {len(data.train)} examples)")
    return config, data, steps_per_epoch, config.max_steps or config.epochs * steps_per_epoch


def _build_model(config: Config, comm, data: Data, device: torch.device) -> torch.nn.Module:
    """The same seed on every rank, then rank 0's values broadcast to be sure."""
    torch.manual_seed(config.seed)
    model = build_model(config.model, data.in_channels, data.num_classes, data.image_size)
    model.to(device)
    broadcast_parameters(model, comm, timeout=config.vote_timeout)
    return model


def _seed_rank(config: Config, rank: int) -> tuple[torch.Generator, Callable | None]:
    """Seed this rank's own random numbers (dropout, the random attack) from here on; the
    attack's generator, and the blind attack if this rank is an adversary."""
    seeds = np.random.SeedSequence([config.seed, rank]).generate_state(3)
    torch.manual_seed(int(seeds[0]))
    np.random.seed(int(seeds[1]) % 2**32)
    attack_rng = torch.Generator().manual_seed(int(seeds[2]))
    attack = (make_attack(config.attack, generator=attack_rng, factor=config.attack_factor)
              if rank < config.adversaries and config.attack in ATTACKS else None)
    return attack_rng, attack


def _build_optimizer(config: Config, comm, model):
    """The optimizer and how the step feeds it (:mod:`mpisign.train.updates`); the non-blind
    attack (collective: built on every rank, see mpisign.train.adversary.Omniscient)."""
    omniscient = (Omniscient(comm, config.adversaries, topology=config.topology,
                             timeout=config.vote_timeout)
                  if config.attack in NON_BLIND_ATTACKS and config.adversaries else None)
    return build_update(config, comm, model), omniscient


# -- 4. the books ---------------------------------------------------------------------------------
def open_books(run: Run) -> None:
    """``run.json`` (rank 0; a resumed run keeps its earlier launches in it), then
    ``metrics.jsonl``, appended to on a resume; the run's clock starts."""
    record = run_record(run.config, run.comm, run.built.data, run.built.model, run.built.device,
                        run.steps_per_epoch, run.total_steps,
                        run.step if run.resumed_from else None)
    if run.rank == 0:
        _write_run_json(run, record)
    run.metrics = Metrics(run.built.out / "metrics.jsonl" if run.rank == 0 else None,
                          append=run.resumed_from is not None)
    if run.resumed_from is not None:
        run.metrics.write(type="resume", step=run.step, path=str(run.resumed_from),
                          world_size=run.world,
                          slurm_restart_count=record["slurm"].get("SLURM_RESTART_COUNT"),
                          time=run.elapsed_before)
    run.t_launch = time.perf_counter()


def _write_run_json(run: Run, record: dict) -> None:
    out = run.built.out
    out.mkdir(parents=True, exist_ok=True)
    if run.resumed_from is not None and (out / "run.json").is_file():
        previous = json.loads((out / "run.json").read_text())
        record["previous_launches"] = previous.pop("previous_launches", []) + [previous]
    (out / "run.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    log.info("%s, %d ranks on %d node(s), %s %s, %d parameters, %d steps/epoch, "
             "%d steps, out: %s", run.built.data.name, run.world, len(record["nodes"]),
             run.config.optimizer, run.built.update.describe(run.config),
             record["model"]["parameters"], run.steps_per_epoch, run.total_steps, out)


# -- 5. the loop ----------------------------------------------------------------------------------
def train_epochs(run: Run) -> None:
    """Epochs of this rank's batches until the run's steps are done or a signal stops every
    rank; each epoch that ends is evaluated and checkpointed, also when a resume starts there."""
    run.last_traffic = _traffic(run)
    run.built.model.train()
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
    config = run.config
    bar = _progress(config, run.rank, epoch, run.epochs, first, run.steps_per_epoch)
    for x, y in train_batches(run.built.data.train, rank=run.rank, world=run.world,
                              batch_size=config.batch_size, seed=config.seed, epoch=epoch,
                              start=first, workers=config.workers, count=run.steps_per_epoch):
        train_step(run, x, y)
        if bar is not None:
            bar.update(1)
        if run.step % config.log_every == 0:
            log_step(run, bar)
        if run.caught:
            break
        if config.checkpoint_every and run.step % config.checkpoint_every == 0:
            save(run, "every")
        if run.step >= run.total_steps:
            break
    if bar is not None:
        bar.close()


def train_step(run: Run, x, y) -> None:
    """One step (collective): forward, backward and the attack, then the optimizer's vote or
    allreduce and update; the ranks agree meanwhile whether a signal stops them."""
    run.lr = learning_rate(run.config, run.step, run.steps_per_epoch)
    for group in run.opt.param_groups:
        group["lr"] = run.lr
    run.stop.post()
    t0 = time.perf_counter()
    x, y = x.to(run.built.device, non_blocking=True), y.to(run.built.device, non_blocking=True)
    out = run.built.model(x)
    loss = F.cross_entropy(out, y)
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    if run.built.attack is not None:
        attack_gradients(run.built.model.parameters(), run.built.attack)
    elif run.built.omniscient is not None:
        run.built.omniscient(run.opt, run.step)   # collective: the honest ranks' vote, then a broadcast
    _sync(run.built.device)
    t1 = time.perf_counter()
    run.built.update.step()
    _sync(run.built.device)
    t2 = time.perf_counter()
    run.caught = run.guard(run.stop.wait, default=0, what="the stop-signal agreement")
    run.step += 1
    run.guard.follow()   # --elastic: onto the survivors, if the optimizer lost ranks
    batch = Tally(loss.item() * len(y), (out.argmax(1) == y).sum().item(), len(y))
    run.epoch_tally.add(batch)
    run.interval.add(batch, compute_s=t1 - t0, comm_s=t2 - t1)


def log_step(run: Run, bar) -> None:
    """Collective: the ``step`` record of the steps since the last one."""
    traffic = _traffic(run)
    record = run.guard(log_interval, run.metrics, run.comm, run.interval, traffic,
                     run.last_traffic, run.step, run.steps_per_epoch, run.lr, run.elapsed(),
                     run.built.update.watched(),
                     timeout=run.config.vote_timeout, what="the step record's sums")
    if bar is not None and record is not None:
        bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['acc']:.3f}",
                        ms=f"{1e3 * record['step_s']:.0f}", refresh=False)
    run.interval, run.last_traffic = Interval(), traffic


def end_epoch(run: Run, epoch: int) -> None:
    """Collective, once ``epoch`` has ended: its training figures over all ranks, the test
    set's, the check that every rank holds the same parameters, the ``epoch`` record and a
    checkpoint."""
    nan = Tally(math.nan, math.nan, 1.0)
    totals = run.guard(_summed, run.comm, run.epoch_tally, run.config.vote_timeout,
                     default=nan, what="the epoch's sums")
    test_loss, test_acc = run.guard(evaluate, run.built.model, run.built.data, run.config,
                                    run.comm, run.built.device, default=(math.nan, math.nan),
                                    what="evaluation")
    run.built.update.check_consistency()
    run.guard.follow()   # --elastic: a dead rank that the check met
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
    common = {"model": run.built.model.state_dict(), "step": run.step,
              "evaluated_epochs": run.evaluated, "elapsed": run.elapsed(),
              "epoch_started_at": run.epoch_started, "config": vars(run.config),
              "world_size": run.world, "steps_per_epoch": run.steps_per_epoch,
              "dataset": run.built.data.name, "mpisign": mpisign.__version__}
    own = {"rank": run.rank, "optimizer": run.opt.state_dict(), "rng": checkpoint.capture_rng(),
           "attack_rng": run.built.attack_rng.get_state(), "epoch_sums": list(astuple(run.epoch_tally))}
    where = run.guard(checkpoint.save, run.built.out, run.step, common, own, run.comm,
                    keep=run.config.keep_checkpoints, timeout=run.config.vote_timeout,
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
        test_loss, test_acc = evaluate(run.built.model, run.built.data, run.config, run.comm, run.built.device)
        run.metrics.write(type="final", step=run.step, test_loss=test_loss, test_acc=test_acc,
                          time=run.elapsed())
        if run.rank == 0:
            log.info("step %d: test loss %.4f acc %.4f", run.step, test_loss, test_acc)
    if run.saved_at != run.step:
        save(run, "signal" if run.caught else "end")
    if not run.caught:
        run.metrics.write(type="done", step=run.step, time=run.elapsed())
    if run.built.omniscient is not None:
        run.built.omniscient.free()


# -- pieces of the stages -------------------------------------------------------------------------
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
    return run.built.update.traffic()


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
