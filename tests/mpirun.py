"""Launch real MPI ranks for a test, always under a timeout.

``run(n, script, *args)`` starts ``mpiexec -n n python -m mpi4py script args`` (``-m mpi4py``
turns an exception on any rank into ``MPI_Abort`` of the whole job, never a hang) with the
environment that oversubscribed ranks need on a small machine. Scripts report progress as
``@progress rank=R step=S`` lines and name their cases with ``@case rank=R NAME`` (and
``@failed rank=R NAME: error``, see ``tests/mpi/common.py``); a job that fails or outlives its
timeout (then killed) fails the test with the cases that failed and each rank's last case and
step first, so the report says which case broke and where. A launch that the launcher itself
could not start (no rank ran; see :data:`LAUNCH_FAILURES`) is tried once more, and so is an
elastic launch that Open MPI itself aborted in a known bug of its own (see
:data:`OPEN_MPI_ABORTS`); the second try must pass.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from mpisign.launch import find_mpiexec, local_env, mpiexec_command  # noqa: F401 (re-export)

HERE = Path(__file__).parent
SCRIPTS = HERE / "mpi"
PROGRESS = re.compile(r"@progress rank=(\d+) step=(\S+)")
CASE = re.compile(r"@case rank=(\d+) (.+)")
FAILED = re.compile(r"@failed rank=(\d+) (.+)")


mpiexec = find_mpiexec  # the launcher's own lookup, under the name the tests use


def mpi_env(extra: dict | None = None) -> dict:
    """mpisign.launch's environment for local ranks, plus what the test scripts need."""
    env = local_env()
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), str(SCRIPTS),
                                         env.get("PYTHONPATH", "")])
    env.setdefault("MPISIGN_TIMEOUT", "60")
    if extra:
        env.update(extra)
    return env


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), children first."""
    parents: dict = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher's session and every process below it: Open MPI's ranks are not
    in the launcher's process group, and a killed launcher leaves them running (a rank that
    sleeps on purpose lived on for an hour, 720 MB each)."""
    below = descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in below:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run(n: int, script: str, *args: str, timeout: float = 180, env: dict | None = None,
        expect_fail: bool = False, elastic: bool = False) -> str:
    """Run ``script`` (a file under tests/mpi/) on ``n`` ranks; return its output.
    ``elastic``: with Open MPI's fault tolerance on (``--with-ft ulfm``).

    Fails the test if the job does not end in ``timeout`` seconds (naming each rank's last
    step), or if it exits non-zero (unless ``expect_fail``).
    """
    cmd = mpiexec_command(n, [sys.executable, str(SCRIPTS / script), *args], elastic=elastic)
    for attempt in (1, 2):
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=mpi_env(env), start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_job(proc)
            out, _ = proc.communicate()
            raise AssertionError(f"{script} on {n} ranks stalled: killed after {timeout:g} s; "
                                 f"{failed_cases(out)}{stall_report(out, n)}\n"
                                 f"--- output tail ---\n{out[-3000:]}")
        if proc.returncode == 0 or attempt == 2:
            break
        if launch_failed(out):
            print(f"{script} on {n} ranks: the launcher could not start the job, once more:\n"
                  f"{out[-600:]}", file=sys.stderr)
        elif elastic and open_mpi_aborted(out):
            print(f"{script} on {n} ranks: Open MPI aborted the job in its known libnbc bug "
                  f"(see tests/mpirun.py's OPEN_MPI_ABORTS), once more:\n{out[-1200:]}",
                  file=sys.stderr)
        else:
            break
    if expect_fail:
        if proc.returncode == 0:
            raise AssertionError(f"{script} on {n} ranks was expected to fail but exited 0:\n"
                                 f"{out[-3000:]}")
    elif proc.returncode != 0:
        raise AssertionError(f"{script} on {n} ranks exited {proc.returncode}; "
                             f"{failed_cases(out)}{stall_report(out, n)}\n"
                             f"--- output tail ---\n{out[-6000:]}")
    return out


#: What Open MPI's launcher prints when it could not start a job at all (seen once in 700
#: launches on this machine, under load): a fault of the machine, not of the test under it.
LAUNCH_FAILURES = ("PMIx server's listener thread failed to start",)


def launch_failed(out: str) -> bool:
    """The launcher failed before any rank ran: no rank reported, and it said why."""
    return (not PROGRESS.search(out) and not CASE.search(out)
            and any(message in out for message in LAUNCH_FAILURES))


#: Open MPI 5.0's own fatal errors after a rank died under ULFM, which no caller can handle:
#: libnbc, when one round of a nonblocking collective meets the dead peer, aborts the schedule
#: and frees its other requests of that round while they are still pending (open-mpi/ompi#2245
#: describes this error path); when one of them then fails (its peer dead, or the
#: communicator revoked by the recovery), ob1 calls MPI_ERRORS_ARE_FATAL directly, "on a NULL
#: communicator". Seen in about 1 of 24 loaded runs of the elastic test that kills rank 0
#: before the first step's communicator duplicate (whose CID allocation is such an
#: iallreduce); never in a run that got past it.
OPEN_MPI_ABORTS = ("Send error after request freed",)


def open_mpi_aborted(out: str) -> bool:
    return any(message in out for message in OPEN_MPI_ABORTS)


def failed_cases(out: str) -> str:
    """'failed: rank 1 sharded float32 n=65: AssertionError: ...; ' for each ``@failed`` line."""
    failed = [f"rank {m.group(1)} {m.group(2)}" for m in FAILED.finditer(out)]
    return f"failed: {'; '.join(failed)}; " if failed else ""


def stall_report(out: str, n: int) -> str:
    """Each rank's last ``@progress`` step and ``@case``, e.g. 'rank 0 at step 3 (in case
    tree float16 n=65), rank 1 never reported'."""
    last: dict[int, str] = {}
    for m in PROGRESS.finditer(out):
        last[int(m.group(1))] = m.group(2)
    cases = {int(m.group(1)): m.group(2) for m in CASE.finditer(out)}
    return ", ".join((f"rank {r} at step {last[r]}" if r in last else f"rank {r} never reported")
                     + (f" (in case {cases[r]})" if r in cases else "") for r in range(n))
