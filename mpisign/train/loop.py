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
6. :func:`finish`: a signal's checkpoint, or the last evaluation, and ``done``; the summary
   on stdout and ``curves.png`` (:mod:`mpisign.train.summary`).
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import signal
import sys
import time
import warnings
from collections import deque
from dataclasses import astuple, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from mpi4py import MPI

import mpisign

from ..mpi.comm import bounded
from ..optim.rules import SignumRule
from ..optim.state import broadcast_parameters
from . import checkpoint
from .adversary import ATTACKS, NON_BLIND_ATTACKS, Omniscient, attack_gradients, make_attack
from .checkpoint import StopRequest, collectively, load_checkpoint, resume
from .corpus import CORPORA, Corpus, load_corpus
from .data import Data, load_data
from .metrics import Interval, Metrics, StepRecord, Tally, Traffic, run_record
from .models import LANGUAGE_MODELS, build_language_model, build_model
from ..collectives.quorum import check_quorum_topology, resolve_quorum
from .options import (ALLREDUCE, DEFAULT_BETAS, DEFAULT_EPOCHS, DEFAULT_EXAMPLES,
                      DEFAULT_WEIGHT_DECAY, GPT_SIZE, Config, UsageError, default_lr)
from .summary import say, summarize
from ..mpi.world import launched_tasks
from .straggler import Straggler
from .survivors import AFTER_CHECK, Unguarded, check_elastic, guard
from .updates import VoteUpdate, build_update

__all__ = ["Built", "Run", "train", "learning_rate", "evaluate", "load_checkpoint"]

log = logging.getLogger("mpisign.train")

@dataclass(frozen=True)
class Built:
    """What :func:`setup` builds, once: the run's options, where it writes, what it trains."""

    config: Config
    out: Path
    device: torch.device
    data: Data | Corpus                  # images or text: one interface, and its objective
    model: torch.nn.Module
    update: VoteUpdate                   # the optimizer, and how the gradients reach it
    attack_rng: torch.Generator
    attack: Callable | None              # this rank's blind attack on its gradients
    omniscient: Omniscient | None        # the non-blind attack, a collective of every rank
    straggler: Straggler                 # --straggle: this rank's slowness, on purpose


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
    joined: int | None = None            # --elastic --quorum: brought forward (see survivors)
    records: deque = field(default_factory=deque)  # step records' gathers not yet finished
    last_test: Tally | None = None       # the last evaluation's sums, for the summary
    launch_step: int = 0                 # the step this launch began at
    launch_traffic: Traffic | None = None  # the counters when this launch began

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

    def seen(self) -> dict:
        """What the run's steps so far trained on, where the data counts it (tokens)."""
        return self.built.data.seen(self.step, self.world, self.config.batch_size)


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
    logging.captureWarnings(True)   # the optimizer's advice (LearningRateWarning) in the log
    warnings.formatwarning = lambda message, category, *where, **more: \
        f"{category.__name__}: {message}"   # the advice, without the library's source line
    if world == 1 and launched_tasks() is None:
        log.info("1 rank: no MPI launcher (mpirun, srun, python -m mpisign.launch -n N) "
                 "started this process, so it trains alone")
    if rank != 0:
        # What the run and its data say is the same on every rank: rank 0 alone says it.
        # The library's loggers keep their warnings: those are about this rank.
        for name in ("mpisign.train", "mpisign.data"):
            logging.getLogger(name).setLevel(logging.ERROR)
    config = Config(**{**vars(args), **defaults(args)})
    if args.adversaries and args.adversaries * 2 >= world:
        log.warning("%d of %d ranks are adversaries: majority vote is only guaranteed to "
                    "withstand fewer than half", args.adversaries, world)
    if rank < args.adversaries and args.attack in ("inf", "nan"):
        logging.getLogger("mpisign.optim").setLevel(logging.ERROR)  # expected, counted in metrics
    return config


def defaults(args) -> dict:
    """The options whose defaults depend on the optimizer or the model, filled in; those that do
    not apply to them are None (as run.json and the checkpoints then record them)."""
    opt, language = args.optimizer, args.model in LANGUAGE_MODELS
    momentum = args.momentum
    if momentum is None and opt in ("signum", "sgd"):
        momentum = 0.9
    elif momentum is None and opt == "signsgd":
        momentum = 0.0
    betas = (list(args.betas or DEFAULT_BETAS[opt]) if opt in DEFAULT_BETAS else None)
    filled = dict(
        lr=default_lr(opt, args.model) if args.lr is None else args.lr,
        momentum=momentum, betas=betas,
        weight_decay=DEFAULT_WEIGHT_DECAY[opt] if args.weight_decay is None else args.weight_decay,
        dataset=CORPORA[0] if language and args.dataset is None else args.dataset,
        batch_size=args.batch_size or (32 if language else 64),
        eval_batch_size=args.eval_batch_size or (64 if language else 1000),
        # As text: the options go into checkpoints, which hold plain data only.
        straggle=[str(s) for s in args.straggle] if args.straggle else None,
        device=("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto"
        else args.device)
    for name, default in GPT_SIZE.items():
        filled[name] = (getattr(args, name) or default) if language else None
    return filled


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
                            "weight_decay": args.weight_decay or 0.0}, where="--")
    except ValueError as e:
        raise UsageError(str(e).replace("weight_decay", "weight-decay")) from None
    _check_optimizer(args)
    _check_model_and_data(args)
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
    _check_stragglers(args, world)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but torch sees no CUDA device on this node")
    check_elastic(args)


def _check_stragglers(args, world: int) -> None:
    """--quorum and --grace for a vote that can close on one; --straggle for ranks there are."""
    if args.quorum is not None:
        if args.optimizer in ALLREDUCE:
            raise UsageError(f"--quorum needs a voting optimizer (signum, signsgd, lion): "
                             f"--optimizer {args.optimizer}'s allreduce waits for every rank")
        try:
            resolve_quorum(args.quorum, world)
            check_quorum_topology(args.topology)
        except ValueError as e:
            raise UsageError(f"--quorum {args.quorum}: {e}") from None
    if args.grace and args.quorum is None:
        raise UsageError("--grace is the wait after a --quorum: give --quorum K")
    if args.lag != 2 and args.quorum is None:
        raise UsageError("--lag is how far a --quorum's late rank may fall behind: give --quorum K")
    if args.grace < 0:
        raise UsageError(f"--grace must be >= 0 seconds, got {args.grace}")
    for spec in args.straggle or ():
        if spec.rank >= world:
            raise UsageError(f"--straggle {spec}: this job has ranks 0..{world - 1}")


def _check_optimizer(args) -> None:
    """--momentum for the optimizers that have one, --betas for those that have two."""
    opt = args.optimizer
    if args.momentum is not None and opt not in ("signum", "signsgd", "sgd"):
        raise UsageError(f"--momentum does not apply to --optimizer {opt}: it takes --betas B1 "
                         f"B2 (default {' '.join(map(str, DEFAULT_BETAS[opt]))})")
    if args.betas is not None and opt not in DEFAULT_BETAS:
        raise UsageError(f"--betas applies to --optimizer {', '.join(DEFAULT_BETAS)}; --optimizer "
                         f"{opt} takes --momentum")
    if args.betas is not None and not all(0 <= b < 1 for b in args.betas):
        raise UsageError(f"--betas must each be in [0, 1), got {' '.join(map(str, args.betas))}")
    if args.attack in NON_BLIND_ATTACKS and args.adversaries and \
            opt not in ("signum", "signsgd", "sgd"):
        raise UsageError(f"--attack {args.attack} knows how signum, signsgd and sgd combine the "
                         f"ranks, not --optimizer {opt}: use a blind --attack")


def _check_model_and_data(args) -> None:
    """A language model trains on a corpus, an image model on images; the size options are
    the transformer's."""
    language = args.model in LANGUAGE_MODELS
    if language and args.dataset is not None and args.dataset not in CORPORA:
        raise UsageError(f"--model {args.model} is a language model: it trains on a text corpus "
                         f"(--dataset {', '.join(CORPORA)}), not on the images of --dataset "
                         f"{args.dataset}")
    if not language and args.dataset in CORPORA:
        raise UsageError(f"--dataset {args.dataset} is text: it needs a language model "
                         f"(--model {', '.join(LANGUAGE_MODELS)}), not the image model "
                         f"--model {args.model}")
    sizes = [f"--{k}" for k in GPT_SIZE if getattr(args, k) is not None]
    if sizes and not language:
        raise UsageError(f"{', '.join(sizes)} size the transformer (--model gpt), not --model "
                         f"{args.model}")
    if language and args.data_dir is not None:
        raise UsageError(f"--data-dir does not apply to --dataset {CORPORA[0]}: it reads this "
                         f"Python's standard library")
    width = args.width or GPT_SIZE["width"]
    heads = args.heads or GPT_SIZE["heads"]
    if language and width % heads:
        raise UsageError(f"--width {width} must be a multiple of --heads {heads}")


# -- 2. setup -------------------------------------------------------------------------------------
def setup(config: Config, comm) -> Run:
    """Everything the run needs, in an order every rank follows (several steps are
    collective, and the random numbers drawn depend on it)."""
    config, out = _output_dir(config, comm)
    device = _device(config, comm)
    # Under --quorum the stop agreement is read --lag steps on: no step waits for a late rank.
    stop = StopRequest(comm, timeout=config.vote_timeout,
                       lag=0 if config.quorum is None else config.lag)
    config, data, steps_per_epoch, total_steps = _load_data(config, comm)
    model = _build_model(config, comm, data, device)
    attack_rng, attack = _seed_rank(config, comm.Get_rank())
    update, omniscient = _build_optimizer(config, comm, model)
    built = Built(config=config, out=out, device=device, data=data, model=model, update=update,
                  attack_rng=attack_rng, attack=attack, omniscient=omniscient,
                  straggler=Straggler(config.straggle, comm.Get_rank(), config.seed))
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
    """The CPU, or for --device cuda the GPU of this rank's node-local rank (collective, and
    only then: on the emulated cluster, whose namespaces share one hostname, the split by
    shared memory never returned on some ranks)."""
    if config.device != "cuda":   # defaults() resolved --device auto
        return torch.device("cpu")
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    local_rank = node.Get_rank()
    node.Free()
    device = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def _load_data(config: Config, comm) -> tuple[Config, Data | Corpus, int, int]:
    """The data, the steps per epoch and the steps in all, and the options that depend on the
    data filled in. Every rank loads the data; a missing directory stops every rank with one
    message."""
    data = collectively(comm, _read_data, config)
    config = config.replace(
        dataset=data.name,   # the data set used: the default's choice, or its fallback
        workers=data.default_workers() if config.workers is None else config.workers,
        epochs=default_epochs(data) if config.epochs is None else config.epochs)
    world = comm.Get_size()
    steps_per_epoch = data.steps_per_epoch(world, config.batch_size)
    if steps_per_epoch == 0:
        raise UsageError(f"--batch-size {config.batch_size} is larger than each rank's share "
                         f"({data.share(world)})")
    return config, data, steps_per_epoch, config.max_steps or config.epochs * steps_per_epoch


def _read_data(config: Config) -> Data | Corpus:
    """The images (mpisign.train.data), or the text corpus cut into windows of --context + 1."""
    if config.dataset in CORPORA:
        return load_corpus(config.dataset, config.context)
    return load_data(config.dataset, config.data_dir)


def _build_model(config: Config, comm, data: Data | Corpus,
                 device: torch.device) -> torch.nn.Module:
    """The same seed on every rank, then rank 0's values broadcast to be sure."""
    torch.manual_seed(config.seed)
    if config.model in LANGUAGE_MODELS:
        model = build_language_model(config.model, data.vocab_size, config.context,
                                     config.layers, config.width, config.heads)
    else:
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
    per_step = run.built.data.seen(1, run.world, run.config.batch_size)
    if per_step:   # a corpus: the tokens a step trains on, over all ranks
        record["per_step"] = per_step
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
    run.last_traffic = run.launch_traffic = _traffic(run)
    run.launch_step = run.step
    run.built.model.train()
    while True:
        if run.joined == AFTER_CHECK:   # brought forward to the others' epoch end (--elastic)
            end_epoch(run, run.step // run.steps_per_epoch)
        if run.caught:
            return
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
    for x, y in run.built.data.train_batches(rank=run.rank, world=run.world,
                                             batch_size=config.batch_size, seed=config.seed,
                                             epoch=epoch, start=first, workers=config.workers,
                                             count=run.steps_per_epoch):
        train_step(run, x, y)
        if bar is not None:
            bar.update(1)
        if run.joined == AFTER_CHECK:
            break
        if run.step % config.log_every == 0:
            log_step(run, bar)
        if run.caught:
            break
        if config.checkpoint_every and run.step % config.checkpoint_every == 0:
            save(run, "every")
        if run.step >= run.total_steps:
            break
        if run.joined is not None:   # brought forward: the epoch's batches from its new step
            run.joined = None
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
    if run.built.update.late():   # --quorum: this step's vote closed without this rank
        _catch_up(run)
        return
    t0 = time.perf_counter()
    x, y = x.to(run.built.device, non_blocking=True), y.to(run.built.device, non_blocking=True)
    objective = run.built.data.objective
    out = run.built.model(x)
    loss = objective.loss(out, y)
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    if run.built.attack is not None:
        attack_gradients(run.built.model.parameters(), run.built.attack)
    elif run.built.omniscient is not None:
        run.built.omniscient(run.opt, run.step)   # collective: the honest ranks' vote, then a broadcast
    _sync(run.built.device)
    run.built.straggler(time.perf_counter() - t0)   # --straggle: slow on purpose
    t1 = time.perf_counter()
    run.built.update.step()
    _sync(run.built.device)
    t2 = time.perf_counter()
    run.caught = run.guard(run.stop.wait, default=0, what="the stop-signal agreement")
    run.step += 1
    run.guard.follow()   # --elastic: onto the survivors, if the optimizer lost ranks
    batch = objective.tally(out, y, loss)
    run.epoch_tally.add(batch)
    run.interval.add(batch, compute_s=t1 - t0, comm_s=t2 - t1)


def _catch_up(run: Run) -> None:
    """A step whose vote closed without this rank (it fell behind): its result, without the
    forward and backward pass, so that the rank catches up at once. Its batch is left out."""
    t1 = time.perf_counter()
    run.built.update.skip()
    t2 = time.perf_counter()
    run.caught = run.guard(run.stop.wait, default=0, what="the stop-signal agreement")
    run.step += 1
    run.guard.follow()   # --elastic: onto the survivors, if the optimizer lost ranks
    run.interval.add(Tally(), compute_s=0.0, comm_s=t2 - t1)


def log_step(run: Run, bar) -> None:
    """Collective: the ``step`` record of the steps since the last one. Rank 0 needs every
    rank's part: under --quorum the gather is finished --lag steps on, as the stop agreement
    is, so that rank 0 does not wait here for a late rank."""
    traffic = _traffic(run)
    posted = run.guard(StepRecord, run.comm, run.interval, traffic, run.last_traffic, run.step,
                       run.steps_per_epoch, run.lr, run.elapsed(),
                       {**(run.built.update.watched() or {}), **run.seen()},
                       figures=run.built.data.objective.figures, what="the step record's sums")
    run.interval, run.last_traffic = Interval(), traffic
    if posted is not None:
        run.records.append(posted)
    write_records(run, bar, lag=run.stop.lag)


def write_records(run: Run, bar=None, lag: int | None = None) -> None:
    """Collective: the step records posted at least ``lag`` steps ago (None: all), written by
    rank 0, in order."""
    objective = run.built.data.objective
    while run.records and (lag is None or run.step - run.records[0].step >= lag):
        record = run.guard(run.records.popleft().finish, run.metrics, run.config.vote_timeout,
                           what="the step record's sums")
        if bar is not None and record is not None:
            bar.set_postfix(loss=f"{record['loss']:.3f}",
                            **{objective.figure: f"{record[objective.figure]:.3f}"},
                            ms=f"{1e3 * record['step_s']:.0f}", refresh=False)


def end_epoch(run: Run, epoch: int) -> None:
    """Collective, once ``epoch`` has ended: its training figures over all ranks, the test
    set's, the check that every rank holds the same parameters, the ``epoch`` record and a
    checkpoint."""
    nan = Tally(math.nan, math.nan, 1.0)
    write_records(run)
    if run.joined == AFTER_CHECK:   # brought here by a recovery: the others' sums failed
        run.joined, totals, test = None, nan, nan
    else:
        totals = run.guard(_summed, run.comm, run.epoch_tally, run.config.vote_timeout,
                           default=nan, what="the epoch's sums")
        test = run.guard(evaluate, run.built.model, run.built.data, run.config, run.comm,
                         run.built.device, default=nan, what="evaluation")
        run.built.update.check_consistency()
        run.guard.follow(AFTER_CHECK)   # --elastic: a dead rank that the check met
    run.evaluated, run.last_test = epoch, test
    now = run.elapsed()
    objective = run.built.data.objective
    run.metrics.write(type="epoch", epoch=epoch, step=run.step,
                      **objective.figures(totals, "train_"), **objective.figures(test, "test_"),
                      **run.seen(), time=now, epoch_time=now - run.epoch_started)
    if run.rank == 0:
        log.info("epoch %d: train %s, test %s, %.1f s", epoch, objective.say(totals),
                 objective.say(test), now - run.epoch_started)
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
    write_records(run)   # the records before the checkpoint's, in order
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
    write_records(run)
    run.built.update.drain()   # --quorum: the lagged checks and the late messages
    run.stop.drain()   # the agreements still in flight (--quorum reads them two steps on)
    if run.caught:
        name = signal.Signals(run.caught).name
        run.metrics.write(type="stopped", step=run.step, signal=name, time=run.elapsed())
        if run.rank == 0:
            log.info("%s: checkpointing at step %d and exiting", name, run.step)
    elif run.step % run.steps_per_epoch:
        test = run.last_test = evaluate(run.built.model, run.built.data, run.config, run.comm,
                                        run.built.device)
        objective = run.built.data.objective
        run.metrics.write(type="final", step=run.step, **objective.figures(test, "test_"),
                          **run.seen(), time=run.elapsed())
        if run.rank == 0:
            log.info("step %d: test %s", run.step, objective.say(test))
    if run.saved_at != run.step:
        save(run, "signal" if run.caught else "end")
    if not run.caught:
        run.metrics.write(type="done", step=run.step, time=run.elapsed())
    if run.rank == 0:
        _note_end(run)
    if run.built.omniscient is not None:
        run.built.omniscient.free()
    if not run.caught:
        _summary(run)


def _summary(run: Run) -> None:
    """Collective: the summary on rank 0's stdout, and curves.png in --out."""
    held_out = ("not evaluated in this launch" if run.last_test is None
                else run.built.data.objective.say(run.last_test))
    sent = _traffic(run).bytes_sent - run.launch_traffic.bytes_sent
    parameters = sum(p.numel() for p in run.built.model.parameters() if p.requires_grad)
    summary = run.guard(summarize, run.comm, run.built.out, held_out, run.step,
                        run.elapsed(), run.config.batch_size, parameters, sent,
                        run.step - run.launch_step, timeout=run.config.vote_timeout,
                        default=None, what="the summary")
    if summary is not None:
        say(summary, run.rank)


def _note_end(run: Run) -> None:
    """Rank 0: run.json's ``ended``: the step this launch ended at, what the run had trained on
    by then (a corpus's tokens) and its wall time."""
    path = run.built.out / "run.json"
    record = json.loads(path.read_text())
    record["ended"] = {"step": run.step, **run.seen(), "time": run.elapsed()}
    path.write_text(json.dumps(record, indent=1, default=str) + "\n")


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
def evaluate(model, data, args, comm, device) -> Tally:
    """The sums (loss, correct, count) over the whole held-out split (the image sets' test set,
    a corpus's validation windows): each rank scores its part, the sums are added, so every
    rank returns the same figures. ``data.objective.figures`` turns them into the books'."""
    if list(model.buffers()):
        # BN statistics: rank 0's, everywhere.
        broadcast_parameters(list(model.buffers()), comm, timeout=args.vote_timeout)
    model.eval()
    sums = np.zeros(3)
    for x, y in data.eval_batches(rank=comm.Get_rank(), world=comm.Get_size(),
                                  batch_size=args.eval_batch_size, workers=args.workers):
        x, y = x.to(device), y.to(device)
        sums += astuple(data.objective.tally(model(x), y))
    # Wait on MPI: the full-test-set figures need every rank's sums.
    bounded(comm.Iallreduce(MPI.IN_PLACE, sums, op=MPI.SUM),
            f"evaluation sums on rank {comm.Get_rank()}", args.vote_timeout)
    model.train()
    return Tally(*sums)


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
