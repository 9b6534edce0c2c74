"""Does a large message move while its sender computes? A diagnosis for the quorum vote's late
ranks (README, "Over TCP, give Open MPI a progress thread"), on 2 ranks.

    sudo PATH=$PWD/.venv/bin:$PATH benchmarks/netns_cluster.sh run -n 2 -- bash -c \\
        'python benchmarks/tcp_progress.py --mpirun "$NETNS_MPIRUN -n 2"'

Rank 0 posts an ``Isend`` and stays out of MPI for ``--away`` seconds (a forward and backward
pass); rank 1 prints when its ``Recv`` returned. Each size runs twice: as Open MPI is set up, and
with ``OMPI_MCA_btl_tcp_progress_thread=100``. Over TCP without the thread, a message past the
eager limit (64 KiB) arrives only when the sender calls MPI again.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time

SIZES = (4096, 1 << 20)


def probe(away: float) -> None:
    """One rank's part (under mpirun)."""
    import numpy as np
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    for nbytes in SIZES:
        buf = np.ones(nbytes // 8, dtype=np.uint64)
        comm.Barrier()
        t0 = time.monotonic()
        if comm.Get_rank() == 0:
            request = comm.Isend(buf, dest=1, tag=7)
            time.sleep(away)   # computing, out of MPI
            request.Wait()
        else:
            comm.Recv(buf, source=0, tag=7)
            print(f"  {nbytes:8d} bytes arrived after {time.monotonic() - t0:.3f} s", flush=True)
        comm.Barrier()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mpirun", required=True, help="a launcher of 2 ranks")
    ap.add_argument("--away", type=float, default=1.0, help="seconds the sender stays away")
    ap.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rank:
        probe(args.away)
        return 0
    for thread in (None, "100"):
        env = dict(os.environ)
        if thread is not None:
            env["OMPI_MCA_btl_tcp_progress_thread"] = thread
        print(f"btl_tcp_progress_thread={thread or 'unset'}", flush=True)
        cmd = [*shlex.split(os.path.expandvars(args.mpirun)), sys.executable, __file__,
               "--rank", "--mpirun", "-", "--away", str(args.away)]
        subprocess.run(cmd, env=env, check=True, timeout=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
