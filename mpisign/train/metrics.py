"""The books of a training run: ``metrics.jsonl``, ``run.json`` and the per-interval figures.

Only rank 0 writes. ``metrics.jsonl`` holds one JSON object a line, its ``type`` one of:

* ``step``: every ``--log-every`` steps, over the steps since the last one and all ranks:
  ``loss``, ``acc`` (a language model: ``ppl``, the perplexity ``exp(loss)``, instead, and
  ``tokens``, those trained on so far), ``lr``, ``time`` (wall seconds since the run began,
  across resumes),
  ``step_s`` (slowest rank's mean step), ``compute_s`` / ``comm_s`` (mean and max over ranks of
  forward+backward and of the optimizer step), ``bytes_sent`` / ``bytes_received`` per step and
  ``nonfinite`` (cumulative non-finite gradient entries), each a list by rank, and for the vote
  ``disagreement``, by rank: the fraction of the last step's votes against the majority.
* ``epoch``: ``train_loss``, ``train_acc`` (the epoch, all ranks), ``test_loss``, ``test_acc``
  (the full test set), ``time``, ``epoch_time``. A language model: ``train_ppl`` and
  ``test_ppl`` instead of the accuracies, ``test_*`` being the corpus's validation windows, its
  loss in nats per token; and ``tokens``.
* ``final`` (the test figures when a run ends mid-epoch), ``checkpoint``, ``stopped`` (a signal),
  ``done``.

Which figure stands beside the loss is the data's objective's
(:mod:`mpisign.train.objectives`).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import sys
from collections import Counter
from dataclasses import astuple, dataclass, field
from pathlib import Path

import numpy as np
import torch
from mpi4py import MPI

import mpisign

from ..mpi.comm import bounded
from .models import count_parameters

__all__ = ["Metrics", "run_record", "StepRecord", "Tally", "Interval", "Traffic"]


@dataclass
class Tally:
    """Sums over some of this rank's training batches (an epoch's, or an interval's)."""

    loss_sum: float = 0.0   # the batches' mean loss times their size
    correct: float = 0.0
    count: float = 0.0

    def add(self, other: Tally) -> None:
        self.loss_sum += other.loss_sum
        self.correct += other.correct
        self.count += other.count

    @property
    def loss(self) -> float:
        return self.loss_sum / max(1, self.count)

    @property
    def acc(self) -> float:
        return self.correct / max(1, self.count)


@dataclass
class Interval:
    """What one rank adds up between two ``step`` records."""

    batches: Tally = field(default_factory=Tally)
    compute_s: float = 0.0   # forward + backward (+ the attack)
    comm_s: float = 0.0      # the optimizer step
    steps: int = 0

    def add(self, batch: Tally, compute_s: float, comm_s: float) -> None:
        """One more step: its batch's sums and its times."""
        self.batches.add(batch)
        self.compute_s += compute_s
        self.comm_s += comm_s
        self.steps += 1


@dataclass(frozen=True)
class Traffic:
    """One rank's cumulative counters: bytes sent and received, the last vote's disagreement
    with the majority and the non-finite gradient entries (NaN where the optimizer has none)."""

    bytes_sent: float
    bytes_received: float
    disagreement: float
    nonfinite: float


class Metrics:
    """``metrics.jsonl`` on rank 0: one JSON object a line, non-finite numbers as null."""

    def __init__(self, path: Path | None, append: bool):
        self.f = open(path, "a" if append else "w") if path is not None else None

    def write(self, **record) -> None:
        if self.f is None:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in record.items()}
        self.f.write(json.dumps(clean) + "\n")
        self.f.flush()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_record(args, comm, data, model, device, steps_per_epoch, total_steps, resumed) -> dict:
    """What run.json holds: enough to tell later what ran where, with what."""
    import mpi4py

    hosts = comm.allgather(MPI.Get_processor_name())
    devices = comm.allgather(str(device))
    return {
        "config": vars(args),
        # As typed (the interpreter, -m mpi4py -m mpisign.train, the options), where Python
        # keeps it (3.10+); sys.argv holds the module's file instead of "-m mpisign.train".
        "command": getattr(sys, "orig_argv", sys.argv),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "resumed_from_step": resumed,
        "world_size": comm.Get_size(),
        "nodes": sorted(set(hosts)),
        "ranks_per_node": dict(Counter(hosts)),
        "hosts": hosts,
        "pids": comm.allgather(os.getpid()),
        "devices": devices,
        "adversarial_ranks": list(range(args.adversaries)),
        "mpi": {"library": MPI.Get_library_version().replace("\x00", "").strip(),
                "standard": "%d.%d" % MPI.Get_version(), "mpi4py": mpi4py.__version__},
        "slurm": {k: v for k, v in os.environ.items()
                  if k in ("SLURM_JOB_ID", "SLURM_JOB_NAME", "SLURM_JOB_NODELIST",
                           "SLURM_NNODES", "SLURM_NTASKS", "SLURM_JOB_PARTITION",
                           "SLURM_RESTART_COUNT", "SLURM_CLUSTER_NAME")},
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                     "torchvision": _version("torchvision"), "numpy": np.__version__,
                     "mpisign": mpisign.__version__},
        "data": data.describe(),
        "model": {"name": args.model, "parameters": count_parameters(model)},
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
    }


class StepRecord:
    """A ``step`` record's gather, posted (collective): every rank's ``interval`` and its
    ``traffic`` since ``before`` (the counters at the previous record) go to rank 0, which
    writes the record, with its ``extra`` fields added, at :meth:`finish`. ``figures(tally)``:
    the record's fields for the interval's sums (default ``loss`` and ``acc``; the objective's
    ``figures``). Under --quorum the loop finishes it some steps on, so that rank 0 does not
    wait for a late rank's part (see :func:`mpisign.train.loop.log_step`)."""

    def __init__(self, comm, interval: Interval, traffic: Traffic, before: Traffic, step: int,
                 steps_per_epoch: int, lr: float, now: float, extra: dict | None = None,
                 figures=None):
        sent = (traffic.bytes_sent - before.bytes_sent) / interval.steps
        received = (traffic.bytes_received - before.bytes_received) / interval.steps
        self.mine = np.array([*astuple(interval.batches), interval.compute_s, interval.comm_s,
                              interval.steps, sent, received, traffic.disagreement,
                              traffic.nonfinite], dtype=np.float64)
        self.rank, world = comm.Get_rank(), comm.Get_size()
        self.every = np.empty((world, self.mine.size)) if self.rank == 0 else None
        self.head = dict(type="step", step=step, epoch=step / steps_per_epoch, lr=lr)
        self.now, self.extra, self.figures = now, extra, figures
        self.request = comm.Igather(self.mine, self.every, root=0)

    @property
    def step(self) -> int:
        return self.head["step"]

    def finish(self, metrics: Metrics, timeout: float | None = None) -> dict | None:
        """Wait for every rank's part (bounded by ``timeout``, default ``$MPISIGN_TIMEOUT``);
        rank 0 writes the record and returns it."""
        # Wait on MPI: rank 0 needs every rank's figures to write the record.
        bounded(self.request, f"metrics gather at step {self.step} on rank {self.rank}", timeout)
        if self.rank != 0:
            return None
        (loss, correct, count, compute, comms, steps, sent, received, disagree,
         nonfinite) = self.every.T
        compute, comms = compute / np.maximum(steps, 1), comms / np.maximum(steps, 1)
        sums = Tally(float(loss.sum()), float(correct.sum()), float(count.sum()))
        figures = self.figures
        record = dict(**self.head,
                      **(figures(sums) if figures else {"loss": sums.loss, "acc": sums.acc}),
                      time=self.now,
                      step_s=float((compute + comms).max()),
                      compute_s={"mean": float(compute.mean()), "max": float(compute.max())},
                      comm_s={"mean": float(comms.mean()), "max": float(comms.max())},
                      bytes_sent=[int(b) for b in sent],
                      bytes_received=[int(b) for b in received],
                      nonfinite=[int(n) for n in np.nan_to_num(nonfinite)])
        if not np.isnan(disagree).any():
            record["disagreement"] = [round(float(d), 6) for d in disagree]
        record.update(self.extra or {})
        metrics.write(**record)
        return record
