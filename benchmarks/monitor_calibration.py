"""Issue 31's monitor calibration: how often :class:`mpisign.DisagreementMonitor` cries wolf on
honest ranks, and how soon it catches the blind attacks, for a grid of its settings.

Step 1, the traces (an MPI job; every rank trains, rank 0 writes): the small CNN trained with
``mpisign.Signum`` (lr 1e-3, momentum 0.9, batch 32 a rank, the trainer's defaults) and a
monitor, whose figures ride in the step header; rank 0 keeps ``stats.disagreement_by_rank``, every
rank's disagreement with the vote, at every step::

    python -m mpisign.launch -n 4 -- python benchmarks/monitor_calibration.py record \\
        --data random --steps 5000 --out runs/monitor
    python -m mpisign.launch -n 5 -- python benchmarks/monitor_calibration.py record \\
        --data fashion-mnist --steps 1000 --attacks invert:1 invert:2 random:1 zero:2 ...

``--data random``: fresh Gaussian images with random labels every step (pure noise, the hardest
case for honest agreement); ``digits`` (8x8, scikit-learn's) and ``fashion-mnist`` (28x28) are the
trainer's data. An attack ``NAME:K`` has ranks 0..K-1 apply :func:`mpisign.train.adversary.make_attack`
to their gradients before the vote, as ``python -m mpisign.train --adversaries K --attack NAME``
does.

Step 2, the replay (one process, no MPI): the monitor is a pure function of the per-step
fractions, so every setting of the grid replays every trace exactly as it would have run::

    python benchmarks/monitor_calibration.py report --out runs/monitor

It prints, for each setting, the false alarms (warnings about honest ranks) per 10,000 honest
rank-steps over all traces, and each attack's detection delay: the steps from the start until
every adversary is flagged (a setting whose window is w cannot catch anything before step w).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mpisign.optim.detection import DisagreementMonitor  # noqa: E402

DEFAULTS = DisagreementMonitor()


# -- step 1: traces -------------------------------------------------------------------------------
def record(args) -> None:
    import torch
    import torch.nn.functional as F
    from mpi4py import MPI

    from mpisign import Signum
    from mpisign.train.adversary import make_attack
    from mpisign.train.data import load_data
    from mpisign.train.models import SmallCNN

    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    logging.getLogger("mpisign").setLevel(logging.ERROR)   # the replay judges, not this run
    torch.set_num_threads(1)
    out = Path(args.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    data = None if args.data == "random" else load_data(args.data)
    channels, side = (1, 28) if data is None else (data.in_channels, data.image_size)
    if args.model != "cnn":   # fewer coordinates: a noisier disagreement than the CNN's 0.42M
        if data is not None:
            raise SystemExit(f"--model {args.model} takes --data random")
        channels, side = 1, 8

    for case in ["clean:0", *args.attacks] if args.clean else args.attacks:
        name, k = case.split(":")
        k = int(k)
        label = {"cnn": args.data, "mlp": f"{args.data}_mlp",
                 "vector": f"gradients{args.coords}"}[args.model]
        path = out / f"{label}-b{args.batch_size}-M{world}-{name}{k}.json"
        torch.manual_seed(args.seed)
        if args.model == "cnn":
            model = SmallCNN(channels, 10, side)
        elif args.model == "mlp":
            model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 128),
                                        torch.nn.ReLU(), torch.nn.Linear(128, 10))
        else:   # no model: one parameter whose gradient is fresh Gaussian noise every step
            model = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(args.coords))])
        opt = Signum(model.parameters(), lr=args.lr, momentum=0.9, comm=comm,
                     monitor=DisagreementMonitor(window=1, margin=None, threshold=0.999))
        attack = make_attack(name, generator=torch.Generator().manual_seed(rank)) \
            if rank < k else None
        noise = torch.Generator().manual_seed(1000 + rank)
        batches = iter(())
        epoch, trace, t0 = 0, [], time.perf_counter()
        for step in range(args.steps):
            if data is None:
                x = torch.randn(args.batch_size, channels, side, side, generator=noise)
                y = torch.randint(0, 10, (args.batch_size,), generator=noise)
            else:
                batch = next(batches, None)
                if batch is None:
                    batches = data.train_batches(rank=rank, world=world, batch_size=args.batch_size,
                                                 seed=args.seed, epoch=epoch)
                    epoch += 1
                    batch = next(batches)
                x, y = batch
            opt.zero_grad()
            if args.model == "vector":
                model[0].grad = torch.randn(args.coords, generator=noise)
            else:
                F.cross_entropy(model(x), y).backward()
            if attack is not None:
                for p in model.parameters():
                    attack(p.grad)
            opt.step()
            if step > 0:    # step k's header carries step k-1's figures
                trace.append(list(opt.stats.disagreement_by_rank))
        if rank == 0:
            path.write_text(json.dumps(dict(data=label, batch=args.batch_size, ranks=world,
                                            attack=name,
                                            adversaries=list(range(k)), steps=args.steps,
                                            seconds=round(time.perf_counter() - t0, 1),
                                            trace=trace)))
            print(f"{path.name}: {len(trace)} steps in {time.perf_counter() - t0:.0f} s",
                  flush=True)
        comm.Barrier()


# -- step 2: replay -------------------------------------------------------------------------------
GRID = dict(window=(20, 30, 40), margin=(0.10, 0.15), mad_k=(2.0,), noise_k=(0.0, 2.5, 3.0))


def replay(trace: np.ndarray, **settings) -> tuple[dict, list]:
    """Run a monitor over ``trace`` (steps x ranks); return the warnings (rank -> count of
    entries into the flagged set) and the flagged set at every step."""
    monitor = DisagreementMonitor(**settings)
    warnings: dict[int, int] = {}
    flagged = []
    for step, fractions in enumerate(trace):
        before = set(monitor.flagged)
        now = monitor.record(fractions, step, verbose=False)
        for r in set(now) - before:
            warnings[r] = warnings.get(r, 0) + 1
        flagged.append(set(now))
    return warnings, flagged


def judge(runs: list[dict], settings: dict) -> dict:
    honest_steps = alarms = 0
    delays = {}
    for run in runs:
        trace = np.asarray(run["trace"], dtype=np.float64)
        bad = set(run["adversaries"])
        warnings, flagged = replay(trace, **settings)
        honest_steps += trace.shape[0] * (trace.shape[1] - len(bad))
        alarms += sum(n for r, n in warnings.items() if r not in bad)
        if bad:
            caught = next((s + 1 for s, f in enumerate(flagged) if bad <= f), None)
            delays[f"{run['data']} b{run.get('batch', 32)} M{run['ranks']} "
                   f"{run['attack']}x{len(bad)}"] = caught
    return dict(alarms=alarms, honest_rank_steps=honest_steps,
                per_10k=10_000 * alarms / max(1, honest_steps), delays=delays)


def report(args) -> None:
    runs = [json.loads(p.read_text()) for p in sorted(Path(args.out).glob("*.json"))
            if p.name != "report.json"]
    if not runs:
        sys.exit(f"no traces in {args.out}: run the record step first")
    settings = [dict(threshold=0.5, window=w, margin=m, mad_k=k, noise_k=z)
                for w in GRID["window"] for m in GRID["margin"] for k in GRID["mad_k"]
                for z in GRID["noise_k"]]
    current = dict(threshold=DEFAULTS.threshold, window=DEFAULTS.window, margin=DEFAULTS.margin,
                   mad_k=DEFAULTS.mad_k, noise_k=DEFAULTS.noise_k)
    if current not in settings:
        settings.insert(0, current)
    results = []
    for s in settings:
        r = judge(runs, s)
        counted = [d for case, d in r["delays"].items()
                   if args.attacks_on is None or case.split()[0] in args.attacks_on]
        worst = max((d if d is not None else 10**9) for d in counted) if counted else 0
        results.append(dict(settings=s, **r, worst_delay=worst))
    honest = [run for run in runs if not run["adversaries"]]
    print(f"{len(runs)} traces ({len(honest)} honest): "
          + ", ".join(f"{r['data']} M{r['ranks']} {r['attack']}x{len(r['adversaries'])} "
                      f"{len(r['trace'])} steps" for r in runs))
    print("\n| window | margin | mad_k | noise_k | false alarms / 10k honest rank-steps | "
          "worst delay (steps) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        s = r["settings"]
        worst = "never" if r["worst_delay"] >= 10**9 else r["worst_delay"]
        mark = " (current)" if s == current else ""
        print(f"| {s['window']}{mark} | {s['margin']} | {s['mad_k']} | {s['noise_k']} | "
              f"{r['per_10k']:.2f} "
              f"({r['alarms']} of {r['honest_rank_steps']}) | {worst} |")
    (Path(args.out) / "report.json").write_text(json.dumps(results, indent=1))
    if args.show:
        chosen = next(r for r in results if r["settings"] == dict(
            threshold=0.5, window=args.show[0], margin=args.show[1], mad_k=args.show[2],
            noise_k=args.show[3]))
        print(f"\nsetting {chosen['settings']}: delays by attack")
        for case, d in chosen["delays"].items():
            print(f"  {case}: {d if d is not None else 'never'}")
        for run in honest:
            w, _ = replay(np.asarray(run["trace"]), **chosen["settings"])
            tr = np.asarray(run["trace"])
            print(f"  honest {run['data']} b{run.get('batch', 32)} M{run['ranks']}: "
                  f"warnings {w or 'none'}; "
                  f"per-step fraction {tr.min():.3f}-{tr.max():.3f}, mean {tr.mean():.3f}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    r = sub.add_parser("record")
    r.add_argument("--data", choices=("random", "digits", "fashion-mnist"), default="random")
    r.add_argument("--steps", type=int, default=5000)
    r.add_argument("--model", choices=("cnn", "mlp", "vector"), default="cnn",
                   help="mlp: a 64-128-10 perceptron on 8x8 noise; vector: --coords coordinates "
                        "whose gradients are Gaussian noise (both with --data random)")
    r.add_argument("--coords", type=int, default=1000)
    r.add_argument("--batch-size", type=int, default=32)
    r.add_argument("--lr", type=float, default=1e-3)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--attacks", nargs="*", default=[], metavar="NAME:K")
    r.add_argument("--no-clean", dest="clean", action="store_false",
                   help="only the attacked runs")
    r.add_argument("--out", default="runs/monitor")
    q = sub.add_parser("report")
    q.add_argument("--out", default="runs/monitor")
    q.add_argument("--show", nargs=4, type=float, metavar=("WINDOW", "MARGIN", "MAD_K", "NOISE_K"),
                   help="one setting's delays by attack and warnings by honest trace")
    q.add_argument("--attacks-on", nargs="*", default=None, metavar="DATA",
                   help="count only these traces' attacks in the worst delay (e.g. "
                        "fashion-mnist: on pure noise an attack cannot be told from an honest "
                        "rank); default: all")
    args = p.parse_args(argv)
    if args.what == "report" and args.show:
        args.show = [int(args.show[0]), *args.show[1:]]
    (record if args.what == "record" else report)(args)


if __name__ == "__main__":
    main()
