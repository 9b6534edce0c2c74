"""The cost model against the measurements, then its predictions for large clusters.

    python benchmarks/cost_table.py bench-results/collectives_shm.json \\
        bench-results/collectives_1gbit.json [--gbit 100 --alpha 1.5e-6] [--json out.json]

1. For every case of benchmarks/bench_collectives.py (JSON from it or from run_collectives.py),
   the model's prediction with the link that run measured (ping-pong alpha, beta; gamma of a
   numpy pass), once for a lone pair of ranks and once with every pair at once ("loaded"), the
   measured best time, and the error ``predicted / measured - 1``. The MPI
   default allreduce is compared with the fastest fp32 algorithm the model knows.
2. Predictions for M = 16 .. 1024 ranks on an InfiniBand-class link (100 Gbit/s, alpha 1.5 us)
   for ResNet-50 (25.6M coordinates): each topology, the fp32 ring and Rabenseifner allreduces,
   what :func:`mpisign.collectives.costmodel.choose` picks, and the vote's fraction of the best fp32 time.
   Twice: compute free (gamma = 0, the GPU kernels' regime) and with the gamma measured here
   (the CPU reference path). That is how a user who outgrows this machine picks a topology.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mpisign.collectives import costmodel as cm  # noqa: E402
from mpisign.collectives.costmodel import Link  # noqa: E402

RESNET50 = 25_557_032


def load_runs(paths: list[str]) -> list[dict]:
    runs = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        runs += data["runs"] if "runs" in data else [data]
    return runs


def model_seconds(model: str, n: int, m: int, link: Link) -> float:
    if model == "fp32_best":
        return min(cm.predict(a, n, m, link) for a in cm.FP32_ALLREDUCES)
    return cm.predict(model, n, m, link)


def check(runs: list[dict], out=sys.stdout) -> list[dict]:
    """Measured vs predicted for every modelled case; prints a table per run, returns rows.

    Two predictions: with the link of the 0-1 ping-pong, and with the link measured under load
    (every pair of ranks at once, every rank computing at once), which is what ranks that share
    cores and memory (one machine) or a CPU-bound TCP stack see.
    """
    rows = []
    for run in runs:
        m = run["ranks"]
        links = {"pair": Link(**run["link"])}
        if "link_loaded" in run:
            links["loaded"] = Link(**run["link_loaded"])
        desc = "; ".join(f"{k}: alpha {1e6 * v.alpha:.1f} us, {v.gbit_per_s:.2f} Gbit/s, gamma "
                         f"{1e12 * v.gamma:.0f} ps/B" for k, v in links.items())
        print(f"\n## Model check: M = {m}, {run.get('label') or 'local'} ({desc})", file=out)
        print(f"{'case':36s}{'n':>12s}{'measured ms':>13s}"
              + "".join(f"{k + ' ms':>11s}{'error':>8s}" for k in links), file=out)
        for r in run["results"]:
            if not r.get("model"):
                continue
            pred = {k: model_seconds(r["model"], r["n"], m, v) for k, v in links.items()}
            err = {k: p / r["best_s"] - 1 for k, p in pred.items()}
            rows.append(dict(label=run.get("label"), ranks=m, n=r["n"], key=r["key"],
                             model=r["model"], measured_s=r["best_s"], predicted_s=pred,
                             error=err))
            print(f"{r['name']:36s}{r['n']:12,d}{1e3 * r['best_s']:13.2f}"
                  + "".join(f"{1e3 * pred[k]:11.2f}{100 * err[k]:7.0f}%" for k in links),
                  file=out)
    if rows:
        print("\n## Model error by case: median |predicted/measured - 1| over sizes and M",
              file=out)
        by: dict[tuple, list] = {}
        for r in rows:
            by.setdefault((r["label"], r["key"]), []).append(r["error"])
        print(f"{'':20s}{'case':16s}{'pair link':>10s}{'loaded':>10s}", file=out)
        for (label, key), errs in by.items():
            cells = "".join(
                f"{100 * float(np.median([abs(e[k]) for e in errs if k in e])):9.0f}%"
                if any(k in e for e in errs) else f"{'':10s}" for k in ("pair", "loaded"))
            print(f"{label or 'local':20s}{key:16s}{cells}", file=out)
    return rows


def agreement(runs: list[dict], out=sys.stdout) -> list[dict]:
    """Does ``choose`` (with each run's measured link) pick the topology that measured fastest?"""
    print("\n## choose() against the fastest measured topology (pair link / loaded link)",
          file=out)
    print(f"{'run':20s}{'M':>3s}{'n':>12s}{'measured best':>15s}{'choose':>11s}{'loaded':>11s}"
          f"{'chosen/best':>13s}", file=out)
    rows = []
    for run in runs:
        m = run["ranks"]
        for n in sorted({r["n"] for r in run["results"]}):
            votes = {r["key"]: r["best_s"] for r in run["results"]
                     if r["n"] == n and r["kind"] == "vote"}
            if not votes:
                continue
            best = min(votes, key=votes.get)
            pick = cm.choose(n, m, Link(**run["link"]))
            pick_loaded = cm.choose(n, m, Link(**run.get("link_loaded", run["link"])))
            rows.append(dict(label=run.get("label"), ranks=m, n=n, best=best, choose=pick,
                             choose_loaded=pick_loaded, slowdown=votes[pick] / votes[best]))
            print(f"{run.get('label') or 'local':20s}{m:3d}{n:12,d}{best:>15s}{pick:>11s}"
                  f"{pick_loaded:>11s}{votes[pick] / votes[best]:13.2f}", file=out)
    return rows


def predictions(n: int, ranks: list[int], link: Link, title: str, out=sys.stdout) -> list[dict]:
    """The model's table for large M: seconds of every topology and fp32 allreduce."""
    algos = list(cm.TOPOLOGIES) + ["ring_allreduce", "rabenseifner_allreduce"]
    print(f"\n## Predicted ms per step, n = {n:,} (ResNet-50), {title}", file=out)
    print(f"{'M':>6s}" + "".join(f"{a.replace('_allreduce', ' fp32'):>14s}" for a in algos)
          + f"{'choose':>11s}{'vote/fp32':>11s}", file=out)
    rows = []
    for m in ranks:
        t = {a: cm.predict(a, n, m, link) for a in algos}
        pick = cm.choose(n, m, link)
        fp32 = min(t["ring_allreduce"], t["rabenseifner_allreduce"])
        rows.append(dict(ranks=m, seconds=t, choose=pick, vote_over_fp32=t[pick] / fp32))
        print(f"{m:6d}" + "".join(f"{1e3 * t[a]:14.2f}" for a in algos)
              + f"{pick:>11s}{t[pick] / fp32:11.4f}", file=out)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("json", nargs="*", help="outputs of bench_collectives / run_collectives")
    ap.add_argument("--n", type=int, default=RESNET50, help="coordinates (default ResNet-50)")
    ap.add_argument("--gbit", type=float, default=100.0, help="link Gbit/s (default 100)")
    ap.add_argument("--alpha", type=float, default=1.5e-6, help="latency s (default 1.5e-6)")
    ap.add_argument("--gamma", type=float,
                    help="s per byte of a local pass (default: 0, and the least measured)")
    ap.add_argument("--ranks", default="16,32,64,128,256,512,1024")
    ap.add_argument("--out", help="write the check and the predictions as JSON")
    args = ap.parse_args()

    runs = load_runs(args.json)
    checked = check(runs)
    agreed = agreement(runs) if runs else []
    # The fastest pass any run measured: one rank computing alone, as on a node per rank.
    measured_gamma = min(r["link"]["gamma"] for r in runs) if runs else 0.0
    gammas = [args.gamma] if args.gamma is not None else [0.0] + [measured_gamma] * bool(runs)
    ranks = [int(x) for x in args.ranks.split(",")]
    tables = []
    for gamma in gammas:
        link = Link.from_bandwidth(args.gbit, alpha=args.alpha, gamma=gamma)
        what = ("compute free (gamma = 0: GPU kernels)" if gamma == 0 else
                f"gamma {1e12 * gamma:.0f} ps/B (this machine's numpy tally, one core a rank)")
        title = f"{args.gbit:g} Gbit/s, alpha {1e6 * args.alpha:g} us, {what}"
        tables.append(dict(link=link.as_dict(), title=title,
                           rows=predictions(args.n, ranks, link, title)))
    if args.out:
        Path(args.out).write_text(json.dumps(dict(check=checked, choose=agreed,
                                                  predictions=tables), indent=1))


if __name__ == "__main__":
    main()
