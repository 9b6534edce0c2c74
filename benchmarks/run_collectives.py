"""Run the collective benchmark at M = 2, 3, 4, 8 ranks and merge the runs into one JSON file.

    python benchmarks/run_collectives.py --json bench-results/collectives_shm.json
    python benchmarks/run_collectives.py --ranks 4 --sizes 25.6M          # one point
    # On the emulated 1 Gbit/s cluster (root; namespaces made and removed by the script):
    benchmarks/netns_cluster.sh run -n 8 -r 1gbit -- python benchmarks/run_collectives.py \\
        --mpirun '$NETNS_MPIRUN' --label 'netns 1gbit' --json bench-results/collectives_1gbit.json

Each M is one launch of benchmarks/bench_collectives.py (its table streams through), with Open
MPI's PML monitoring on so that MPI's collectives' bytes are counted, not only computed. At the
end: the issue's targets (vote / best fp32 allreduce at 25.6M coordinates, sharded bytes per
rank against M). ``python benchmarks/cost_table.py FILE...`` checks the cost model against the
same JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mpisign.launch import local_env, mpiexec_command  # noqa: E402

BENCH = ROOT / "benchmarks" / "bench_collectives.py"
RESNET50 = 25_557_032


def launch(m: int, bench_args: list[str], mpirun: str | None, monitor: bool, timeout: float):
    """Run the benchmark on ``m`` ranks; returns the run's dict (None if it failed)."""
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"mpisign_collectives_{os.getpid()}_{m}.json"
    out.unlink(missing_ok=True)
    program = [str(BENCH), *bench_args, "--json", str(out)]
    env = local_env()
    if monitor:
        env["OMPI_MCA_pml_monitoring_enable"] = "1"  # exact bytes of MPI's own collectives
    if mpirun:
        cmd = [*shlex.split(os.path.expandvars(mpirun)), "-n", str(m), sys.executable, "-m",
               "mpi4py", *program]
    else:
        cmd = mpiexec_command(m, ["python", *program])
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    try:
        rc = subprocess.call(cmd, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"# M = {m}: timed out after {timeout:g} s", file=sys.stderr)
        return None
    if rc != 0 or not out.exists():
        print(f"# M = {m}: failed (exit {rc})", file=sys.stderr)
        return None
    run = json.loads(out.read_text())
    out.unlink()
    return run


def targets(runs: list[dict], file=sys.stdout) -> None:
    """The issue's targets, from the merged runs."""
    print("\n## Targets", file=file)
    for run in runs:
        rows = [r for r in run["results"] if r["n"] == RESNET50]
        if not rows:
            continue
        vote = min((r for r in rows if r["kind"] == "vote"), key=lambda r: r["best_s"])
        fp32 = min((r for r in rows if r["kind"] == "fp32"), key=lambda r: r["best_s"])
        ratio = vote["best_s"] / fp32["best_s"]
        print(f"M = {run['ranks']}, n = {RESNET50:,} ({run.get('label') or 'local'}): best vote "
              f"{vote['name']} {1e3 * vote['best_s']:.1f} ms / best fp32 {fp32['name']} "
              f"{1e3 * fp32['best_s']:.1f} ms = {ratio:.4f} (1/{1 / ratio:.1f})", file=file)
    sizes = sorted({r["n"] for run in runs for r in run["results"]})
    print("\nsharded: bytes sent by the busiest rank, MB (counted), by M:", file=file)
    print(f"{'n':>12s}" + "".join(f"{'M=' + str(run['ranks']):>9s}" for run in runs), file=file)
    for n in sizes:
        cells = []
        for run in runs:
            row = next((r for r in run["results"] if r["n"] == n and r["key"] == "sharded"), None)
            cells.append(f"{max(row['sent']) / 1e6:9.3f}" if row else f"{'':9s}")
        print(f"{n:12,d}" + "".join(cells), file=file)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", default="2,3,4,8", help="comma-separated M (default 2,3,4,8)")
    ap.add_argument("--sizes", help="passed on: 1M,11.7M,25.6M (default) or numbers")
    ap.add_argument("--repeat", type=int, help="passed on (default 5)")
    ap.add_argument("--vote-repeat", type=int, help="passed on (default 10)")
    ap.add_argument("--variants", action="store_true", help="passed on: experimental schedules")
    ap.add_argument("--no-gloo", action="store_true", help="passed on")
    ap.add_argument("--label", default="shared memory", help="what the runs are (in the JSON)")
    ap.add_argument("--mpirun", help="launcher taking '-n M PROGRAM...' instead of the local "
                    "mpiexec, e.g. '$NETNS_MPIRUN' (environment variables are expanded)")
    ap.add_argument("--no-monitor", action="store_true",
                    help="leave Open MPI's PML monitoring off (MPI bytes from formulas)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per M (default 1800)")
    ap.add_argument("--json", help="merged output (default: print only)")
    args = ap.parse_args()
    ranks = [int(x) for x in args.ranks.split(",")]
    if any(m < 2 for m in ranks):
        ap.error("every M in --ranks must be >= 2")

    bench_args = ["--label", args.label]
    for flag, value in (("--sizes", args.sizes), ("--repeat", args.repeat),
                        ("--vote-repeat", args.vote_repeat)):
        if value is not None:
            bench_args += [flag, str(value)]
    bench_args += ["--variants"] * args.variants + ["--no-gloo"] * args.no_gloo

    runs = []
    for m in ranks:
        run = launch(m, bench_args, args.mpirun, not args.no_monitor, args.timeout)
        if run is not None:
            runs.append(run)
    if not runs:
        raise SystemExit("no run finished")
    targets(runs)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"label": args.label, "runs": runs}, indent=1))
        print(f"\nwrote {args.json}", file=sys.stderr)
    if len(runs) < len(ranks):
        raise SystemExit(f"{len(ranks) - len(runs)} of {len(ranks)} runs failed")


if __name__ == "__main__":
    main()
