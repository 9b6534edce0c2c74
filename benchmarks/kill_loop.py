"""Issue 31's kill loop: does every elastic job whose rank is killed from outside end?

    python benchmarks/kill_loop.py --runs 50 --out runs/kill_loop

Each run launches ``python -m mpisign.launch -n 5 --elastic`` of this script's ``job``: a
``Signum(elastic=True)`` (server vote unless ``--topology``) on a small model and random data,
``--steps`` steps, with a progress line every 10 steps from every rank. The driver picks a victim
rank and a step at random, SIGKILLs the victim by PID (from outside, as an operator or the
kernel's OOM killer would) when it reports that step, then times the rest:

* every survivor must finish every step and say so (``done``);
* the launcher must exit within ``--exit-limit`` seconds of the last survivor's ``done``.

A run that breaks either rule is a failure. When the exit takes longer than ``--exit-limit``,
the native stacks (``gdb``, every thread; the Python ones too where ``py-spy`` is installed) of
the survivors, the launcher and everything below it are written to ``--out`` for the cause, and
the job is left to the exit watchdog (``$MPISIGN_EXIT_TIMEOUT``, :mod:`mpisign.mpi.shutdown`:
the package's default unless ``--exit-timeout`` is given) up to ``--run-limit``. A run the
watchdog had to end counts as passed only with ``--count-watchdog``.
The summary, on the last line: ``N of M runs passed in a row`` and the exit times.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from mpirun import descendants  # noqa: E402  (every process below the launcher, from /proc)
PID = re.compile(r"@pid rank=(\d+) pid=(\d+)")
STEP = re.compile(r"@step rank=(\d+) step=(\d+)")
DONE = re.compile(r"@done rank=(\d+)")


def job(args) -> None:
    import torch
    from mpi4py import MPI

    import mpisign

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    print(f"@pid rank={rank} pid={os.getpid()}", flush=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                torch.nn.Linear(128, 10))
    opt = mpisign.Signum(model.parameters(), lr=1e-3, momentum=0.9, comm=comm,
                         topology=args.topology, elastic=True, timeout=60)
    data = torch.Generator().manual_seed(rank)
    for step in range(args.steps):
        opt.zero_grad()
        x = torch.randn(32, 64, generator=data)
        torch.nn.functional.cross_entropy(model(x), torch.randint(0, 10, (32,),
                                                                  generator=data)).backward()
        opt.step()
        if step % 10 == 0:
            print(f"@step rank={rank} step={step}", flush=True)
            if args.pace:
                time.sleep(args.pace)
    opt.check_consistency()
    print(f"@done rank={rank} lost={opt.stats.lost_ranks}", flush=True)


def stacks(pid: int) -> str:
    """Every thread's native stack (gdb) and, where py-spy is installed, the Python stack."""
    out = []
    for cmd in (["gdb", "-p", str(pid), "-batch", "-ex", "thread apply all bt"],
                ["py-spy", "dump", "--pid", str(pid)]):
        try:
            out.append(subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout)
        except (OSError, subprocess.TimeoutExpired) as e:
            out.append(f"{cmd[0]}: {e}")
    return "\n".join(out)


def one_run(i: int, args, rng: random.Random) -> dict:
    victim = rng.randrange(args.ranks) if not args.no_kill else -1
    at = rng.randrange(2, args.steps // 10 - 2) * 10
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.exit_timeout:
        env["MPISIGN_EXIT_TIMEOUT"] = str(args.exit_timeout)
    cmd = [sys.executable, "-m", "mpisign.launch", "-n", str(args.ranks), "--elastic", "--",
           "python", __file__, "job", "--steps", str(args.steps), "--topology", args.topology,
           "--pace", str(args.pace)]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    pids, done, lines = {}, {}, []
    killed_at = None

    def read():
        nonlocal killed_at
        for line in proc.stdout:
            lines.append(line)
            if m := PID.search(line):
                pids[int(m[1])] = int(m[2])
            elif (m := STEP.search(line)) and killed_at is None:
                if int(m[1]) == victim and int(m[2]) >= at and victim in pids:
                    os.kill(pids[victim], signal.SIGKILL)
                    killed_at = time.monotonic()
            elif m := DONE.search(line):
                done[int(m[1])] = time.monotonic()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    survivors = set(range(args.ranks)) - {victim}
    deadline = start + args.run_limit
    dump = None
    while proc.poll() is None and time.monotonic() < deadline:
        if dump is None and survivors <= set(done) and \
                time.monotonic() - max(done.values()) > args.exit_limit:
            # Slow to exit: every process's stacks, once (the launcher's too), for the cause;
            # then the job is left to the exit watchdog, up to --run-limit.
            dump = Path(args.out) / f"run{i:03d}-stacks.txt"
            procs = {f"rank {r}": pids[r] for r in sorted(survivors) if r in pids}
            procs["launcher"] = proc.pid
            procs.update({f"below the launcher {pid}": pid for pid in descendants(proc.pid)
                          if pid not in procs.values()})
            dump.write_text("\n".join(f"===== {name} pid {pid} =====\n{stacks(pid)}"
                                      for name, pid in procs.items()))
        time.sleep(0.1)
    ended = proc.poll() is not None
    ended_at = time.monotonic()
    if not ended:   # a hang even the watchdog did not end
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in descendants(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
    reader.join(timeout=5)
    text = "".join(lines)
    watchdog = "MPI_Finalize did not return" in text
    exit_s = ended_at - max(done.values()) if survivors <= set(done) else None
    passed = ended and survivors <= set(done) and proc.returncode == 0 and \
        (not watchdog or args.count_watchdog) and dump is None
    if not passed:
        (Path(args.out) / f"run{i:03d}-log.txt").write_text(text)
    return dict(run=i, victim=victim, at=at, killed=killed_at is not None, ended=ended,
                returncode=proc.returncode, survivors_done=sorted(done), watchdog=watchdog,
                exit_s=None if exit_s is None else round(exit_s, 2), passed=passed,
                stacks=None if dump is None else str(dump))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what")
    j = sub.add_parser("job")
    j.add_argument("--steps", type=int, default=600)
    j.add_argument("--topology", default="server")
    j.add_argument("--pace", type=float, default=0.0)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--ranks", type=int, default=5)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--topology", default="server")
    p.add_argument("--pace", type=float, default=0.0,
                   help="seconds each rank sleeps every 10 steps (spreads the kill steps)")
    p.add_argument("--exit-limit", type=float, default=20.0,
                   help="seconds the launcher may take to exit after the last survivor's done")
    p.add_argument("--run-limit", type=float, default=300.0)
    p.add_argument("--exit-timeout", type=float, default=None,
                   help="$MPISIGN_EXIT_TIMEOUT for the ranks (default: the package's)")
    p.add_argument("--count-watchdog", action="store_true")
    p.add_argument("--no-kill", action="store_true",
                   help="kill no rank: the exit time of a job that loses none, to compare")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/kill_loop")
    args = p.parse_args(argv)
    if args.what == "job":
        return job(args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    results, streak = [], 0
    for i in range(args.runs):
        r = one_run(i, args, rng)
        results.append(r)
        streak = streak + 1 if r["passed"] else 0
        print(json.dumps(r), flush=True)
        (Path(args.out) / "results.json").write_text(json.dumps(results, indent=1))
    passed = sum(r["passed"] for r in results)
    times = sorted(r["exit_s"] for r in results if r["exit_s"] is not None)
    print(f"{passed} of {len(results)} runs passed ({streak} in a row at the end); exit after "
          f"the last survivor's done: median {times[len(times) // 2] if times else 'n/a'} s, "
          f"max {times[-1] if times else 'n/a'} s; watchdog needed in "
          f"{sum(r['watchdog'] for r in results)}")


if __name__ == "__main__":
    main()
