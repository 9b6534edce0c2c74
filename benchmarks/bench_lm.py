"""Validation loss at equal steps on a small transformer: Distributed Lion (majority vote)
against Signum's vote, AdamW and global Lion, over several seeds.

    python benchmarks/bench_lm.py                        # 4 ranks, 3 seeds, the tuned lrs
    python benchmarks/bench_lm.py --steps 200 --seeds 1 --optimizers lion adamw
    python benchmarks/bench_lm.py --seeds 1 --lr lion=3e-4,1e-3,3e-3   # an lr sweep

Each run is a job of its own, ``python -m mpisign.launch -n RANKS -- python -m mpisign.train
--model gpt ...`` on ``--dataset pystdlib`` (the standard library's source as bytes), with the
same model, batch, steps and seed for every optimizer; the figure is the validation loss (nats
per byte, over the fixed validation windows) of the run's last evaluation, read from its
``metrics.jsonl``:

* ``lion``: Distributed Lion, every rank's Lion sign combined by majority vote (1 bit a
  coordinate each way; Liu et al. 2024's "MaVo");
* ``signum``: Signum's majority vote (Bernstein et al. 2019), momentum 0.9;
* ``adamw``: torch's AdamW on the fp32 allreduce mean of the gradients (32 bits each way);
* ``lion-allreduce``: "global Lion", plain Lion on that mean: what Distributed Lion is judged
  against.

Each optimizer's lr defaults to ``mpisign.train``'s default for ``--model gpt`` (tuned on
this benchmark's setting: see README, "A transformer"); ``--lr NAME=LR[,LR...]`` sets another
or sweeps several (a row each). Weight decay and betas are the trainer's defaults. The table:
mean and sample standard deviation over the seeds, the range, and the ratio of each row's mean
to AdamW's (at its default lr, when it ran).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mpisign.train.options import default_lr  # noqa: E402

OPTIMIZERS = ("lion", "signum", "adamw", "lion-allreduce")
NAMES = {"lion": "Lion-MaVo (vote)", "signum": "Signum-MaVo (vote)",
         "adamw": "AdamW (allreduce)", "lion-allreduce": "global Lion (allreduce)"}
#: The model and batch: 121k parameters, 2 x 16 x 64 tokens a rank-step; about 40 ms a step on
#: 4 ranks sharing 2 cores.
MODEL = ["--layers", "2", "--width", "64", "--heads", "4", "--context", "64",
         "--batch-size", "16"]


def parse_lrs(items: list[str]) -> dict:
    """``["lion=1e-3,3e-3", ...]`` -> ``{"lion": [0.001, 0.003]}``."""
    lrs = {}
    for item in items:
        name, _, values = item.partition("=")
        if name not in OPTIMIZERS or not values:
            raise SystemExit(f"--lr {item}: expected NAME=LR[,LR...] with NAME one of "
                             f"{', '.join(OPTIMIZERS)}")
        lrs[name] = [float(v) for v in values.split(",")]
    return lrs


def final_loss(out: Path) -> float:
    """The validation loss of the run's last evaluation (an epoch's end or the final one)."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["type"] in ("epoch", "final")]
    if not evals or not any(r["type"] == "done" for r in records):
        raise RuntimeError(f"{out}: the run did not finish")
    loss = evals[-1]["test_loss"]
    return float("nan") if loss is None else loss


def run_one(args, optimizer: str, lr: float, seed: int) -> float:
    out = Path(args.out) / f"{optimizer}-lr{lr:g}-seed{seed}"
    if (out / "metrics.jsonl").is_file() and args.reuse:
        try:
            return final_loss(out)
        except RuntimeError:
            pass
    if out.exists():
        subprocess.run(["rm", "-rf", str(out)], check=True)
    cmd = [sys.executable, "-m", "mpisign.launch", "-n", str(args.ranks), "--", "python", "-m",
           "mpisign.train", "--model", "gpt", *MODEL, "--max-steps", str(args.steps),
           "--optimizer", optimizer, "--lr", repr(lr), "--seed", str(seed),
           "--log-every", "50", "--no-progress", "--out", str(out), *shlex.split(args.extra)]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        text, _ = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        text, _ = proc.communicate()
        raise SystemExit(f"{' '.join(cmd)}: killed after {args.timeout} s\n{text[-3000:]}")
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}: exit status {proc.returncode}\n{text[-3000:]}")
    loss = final_loss(out)
    print(f"@run {optimizer} lr={lr:g} seed={seed}: validation loss {loss:.4f} "
          f"({time.monotonic() - t0:.0f} s)", flush=True)
    return loss


def table(results: dict, args) -> str:
    """One row per (optimizer, lr): mean, standard deviation, range, ratio to AdamW's mean (at
    its default lr if that ran, else its first), and Lion-MaVo's ratio to it in words."""
    adamw = [v for (o, lr), v in results.items() if o == "adamw"]
    base = results.get(("adamw", default_lr("adamw", "gpt"))) or (adamw[0] if adamw else None)
    ref = statistics.mean(base) if base else None
    lines = [f"{args.ranks} ranks, gpt {' '.join(MODEL)}, {args.steps} steps, "
             f"seeds {', '.join(map(str, range(args.seeds)))}; validation loss (nats/byte)",
             "",
             "| optimizer | lr | mean | std | min - max | / AdamW |",
             "|---|---|---|---|---|---|"]
    for (optimizer, lr), losses in results.items():
        mean = statistics.mean(losses)
        std = statistics.stdev(losses) if len(losses) > 1 else 0.0
        ratio = f"{mean / ref:.3f}" if ref else "-"
        lines.append(f"| {NAMES[optimizer]} | {lr:g} | {mean:.4f} | {std:.4f} | "
                     f"{min(losses):.4f} - {max(losses):.4f} | {ratio} |")
    lion = results.get(("lion", default_lr("lion", "gpt"))) or next(
        (v for (o, _), v in results.items() if o == "lion"), None)
    if lion and ref:
        lines += ["", f"Lion-MaVo's mean validation loss is {statistics.mean(lion) / ref:.3f}x "
                      f"AdamW's."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS))
    ap.add_argument("--lr", nargs="*", default=[], metavar="NAME=LR[,LR...]",
                    help="learning rates (default: mpisign.train's for --model gpt)")
    ap.add_argument("--extra", default="", metavar="OPTIONS",
                    help="more mpisign.train options for every run, e.g. '--weight-decay 0' "
                         "(use another --out: the run directories do not name them)")
    ap.add_argument("--out", default="runs/bench_lm")
    ap.add_argument("--reuse", action="store_true",
                    help="take the loss of a finished run already in --out")
    ap.add_argument("--timeout", type=float, default=900, help="seconds a run may take")
    args = ap.parse_args(argv)
    lrs = parse_lrs(args.lr)
    results = {}
    t0 = time.monotonic()
    for optimizer in args.optimizers:
        for lr in lrs.get(optimizer, [default_lr(optimizer, "gpt")]):
            results[(optimizer, lr)] = [run_one(args, optimizer, lr, seed)
                                        for seed in range(args.seeds)]
    print(f"\n{table(results, args)}\n\n{time.monotonic() - t0:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
