"""The end of a run: one summary on stdout, and ``curves.png`` beside ``metrics.jsonl``.

Progress and logs go to stderr, as command-line tools do; what the run came to goes to stdout,
so that a Slurm job with separate ``-o`` and ``-e`` files finds its result in the output file.
The bytes are set against an fp32 ring allreduce of the same gradients, which sends
``2 (M - 1) / M`` times the model's 4-byte floats per rank per step (what DDP and Horovod move).
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mpi4py import MPI

from ..mpi.comm import bounded

__all__ = ["Summary", "fp32_allreduce_bytes", "summarize", "draw_curves", "say"]

log = logging.getLogger("mpisign.train")


def fp32_allreduce_bytes(parameters: int, world: int) -> float:
    """Bytes each rank sends in one ring allreduce of ``parameters`` fp32 gradients."""
    return 0.0 if world == 1 else 2 * (world - 1) / world * 4 * parameters


@dataclass(frozen=True)
class Summary:
    """What a run came to, every figure the same on every rank."""

    out: Path
    held_out: str           # the objective's words for the last evaluation
    steps: int
    seconds: float          # wall time of training, across resumes
    samples: int            # examples (or windows) trained on, all ranks together
    world: int
    sent_per_step: float    # bytes a rank sent per step, the mean over ranks
    fp32_per_step: float    # what an fp32 ring allreduce sends per rank per step
    curves: Path | None

    def text(self) -> str:
        rate = self.samples / self.seconds if self.seconds > 0 else math.nan
        lines = [f"mpisign.train: done, {self.steps} steps on {self.world} rank(s) in "
                 f"{self.seconds:.1f} s ({rate:,.0f} samples/s)",
                 f"  evaluation (held-out split): {self.held_out}"]
        if self.world > 1:
            ratio = self.fp32_per_step / self.sent_per_step if self.sent_per_step else math.inf
            lines.append(f"  sent per rank per step: {_size(self.sent_per_step)}, against "
                         f"{_size(self.fp32_per_step)} for an fp32 allreduce ({ratio:.1f}x less)")
        lines.append(f"  results: {self.out}/ (metrics.jsonl, run.json, checkpoints"
                     + (f", {self.curves.name})" if self.curves else ")"))
        return "\n".join(lines)


def summarize(comm, out: Path, held_out: str, steps: int, seconds: float, batch_size: int,
              parameters: int, sent: float, launch_steps: int,
              timeout: float | None = None) -> Summary:
    """Collective: the summary of a run of ``steps`` in ``seconds`` (across resumes), with
    ``sent``, the bytes this rank sent in this launch's ``launch_steps``, averaged over the
    ranks. Rank 0 draws ``curves.png``."""
    world = comm.Get_size()
    total = np.array([float(sent)])
    # Wait on MPI: the mean needs every rank's bytes.
    bounded(comm.Iallreduce(MPI.IN_PLACE, total, op=MPI.SUM),
            f"the summary's sums on rank {comm.Get_rank()}", timeout)
    mean = float(total[0]) / world
    curves = draw_curves(out) if comm.Get_rank() == 0 else None
    return Summary(out=out, held_out=held_out, steps=steps, seconds=seconds,
                   samples=steps * world * batch_size, world=world,
                   sent_per_step=mean / max(1, launch_steps),
                   fp32_per_step=fp32_allreduce_bytes(parameters, world), curves=curves)


def draw_curves(out: Path) -> Path | None:
    """``out/curves.png`` from ``metrics.jsonl`` (:mod:`mpisign.train.plot`); None, with a
    warning, where it cannot be drawn (matplotlib missing): the run itself has succeeded."""
    from .plot import plot_runs

    try:
        return plot_runs([out], out / "curves.png")
    except (ImportError, ValueError, OSError, KeyError) as e:
        log.warning("no curves.png: %s", e)
        return None


def say(summary: Summary, rank: int) -> None:
    """Rank 0 prints the summary to stdout."""
    if rank == 0:
        sys.stdout.write(summary.text() + "\n")
        sys.stdout.flush()


def _size(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(nbytes) < 1000 or unit == "GB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{nbytes:.0f} B"
        nbytes /= 1000
    return f"{nbytes:.1f} GB"
