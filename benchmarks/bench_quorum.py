"""Stragglers: step time and accuracy at equal steps with one rank made slow, for a quorum vote
(3 of 4), the full vote, and the fp32 allreduce SGD baseline.

    sudo PATH=$PWD/.venv/bin:$PATH benchmarks/netns_cluster.sh run -n 4 -- \\
        python benchmarks/bench_quorum.py --mpirun '$NETNS_MPIRUN -n 4'
    ... bench_quorum.py --mpirun '$NETNS_MPIRUN -n 4' --model resnet18 --steps 20 --batch-size 16
    ... bench_quorum.py --mpirun '$NETNS_MPIRUN -n 4' --progress-thread 100   # see below

Each row is a job of its own, ``python -m mpisign.train`` on 4 ranks with the same model, data,
batch, steps and seed; the straggler is rank 3 (``--straggle``, see
:mod:`mpisign.train.straggler`):

* ``none``: no straggler;
* ``x2``: rank 3's compute takes twice as long, every step (a throttled GPU);
* ``0.5@0.1``: rank 3 stalls 0.5 s on a random 10% of its steps (a data loader, a neighbour).

The step time is the wall time between the run's first and last ``step`` records (rank 0's
clock: what the job's steps cost, startup and evaluation left out) over the steps between
them; the accuracy is the test set's after the last step (the ``final`` or last ``epoch``
record). Ratios are against the same method's run with no straggler, in the same invocation.

``--progress-thread US`` runs every job with Open MPI's TCP progress thread
(``OMPI_MCA_btl_tcp_progress_thread=US``): over TCP a message of 64 KiB or more moves only
while its sender is in MPI, so without it a late rank waits for its result until the ranks that
hold it vote again (see the README's stragglers section).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

METHODS = {"quorum 3 of 4": ["--optimizer", "signum", "--quorum", "3"],
           "quorum 3 of 4, lag 4": ["--optimizer", "signum", "--quorum", "3", "--lag", "4"],
           "quorum 3 of 4, sharded, lag 4": ["--optimizer", "signum", "--quorum", "3", "--lag",
                                             "4", "--topology", "sharded"],
           "quorum 3 of 4, sharded, lag 8": ["--optimizer", "signum", "--quorum", "3", "--lag",
                                             "8", "--topology", "sharded"],
           "full vote": ["--optimizer", "signum"],
           "full vote, sharded": ["--optimizer", "signum", "--topology", "sharded"],
           "fp32 allreduce SGD": ["--optimizer", "sgd"]}
STRAGGLERS = {"none": [], "x2": ["--straggle", "3:x2"], "0.5@0.1": ["--straggle", "3:0.5@0.1"]}


def run(mpirun: str, out: Path, model: str, steps: int, batch: int, extra: list[str],
        seed: int, log_every: int | None = None) -> dict:
    """One job; its step time and final test accuracy from metrics.jsonl."""
    cmd = [*shlex.split(os.path.expandvars(mpirun)), sys.executable, "-m", "mpi4py", "-m",
           "mpisign.train", "--model", model, "--max-steps", str(steps), "--batch-size",
           str(batch), "--log-every",
           str(log_every or max(1, steps // 10)), "--no-progress", "--seed",
           str(seed), "--out", str(out), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps_seen = [r for r in records if r["type"] == "step"]
    first, last = steps_seen[0], steps_seen[-1]
    held = [r for r in records if r["type"] in ("final", "epoch")]
    return {"step_s": (last["time"] - first["time"]) / (last["step"] - first["step"]),
            "acc": held[-1].get("test_acc") if held else None,
            "abstentions": last.get("abstentions")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mpirun", default=None,
                    help="the launcher of 4 ranks, e.g. '$NETNS_MPIRUN -n 4' (default: "
                         "mpisign.launch's mpiexec, local ranks)")
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--stragglers", nargs="*", default=list(STRAGGLERS),
                    choices=list(STRAGGLERS))
    ap.add_argument("--progress-thread", type=int, default=None, metavar="US",
                    help="Open MPI's TCP progress thread, polling every US microseconds, in "
                         "every job (OMPI_MCA_btl_tcp_progress_thread)")
    ap.add_argument("--log-every", type=int, default=None, metavar="N",
                    help="the jobs' --log-every (default: a tenth of --steps). Rank 0 gathers "
                         "every rank's figures for a step record: under a quorum, the one "
                         "place in the loop where it waits for a late rank")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    if args.progress_thread is not None:   # the launcher passes it to every rank
        os.environ["OMPI_MCA_btl_tcp_progress_thread"] = str(args.progress_thread)
    mpirun = args.mpirun
    if mpirun is None:   # local ranks, with mpisign.launch's settings
        sys.path.insert(0, str(REPO))
        from mpisign.launch import local_env, mpiexec_command
        os.environ.update(local_env())
        mpirun = shlex.join(mpiexec_command(4, []))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            base = None
            for straggler in args.stragglers:
                out = Path(tmp) / f"{len(rows)}"
                figures = run(mpirun, out, args.model, args.steps, args.batch_size,
                              METHODS[method] + STRAGGLERS[straggler], args.seed,
                              args.log_every)
                base = figures["step_s"] if straggler == "none" else base
                row = {"method": method, "straggler": straggler,
                       "progress_thread": args.progress_thread,
                       "log_every": args.log_every or max(1, args.steps // 10), **figures,
                       "ratio": figures["step_s"] / base if base else None}
                rows.append(row)
                acc = "-" if row["acc"] is None else f"{100 * row['acc']:.1f}%"
                ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}x"
                print(f"{method:20s} {straggler:8s} {1e3 * row['step_s']:8.1f} ms/step "
                      f"{ratio:>7s} {acc:>7s}  abstentions {row['abstentions']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
