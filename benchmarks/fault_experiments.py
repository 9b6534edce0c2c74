"""Issue 6's fault-tolerance experiments: test accuracy with K adversaries of M ranks, majority
vote against the fp32 mean, and the disagreement statistic per rank over time.

    python benchmarks/fault_experiments.py --out runs/faults --docs docs/faults
    python benchmarks/fault_experiments.py --out runs/faults --report-only   # redraw only

Step 1, the plan: ``python -m mpisign.train --dataset digits`` on M = 7 ranks for K = 1, 2, 3
adversaries of every blind attack (invert, random, scale, inf, nan, zero) and of the non-blind
``omniscient`` one, plus the clean run (K = 0); each twice: Signum majority vote and the fp32
allreduce SGD baseline (``--optimizer sgd``). One vote topology (server) is enough: every
topology produces the same bits (tests/test_vote_mpi.py), so the accuracy cannot differ.
Every Signum run logs a record each step (``--log-every 1``): the per-rank disagreement over
time.

Step 2, the runs: one MPI job (``mpisign.launch -n M``) runs them one after the other by calling
``mpisign.train.main`` in the same processes, which spares 7 Python + torch start-ups per run
(most of a short run's time on a small machine). A run already done is skipped and one cut
short is resumed, so an interrupted experiment continues where it stopped.

Step 3, the report in ``--out``: ``results.json`` (every figure), ``results.md`` (the tables),
``accuracy.png`` and ``disagreement.png``; copied to ``--docs`` when given.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mpisign.train.adversary import ATTACKS, NON_BLIND_ATTACKS  # noqa: E402
from mpisign.train.plot import read_metrics  # noqa: E402

OPTIMIZERS = {"signum": "Signum, majority vote (server)", "sgd": "SGD, fp32 allreduce mean"}
DETECTION = ("invert", "random", "zero", "omniscient")  # disagreement.png's panels, K = 2
LAST = 50  # steps over which the disagreement table averages
SETTINGS = ("ranks", "ks", "steps", "batch_size", "seed")  # what the runs depend on


# -- step 1: the plan ------------------------------------------------------------------------------
def plan(args) -> list[dict]:
    common = ["--dataset", "digits", "--batch-size", str(args.batch_size), "--max-steps",
              str(args.steps), "--seed", str(args.seed), "--no-progress"]
    runs = []
    for opt in OPTIMIZERS:
        cases = [("clean", 0)] + [(a, k) for a in (*ATTACKS, *NON_BLIND_ATTACKS)
                                  for k in args.ks if k > 0]
        for attack, k in cases:
            argv = common + ["--optimizer", opt]
            if opt == "signum":   # a record every step: the disagreement over time
                argv += ["--topology", "server", "--log-every", "1"]
            else:                 # no disagreement to record: spare the per-step gather
                argv += ["--log-every", "10"]
            if k:
                argv += ["--adversaries", str(k), "--attack", attack]
            runs.append(dict(name=f"{opt}-{attack}-k{k}", optimizer=opt, attack=attack, k=k,
                             argv=argv))
    return runs


# -- step 2: the runs, inside one MPI job ---------------------------------------------------------
def worker(out: Path) -> None:
    """Every rank: run the plan's runs in turn (rank 0 decides what is left to do)."""
    from mpi4py import MPI

    from mpisign.train import main as train_main

    comm = MPI.COMM_WORLD
    runs = json.loads((out / "plan.json").read_text())
    for i, run in enumerate(runs):
        where = out / run["name"]
        state = comm.bcast(_state(where) if comm.Get_rank() == 0 else None, root=0)
        if state == "done":
            continue
        t0 = time.perf_counter()
        train_main(run["argv"] + ["--out", str(where)] + (["--resume"] if state else []))
        if comm.Get_rank() == 0:
            print(f"@run {i + 1}/{len(runs)} {run['name']}: {_final(where)['test_acc']:.4f} "
                  f"in {time.perf_counter() - t0:.1f} s", flush=True)


def _state(where: Path) -> str | None:
    """'done', 'partial' (a checkpoint to resume from) or None (start afresh)."""
    if not (where / "metrics.jsonl").is_file():
        return None
    if any(r["type"] == "done" for r in read_metrics(where)):
        return "done"
    if (where / "checkpoints").is_dir() and any((where / "checkpoints").iterdir()):
        return "partial"
    shutil.rmtree(where)   # started but never checkpointed: start again
    return None


def launch(args, out: Path) -> None:
    from mpisign.launch import local_env, mpiexec_command

    cmd = mpiexec_command(args.ranks, [sys.executable, str(Path(__file__).resolve()),
                                       "--worker", "--out", str(out)])
    print("+", " ".join(cmd), flush=True)
    with open(out / "job.log", "a") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=local_env(), cwd=ROOT)
        for line in proc.stdout:
            log.write(line)
            if line.startswith("@run"):
                print(line[1:], end="", flush=True)
        if proc.wait():
            sys.exit(f"the MPI job exited {proc.returncode}; see {out / 'job.log'} (run this "
                     f"again to continue where it stopped)")


# -- step 3: the report ---------------------------------------------------------------------------
def _final(where: Path) -> dict:
    """The last evaluation of a run (an epoch's or the final one)."""
    evals = [r for r in read_metrics(where) if r["type"] in ("epoch", "final")]
    return max(evals, key=lambda r: r["step"])


def collect(out: Path, runs: list[dict]) -> list[dict]:
    results = []
    for run in runs:
        where = out / run["name"]
        records = read_metrics(where)
        final = _final(where)
        evals = [r["test_acc"] for r in records if r["type"] in ("epoch", "final")]
        steps = [r for r in records if r["type"] == "step"]
        row = dict(name=run["name"], optimizer=run["optimizer"], attack=run["attack"],
                   k=run["k"], test_acc=final["test_acc"], test_loss=final["test_loss"],
                   step=final["step"], time_s=[r for r in records if r["type"] == "done"][-1]
                   ["time"], finite=final["test_loss"] is not None,
                   test_acc_last5=evals[-5:])
        if steps and "disagreement" in steps[-1]:
            d = np.array([r["disagreement"] for r in steps[-LAST:]])
            k = run["k"]
            row["disagreement_honest"] = float(d[:, k:].mean())
            row["disagreement_adversary"] = float(d[:, :k].mean()) if k else None
            row["loss_last"] = float(np.mean([r["loss"] for r in steps[-LAST:]]))
        results.append(row)
    return results


def _cell(r: dict) -> str:
    return f"{100 * r['test_acc']:.1f}" + ("" if r["finite"] else " (NaN)")


def _span(r: dict) -> str:
    return f"{100 * min(r['test_acc_last5']):.1f}-{100 * max(r['test_acc_last5']):.1f}%"


def tables(results: list[dict], args) -> str:
    by = {(r["optimizer"], r["attack"], r["k"]): r for r in results}
    ks = [k for k in args.ks if k > 0]
    clean = {opt: by[(opt, "clean", 0)] for opt in OPTIMIZERS}
    head = ("| attack | " + " | ".join(f"vote K={k}" for k in ks) + " | "
            + " | ".join(f"mean K={k}" for k in ks) + " |")
    lines = [f"Final test accuracy (%) on digits' 360 test images after {args.steps} steps, "
             f"M = {args.ranks} ranks, batch {args.batch_size} per rank, seed {args.seed}. "
             f"Clean (K = 0): vote {_cell(clean['signum'])}, mean {_cell(clean['sgd'])}. "
             f"(NaN): the test loss is not finite (NaN weights). Noise: the clean vote's "
             f"last 5 evaluations span {_span(clean['signum'])}, the clean mean's "
             f"{_span(clean['sgd'])}.", "",
             head, "|---|" + "---:|" * (2 * len(ks))]
    for attack in (*ATTACKS, *NON_BLIND_ATTACKS):
        cells = [_cell(by[(opt, attack, k)]) for opt in OPTIMIZERS for k in ks]
        lines.append(f"| {attack} | " + " | ".join(cells) + " |")
    lines += ["", f"Disagreement with the majority (fraction of coordinates, Signum, mean over "
              f"the last {LAST} steps): honest ranks / adversaries.", "",
              "| attack | " + " | ".join(f"K={k}" for k in ks) + " |",
              "|---|" + "---:|" * len(ks)]
    c = clean["signum"]
    lines.append(f"| clean (K=0) | {c['disagreement_honest']:.3f} |" + " |" * (len(ks) - 1))
    for attack in (*ATTACKS, *NON_BLIND_ATTACKS):
        cells = [by[("signum", attack, k)] for k in ks]
        lines.append(f"| {attack} | " + " | ".join(
            f"{r['disagreement_honest']:.3f} / {r['disagreement_adversary']:.3f}"
            for r in cells) + " |")
    return "\n".join(lines) + "\n"


def plot_accuracy(results: list[dict], args, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = (*ATTACKS, *NON_BLIND_ATTACKS)
    ks = [0] + [k for k in args.ks if k > 0]
    by = {(r["optimizer"], r["attack"], r["k"]): r for r in results}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    for ax, opt in zip(axes, OPTIMIZERS):
        grid = np.array([[by[(opt, "clean" if k == 0 else a, k)]["test_acc"] for k in ks]
                         for a in attacks]) * 100
        im = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
        for i, a in enumerate(attacks):
            for j, k in enumerate(ks):
                r = by[(opt, "clean" if k == 0 else a, k)]
                ax.text(j, i, f"{grid[i, j]:.0f}" + ("" if r["finite"] else "\nNaN"),
                        ha="center", va="center", fontsize=9)
        ax.set_xticks(range(len(ks)), [f"K={k}" for k in ks])
        ax.set_yticks(range(len(attacks)), attacks)
        ax.set_title(OPTIMIZERS[opt], fontsize=10)
        ax.set_xlabel(f"adversaries of M={args.ranks}")
    fig.colorbar(im, ax=axes, label="test accuracy (%)", shrink=0.85)
    fig.suptitle(f"digits, {args.steps} steps: test accuracy with K adversaries "
                 f"(K=0 column: the clean run)", fontsize=11)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def plot_disagreement(out: Path, args, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = 2 if 2 in args.ks else max(args.ks)
    fig, axes = plt.subplots(1, len(DETECTION), figsize=(3.2 * len(DETECTION), 3.4),
                             sharey=True)
    for ax, attack in zip(axes, DETECTION):
        steps = [r for r in read_metrics(out / f"signum-{attack}-k{k}") if r["type"] == "step"]
        x = np.array([r["step"] for r in steps])
        d = np.array([r["disagreement"] for r in steps])
        for rank in range(d.shape[1]):
            adversary = rank < k
            ax.plot(x, d[:, rank], lw=0.8, color="tab:red" if adversary else "tab:blue",
                    alpha=0.8, label=("adversary" if adversary else "honest")
                    if rank in (0, k) else None)
        ax.axhline(0.5, color="k", lw=0.6, ls="--")
        ax.set_title(f"{attack}, K={k} of {args.ranks}", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("fraction voted against the majority")
    axes[0].legend(loc="center right", fontsize=8)
    fig.suptitle("Signum on digits: per-rank disagreement with the vote, every step",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def report(args, out: Path) -> None:
    runs = json.loads((out / "plan.json").read_text())
    results = collect(out, runs)
    (out / "results.json").write_text(json.dumps(
        {"settings": {k: getattr(args, k) for k in SETTINGS},
         "results": results}, indent=1) + "\n")
    md = tables(results, args)
    (out / "results.md").write_text(md)
    print(md)
    plot_accuracy(results, args, out / "accuracy.png")
    plot_disagreement(out, args, out / "disagreement.png")
    if args.docs:
        docs = Path(args.docs)
        docs.mkdir(parents=True, exist_ok=True)
        for name in ("accuracy.png", "disagreement.png"):
            shutil.copy(out / name, docs / name)
            print(f"{docs / name}: {(docs / name).stat().st_size // 1024} KB")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="runs, results.json/.md and the PNGs")
    p.add_argument("--docs", default=None, help="also copy the PNGs here (docs/faults)")
    p.add_argument("--ranks", type=int, default=7, help="M")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3], help="K > 0 to run")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report-only", action="store_true", help="no runs: redo the report")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    if args.worker:
        worker(out)
        return 0
    out.mkdir(parents=True, exist_ok=True)
    settings = out / "settings.json"   # --report-only redraws with the runs' own settings
    if args.report_only:
        if not settings.is_file():
            sys.exit(f"{settings} not found: is {out} the --out of this script?")
        for key, value in json.loads(settings.read_text()).items():
            setattr(args, key, value)
    else:
        settings.write_text(json.dumps({k: getattr(args, k) for k in SETTINGS}) + "\n")
        runs = plan(args)
        previous = out / "plan.json"
        if previous.is_file() and json.loads(previous.read_text()) != runs:
            sys.exit(f"{out} holds runs of another plan (other --steps, --ks, ...): choose "
                     f"another --out")
        previous.write_text(json.dumps(runs, indent=1) + "\n")
        t0 = time.perf_counter()
        launch(args, out)
        print(f"{len(runs)} runs in {time.perf_counter() - t0:.0f} s", flush=True)
    report(args, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
