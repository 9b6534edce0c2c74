"""``python -m mpisign.train``'s command line: the options, and ``main`` that runs the loop."""

from __future__ import annotations

import argparse
import math
import sys
import time

from mpi4py import MPI

import mpisign

from .adversary import ATTACKS, NON_BLIND_ATTACKS
from ..mpi import report
from ..mpi.world import SingletonWorld, check_world
from .corpus import CORPORA
from .data import DATASETS
from .loop import train
from .models import LANGUAGE_MODELS, MODELS
from .straggler import parse_straggle
from .options import (DEFAULT_BETAS, DEFAULT_EPOCHS, DEFAULT_EXAMPLES, DEFAULT_LR,
                      DEFAULT_LR_BY_MODEL, DEFAULT_WEIGHT_DECAY, GPT_SIZE, OPTIMIZERS, UsageError,
                      in_words, nonnegative_int, positive_int)

__all__ = ["build_parser", "main", "run"]


class _Help(argparse.HelpFormatter):
    """Each default once: said in the option's help where it depends on other options (in
    words), else appended; an option whose default is "none" shows none."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or not action.option_strings or action.default is None
                or action.default is False or action.default == []
                or action.default == argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse whose help and errors are printed by rank 0 only (all ranks parse and exit)."""

    def _print_message(self, message, file=None):
        if MPI.COMM_WORLD.Get_rank() == 0:
            super()._print_message(message, file)


def _quorum(text: str) -> int | float:
    """argparse type: a number of ranks (3) or a fraction of them (0.75)."""
    try:
        return int(text)
    except ValueError:
        pass
    value = _finite_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"a number of ranks, or a fraction in (0, 1], got {text}")
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The options, in the groups that --help shows."""
    p = Parser(prog="python -m mpisign.train",
               description="Data-parallel training with Signum/signSGD majority vote over MPI "
                           "(Bernstein et al., ICLR 2019) or Distributed Lion (Liu et al. 2024), "
                           "or an fp32 allreduce baseline (SGD, AdamW, global Lion). "
                           "Launch with mpirun/srun, one process per rank.",
               formatter_class=_Help, allow_abbrev=False)
    _model_and_data_options(p.add_argument_group("model and data"))
    _transformer_options(p.add_argument_group("transformer (--model gpt)"))
    _optimizer_options(p.add_argument_group("optimizer"))
    _schedule_options(p.add_argument_group("schedule"))
    _adversary_options(p.add_argument_group("adversaries (Byzantine workers)"))
    _straggler_options(p.add_argument_group("stragglers (to try --quorum)"))
    _output_options(p.add_argument_group("output"))
    return p


def _model_and_data_options(g) -> None:
    g.add_argument("--model", choices=(*MODELS, *LANGUAGE_MODELS), default="cnn",
                   help="small CNN, or torchvision ResNet (no pretrained weights), for images; "
                        "gpt: a small transformer language model, for text")
    g.add_argument("--dataset", choices=(*DATASETS, *CORPORA), default=None,
                   help="default: for the image models fashion-mnist if installed, else digits "
                        "(announced); for gpt pystdlib, the bytes of the Python standard "
                        "library's source (nothing to download)")
    g.add_argument("--data-dir", default=None,
                   help="where the data lives (fashion-mnist default: "
                        "/usr/share/datasets/fashion-mnist; required for cifar10, imagefolder)")
    g.add_argument("--workers", type=nonnegative_int, default=None,
                   help="DataLoader workers per rank (default: 0 in memory, a few for images)")


def _transformer_options(g) -> None:
    g.add_argument("--layers", type=positive_int, default=None,
                   help=f"transformer blocks (default {GPT_SIZE['layers']})")
    g.add_argument("--width", type=positive_int, default=None,
                   help=f"embedding width (default {GPT_SIZE['width']})")
    g.add_argument("--heads", type=positive_int, default=None,
                   help=f"attention heads, dividing --width (default {GPT_SIZE['heads']})")
    g.add_argument("--context", type=positive_int, default=None,
                   help=f"bytes a window predicts from (default {GPT_SIZE['context']})")


def _optimizer_options(g) -> None:
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="signum",
                   help="signum, signsgd, lion: majority vote of signs (lion: Distributed Lion "
                        "with majority vote); sgd, adamw, lion-allreduce: torch SGD, torch "
                        "AdamW, or Lion on the fp32 allreduce mean of the gradients")
    g.add_argument("--topology", choices=[*sorted(mpisign.TOPOLOGIES), "auto"],
                   default="server", help="how the vote travels (signum, signsgd, lion); auto: "
                   "the cost model's choice for this model, rank count and measured link")
    g.add_argument("--lr", type=_finite_float, default=None,
                   help="learning rate; a sign method (signum, signsgd, lion) moves every "
                        "coordinate by exactly lr a step, so it wants an Adam-like value, not "
                        f"SGD's (default: {in_words(DEFAULT_LR)}"
                        + "".join(f"; with --model {m}: {in_words(lrs)}"
                                  for m, lrs in DEFAULT_LR_BY_MODEL.items()) + ")")
    g.add_argument("--momentum", type=_finite_float, default=None,
                   help="momentum in [0, 1) (default 0.9 for signum and sgd; signsgd has none; "
                        "lion and adamw take --betas)")
    g.add_argument("--betas", type=_finite_float, nargs=2, default=None, metavar=("B1", "B2"),
                   help=f"lion, lion-allreduce, adamw: each in [0, 1) (default: "
                        f"{in_words(DEFAULT_BETAS)})")
    g.add_argument("--weight-decay", type=_finite_float, default=None,
                   help=f"weight decay, p <- p - lr * wd * p each step, decoupled from the "
                        f"vote (default: {in_words(DEFAULT_WEIGHT_DECAY)})")
    g.add_argument("--batch-size", type=positive_int, default=None,
                   help="per rank (default 64; for gpt 32 windows of --context bytes)")
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
    g.add_argument("--quorum", type=_quorum, default=None, metavar="K",
                   help="close each step's vote once K ranks (or a fraction of them, such as "
                        "0.75) have voted: later ranks abstain, and a rank that fell behind "
                        "skips the steps it missed to catch up (signum, signsgd, lion; "
                        "any --topology but allgather and auto); default: every rank")
    g.add_argument("--grace", type=_finite_float, default=0.0, metavar="S",
                   help="with --quorum: seconds a vote waits for the rest once the quorum is in")
    g.add_argument("--lag", type=positive_int, default=2, metavar="N",
                   help="with --quorum: steps a late rank may fall behind before the others "
                        "wait for it; a rank's own mistake is raised N steps on")
    g.add_argument("--elastic", action="store_true",
                   help="keep training when ranks die: the survivors redo the step's vote and "
                        "carry on (needs Open MPI's ULFM: launch with `mpirun --with-ft ulfm` or "
                        "`python -m mpisign.launch --elastic`); see README, Elastic")


def _schedule_options(g) -> None:
    g.add_argument("--epochs", type=positive_int, default=None,
                   help=f"default {DEFAULT_EPOCHS}; when the default data set falls back to "
                        f"digits, as many as see {DEFAULT_EXAMPLES:,} examples")
    g.add_argument("--max-steps", type=positive_int, default=None,
                   help="stop after this many steps in all (overrides --epochs)")
    g.add_argument("--warmup-epochs", type=float, default=0.0,
                   help="linear warmup of the learning rate over this many epochs")
    g.add_argument("--lr-decay-epochs", type=float, nargs="*", default=[], metavar="EPOCH",
                   help="step decay: multiply the learning rate by --lr-decay at these epochs")
    g.add_argument("--lr-decay", type=_finite_float, default=0.1,
                   help="factor on the learning rate at each of --lr-decay-epochs")
    g.add_argument("--seed", type=int, default=0,
                   help="the model's initialization and the data's order; each rank's own "
                        "random numbers (dropout, attacks) derive from it and the rank")


def _adversary_options(g) -> None:
    g.add_argument("--adversaries", type=nonnegative_int, default=0, metavar="K",
                   help="the first K ranks corrupt their gradients before the vote")
    g.add_argument("--attack", choices=(*ATTACKS, *NON_BLIND_ATTACKS), default="invert",
                   help="blind multiplicative attack, or omniscient: minus the honest ranks' "
                        "majority (see mpisign.train.adversary)")
    g.add_argument("--attack-factor", type=float, default=1e20,
                   help="multiplier of --attack scale")


def _straggler_options(g) -> None:
    g.add_argument("--straggle", type=parse_straggle, action="append", default=None,
                   metavar="RANK:DELAY[@FRACTION]",
                   help="make a rank slow on purpose: RANK:xF, F times its compute every step; "
                        "RANK:S@P, S seconds more on a random fraction P of its steps (e.g. "
                        "3:x2, 3:0.5@0.1); repeat for several ranks")


def _output_options(g) -> None:
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
    g.add_argument("--eval-batch-size", type=positive_int, default=None,
                   help="default 1000; for gpt 64 windows")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="tqdm progress bar on rank 0")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="cuda: one GPU per rank, chosen by node-local rank; auto: cuda where "
                        "torch sees a GPU, else cpu")


def main(argv=None) -> int:
    """Parse the options and train on ``COMM_WORLD``; a usage error makes every rank exit 2,
    with rank 0's message."""
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


def run(argv=None) -> int:
    """``main`` that turns an unhandled exception on any rank into ``MPI_Abort`` of the job."""
    try:
        return main(argv)
    except SystemExit:
        raise
    except BaseException as error:
        comm = MPI.COMM_WORLD
        rank, size = comm.Get_rank(), comm.Get_size()
        sys.stderr.write(report.describe(error, rank, size, f"[rank {rank}] unhandled "
                                         f"exception, aborting all {size} ranks:\n"))
        sys.stderr.flush()
        if report.agreed(error):   # before an abort ends the job: every rank's report out
            time.sleep(report.LEAD_TIME if rank != 0 else report.LEAD_TIME / 2)
        comm.Abort(1)
        return 1
