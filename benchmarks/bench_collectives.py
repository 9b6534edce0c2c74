"""The majority-vote collectives against fp32 allreduce and the peers' ways of sending signs.

    python -m mpisign.launch -n 4 -- python benchmarks/bench_collectives.py [--sizes 1M,25.6M]
        [--repeat 5] [--json out.json] [--no-gloo]
    python benchmarks/run_collectives.py      # M = 2, 3, 4, 8 and one merged table (the driver)

In one run, on the same vector sizes (default 1M, ResNet-18's 11.7M and ResNet-50's 25.6M):

* ``mpisign <topology>``: ``make_vote(topology).vote(words, n)`` on packed signs, tally included;
* ``MPI_Allreduce fp32``: the library's default algorithm on COMM_WORLD, and Open MPI's ring
  (coll/tuned algorithm 4, forced on a duplicate communicator through MPI_T: see ompi_tool.py);
* ``gloo all_reduce fp32``: torch.distributed over TCP (127.0.0.1, or $GLOO_SOCKET_IFNAME);
* ``GRACE 8-bit allgather``: one byte a sign, MPI_Allgather, local count (as GRACE's signSGD);
* ``authors' bcast gather``: the paper's code: each worker's packed signs reach rank 0 by a
  broadcast in a 2-rank group, one worker after another, rank 0 takes the majority and
  broadcasts it (here without the authors' extra barriers);
* ``local pack`` / ``local apply``: pack_signs of the fp32 gradient and apply_signs of a vote,
  the local work a vote adds around the collective.

On several nodes (``$MPISIGN_NODE``, as ``netns_cluster.sh mpirun -p R`` sets it, or shared
memory), ``between MB`` is what the busiest node sent to other nodes: every vote counts it
(``SignVote.count_nodes``); for MPI's collectives the PML's per-peer counts give it.

Each figure is the slowest rank's time of one call (barrier first), best and median of
``--repeat`` after a warm-up; ``x fp32`` divides the best time by the best fp32 allreduce of the
same run. Bytes per rank (largest over ranks): mpisign's own counters for the votes (and checked
against :func:`mpisign.collectives.costmodel.traffic`); for MPI's collectives the PML's count when Open MPI
runs with ``OMPI_MCA_pml_monitoring_enable=1`` (the driver sets it), else the textbook formula;
gloo: the ring formula. Every vote's result is checked bit-identical to the server's.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import socket
import struct
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from mpi4py import MPI  # noqa: E402

from mpisign.collectives import costmodel  # noqa: E402
from mpisign.backends import packing
from mpisign.mpi.nodes import discover  # noqa: E402
from mpisign.collectives import TOPOLOGIES, make_vote  # noqa: E402
import ompi_tool  # noqa: E402
from vote_variants import (BlockingWaitShardedVote, ConcurrentGatherShardedVote,  # noqa: E402
                           PairwiseShardedVote)

SIZES = {"1M": 1_000_000, "11.7M": 11_689_512, "25.6M": 25_557_032}  # ResNet-18, ResNet-50


def parse_size(text: str) -> int:
    text = text.strip()
    if text in SIZES:
        return SIZES[text]
    scale = {"K": 1e3, "M": 1e6, "G": 1e9}.get(text[-1:].upper())
    value = float(text[:-1]) * scale if scale else float(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"a size must be >= 1 coordinate, got {text!r}")
    return int(value)


# -- timing -------------------------------------------------------------------------------------

def timed(comm, op, repeat: int) -> list[float]:
    """The slowest rank's seconds for each of ``repeat`` calls of ``op`` (after one warm-up)."""
    op()
    times = []
    for _ in range(repeat):
        comm.Barrier()
        t = time.perf_counter()
        op()
        dt = time.perf_counter() - t
        times.append(comm.allreduce(dt, op=MPI.MAX))
    return times


def per_rank(comm, sent: int, received: int) -> tuple[list[int], list[int]]:
    rows = comm.allgather((int(sent), int(received)))
    return [s for s, _ in rows], [r for _, r in rows]


def node_bytes(comm, nodes, sent_between: int) -> int:
    """The most bytes one node sent to other nodes, from each rank's count."""
    per_rank = comm.allgather(int(sent_between))
    return max(sum(per_rank[r] for r in members) for members in nodes.members)


def pml_bytes(comm, monitor, op, nodes=None) -> tuple | None:
    """Bytes each rank sent and received in one call of ``op``, as Open MPI's PML counted them,
    and on several ``nodes`` the most bytes a node sent to other nodes (else None)."""
    if monitor is None:
        return None
    comm.Barrier()
    before = monitor.read()
    op()
    delta = monitor.read() - before
    matrix = np.array(comm.allgather(delta))  # row i: what rank i sent to each world rank
    world = comm.Get_group().Translate_ranks(list(range(comm.Get_size())),
                                             MPI.COMM_WORLD.Get_group())
    matrix = matrix[:, world]
    comm.Barrier()
    between = None
    if nodes is not None and len(nodes) > 1:
        of = np.array(nodes.node_of)
        between = max(int(matrix[np.ix_(of == i, of != i)].sum()) for i in range(len(nodes)))
    return matrix.sum(axis=1).tolist(), matrix.sum(axis=0).tolist(), between


# -- torch.distributed (gloo) -----------------------------------------------------------------

def _iface_address(name: str) -> str:
    """IPv4 address of network interface ``name`` (SIOCGIFADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
    return socket.inet_ntoa(packed[20:24])


def init_gloo(comm):
    """A gloo process group over the ranks of ``comm``, or None (reason printed by rank 0)."""
    import torch.distributed as dist
    addr, port, err = None, None, None
    if comm.rank == 0:
        try:
            iface = os.environ.get("GLOO_SOCKET_IFNAME")
            addr = _iface_address(iface) if iface else "127.0.0.1"
            with socket.socket() as s:  # a free port, handed to the other ranks
                s.bind((addr, 0))
                port = s.getsockname()[1]
        except OSError as e:
            err = f"no address for gloo: {e}"
    addr, port, err = comm.bcast((addr, port, err), root=0)
    if err is None:
        try:
            dist.init_process_group("gloo", init_method=f"tcp://{addr}:{port}",
                                    rank=comm.rank, world_size=comm.size)
        except Exception as e:  # noqa: BLE001 - report and go on without gloo
            err = f"gloo init failed: {e}"
    if not comm.allreduce(err is None, op=MPI.LAND):
        if comm.rank == 0:
            print(f"# gloo skipped: {err}", file=sys.stderr)
        return None
    return dist


# -- the cases ----------------------------------------------------------------------------------

class Cases:
    """Every way of combining the ranks' gradients or signs, over one vector size."""

    def __init__(self, comm, n: int, ring, gloo, pairs):
        self.comm, self.n, self.ring, self.gloo, self.pairs = comm, n, ring, gloo, pairs
        self.m, self.rank = comm.Get_size(), comm.Get_rank()
        gen = torch.Generator().manual_seed(1234 + self.rank)
        self.grad = torch.randn(n, generator=gen)
        self.x = self.grad.numpy()
        self.y = np.empty_like(self.x)
        self.gloo_buf = self.grad.clone()
        self.words = packing.pack_signs(self.grad)
        self.signs8 = (self.grad > 0).numpy().view(np.uint8)
        self.k = 2 if self.m % 2 == 0 else 1

    # fp32 baselines
    def mpi_default(self):
        self.comm.Allreduce(self.x, self.y, op=MPI.SUM)

    def ompi_ring(self):
        self.ring.Allreduce(self.x, self.y, op=MPI.SUM)

    def gloo_allreduce(self):
        self.gloo.all_reduce(self.gloo_buf)

    # peers' ways of moving signs
    def grace8(self):
        if not hasattr(self, "gathered8"):
            self.gathered8 = np.empty((self.m, self.n), dtype=np.uint8)
        self.comm.Allgather(self.signs8, self.gathered8)
        count = self.gathered8.sum(axis=0, dtype=np.uint8 if self.m < 256 else np.uint16)
        self.grace_plus = count > self.m // 2
        self.grace_tie = (count == self.m // 2) if self.m % 2 == 0 else None

    def bcast_gather(self):
        w = self.words.size
        if not hasattr(self, "bg_result"):
            self.bg_result = np.empty((self.k, w), dtype=np.uint64)
            self.bg_rows = np.empty((self.m, w), dtype=np.uint64) if self.rank == 0 else None
        if self.rank == 0:
            for i in range(1, self.m):  # one worker after another, as the authors' loop
                self.pairs[i].Bcast(self.bg_rows[i], root=1)
            self.bg_rows[0] = self.words
            plus, tie = packing.majority(packing.tally(self.bg_rows), self.m, self.n)
            self.bg_result[0] = plus
            if tie is not None:
                self.bg_result[1] = tie
        else:
            self.pairs[self.rank].Bcast(self.words, root=1)
        self.comm.Bcast(self.bg_result, root=0)

    # local work around a vote
    def pack(self):
        if not hasattr(self, "pack_out"):
            self.pack_out = np.empty_like(self.words)
            self.pack_scratch = torch.empty(self.n, dtype=torch.bool)
        packing.pack_signs(self.grad, 0, out=self.pack_out, scratch=self.pack_scratch)

    def apply(self):
        if not hasattr(self, "param"):
            self.param = torch.zeros(self.n)
            self.apply_scratch = {}
        packing.apply_signs(self.param, self.ref_plus, self.ref_tie, 1e-3,
                            scratch=self.apply_scratch)


def check_identical(comm, cases: Cases, results: dict) -> bool:
    """Every vote equals the server's on every rank; so do GRACE's and the authors' results."""
    plus, tie = results["server"]
    ok = True
    for key, (p, t) in results.items():
        ok &= np.array_equal(p, plus) and ((t is None and tie is None) or np.array_equal(t, tie))
    nbytes = (cases.n + 7) // 8
    ok &= np.array_equal(np.packbits(cases.grace_plus, bitorder="little"),
                         plus.view(np.uint8)[:nbytes])
    if tie is not None:
        ok &= np.array_equal(np.packbits(cases.grace_tie, bitorder="little"),
                             tie.view(np.uint8)[:nbytes])
    ok &= np.array_equal(cases.bg_result[0], plus)
    digest = hashlib.sha256(plus.tobytes()).digest()
    ok &= digest == comm.bcast(digest, root=0)
    return bool(comm.allreduce(bool(ok), op=MPI.LAND))


def run_size(comm, n: int, args, ring, gloo, pairs, monitor, nodes) -> tuple[list[dict], bool]:
    m = comm.Get_size()
    cases = Cases(comm, n, ring, gloo, pairs)
    rows, results = [], {}

    def record(key, name, kind, model, times, sent=None, received=None, source=None,
               between=None):
        rows.append(dict(n=n, key=key, name=name, kind=kind, model=model, times_s=times,
                         best_s=min(times), median_s=float(np.median(times)), sent=sent,
                         received=received, bytes_source=source, between_node_bytes=between))

    def mpi_bytes(op, model):
        measured = pml_bytes(comm, monitor, op, nodes)
        if measured is not None:
            sent, received, between = measured
            return sent, received, "pml", between
        formula = costmodel.traffic(model, n, m)
        return [s for s, _ in formula], [r for _, r in formula], "formula"

    # The cost model's figures need the nodes as consecutive ranks (netns_cluster.sh's -p).
    sizes = nodes.sizes if list(nodes.node_of) == sorted(nodes.node_of) else None

    # The votes, each with its own counters, checked against the model's byte counts.
    votes = {t: (lambda t=t: make_vote(t, comm)) for t in sorted(TOPOLOGIES)}
    if args.variants:
        votes["sharded-pairwise"] = lambda: PairwiseShardedVote(comm)
        votes["sharded-waitall"] = lambda: BlockingWaitShardedVote(comm)
        votes["sharded-concurrent"] = lambda: ConcurrentGatherShardedVote(comm)
    for topology, make in votes.items():
        vote = make()
        if vote.nodes is None:
            vote.count_nodes(nodes)
        model = topology.split("-")[0]
        t = vote.traffic
        before = (t.sent, t.received, t.sent_between_nodes)
        results[topology] = tuple(None if a is None else a.copy()
                                  for a in vote.vote(cases.words, n))
        sent, received = per_rank(comm, t.sent - before[0], t.received - before[1])
        between = node_bytes(comm, nodes, t.sent_between_nodes - before[2])
        if topology in TOPOLOGIES and (model != "hierarchical" or sizes is not None):
            want = costmodel.traffic(model, n, m, **({"nodes": sizes} if model == "hierarchical"
                                                      else {}))
            if list(zip(sent, received)) != want and comm.rank == 0:
                print(f"# WARNING: {topology} moved {list(zip(sent, received))} bytes, the cost "
                      f"model says {want}", file=sys.stderr)
        times = timed(comm, lambda: vote.vote(cases.words, n), args.vote_repeat)
        record(topology, f"mpisign {topology}", "vote" if topology in TOPOLOGIES else "variant",
               model, times, sent, received, "counted", between)

    # fp32 allreduces.
    record("mpi_default", "MPI_Allreduce fp32 (default)", "fp32", "fp32_best",
           timed(comm, cases.mpi_default, args.repeat),
           *mpi_bytes(cases.mpi_default, "rabenseifner_allreduce"))
    if ring is not None:
        record("ompi_ring", "MPI_Allreduce fp32 (Open MPI ring)", "fp32", "ring_allreduce",
               timed(comm, cases.ompi_ring, args.repeat),
               *mpi_bytes(cases.ompi_ring, "ring_allreduce"))
    if gloo is not None:
        formula = costmodel.traffic("ring_allreduce", n, m)
        record("gloo", "gloo all_reduce fp32", "fp32", "ring_allreduce",
               timed(comm, cases.gloo_allreduce, args.repeat),
               [s for s, _ in formula], [r for _, r in formula], "formula")

    # The peers' ways of moving signs.
    record("grace8", "GRACE 8-bit allgather", "peer", "allgather8",
           timed(comm, cases.grace8, args.repeat), *mpi_bytes(cases.grace8, "allgather8"))
    record("bcast_gather", "authors' bcast gather", "peer", "bcast_gather",
           timed(comm, cases.bcast_gather, args.repeat),
           *mpi_bytes(cases.bcast_gather, "bcast_gather"))

    # Local work around a vote (each rank at once, as in training).
    cases.ref_plus, cases.ref_tie = results["server"]
    record("pack", "local pack_signs", "local", None, timed(comm, cases.pack, args.vote_repeat))
    record("apply", "local apply_signs", "local", None,
           timed(comm, cases.apply, args.vote_repeat))

    identical = check_identical(comm, cases, results)
    best_fp32 = min(r["best_s"] for r in rows if r["kind"] == "fp32")
    for r in rows:
        r["ratio_to_best_fp32"] = r["best_s"] / best_fp32
    return rows, identical


def print_table(run: dict, file=sys.stdout) -> None:
    link = costmodel.Link(**run["link"])
    loaded = costmodel.Link(**run["link_loaded"])
    print(f"\n## M = {run['ranks']} ranks on nodes of {run.get('nodes')} ranks, "
          f"{run.get('label') or 'local'}; link (ping-pong fit): "
          f"alpha {1e6 * link.alpha:.1f} us, {link.gbit_per_s:.2f} Gbit/s, "
          f"gamma {1e12 * link.gamma:.0f} ps/B (all pairs at once: {loaded.gbit_per_s:.2f} "
          f"Gbit/s, gamma {1e12 * loaded.gamma:.0f} ps/B); ring forced: {run['ring']['forced']}, "
          f"verified by PML bytes: {run['ring']['verified']}", file=file)
    by_n: dict[int, list] = {}
    for r in run["results"]:
        by_n.setdefault(r["n"], []).append(r)
    for n, rows in by_n.items():
        w = costmodel.packed_bytes(n)
        print(f"\nn = {n:,} coordinates: fp32 {4 * n / 1e6:.1f} MB, packed {w / 1e6:.2f} MB; "
              f"votes identical to the server's: {run['identical'][str(n)]}", file=file)
        print(f"{'':34s}{'best ms':>10s}{'median ms':>11s}{'x fp32':>9s}{'sent MB':>10s}"
              f"{'recv MB':>10s}{'between MB':>12s}  bytes", file=file)
        for r in rows:
            sent = "" if r["sent"] is None else f"{max(r['sent']) / 1e6:10.2f}"
            recv = "" if r["received"] is None else f"{max(r['received']) / 1e6:10.2f}"
            between = r.get("between_node_bytes")
            between = "" if between is None else f"{between / 1e6:12.2f}"
            print(f"{r['name']:34s}{1e3 * r['best_s']:10.2f}{1e3 * r['median_s']:11.2f}"
                  f"{r['ratio_to_best_fp32']:9.4f}{sent:>10s}{recv:>10s}{between:>12s}  "
                  f"{r['bytes_source'] or ''}", file=file)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=lambda s: [parse_size(x) for x in s.split(",")],
                    default=list(SIZES.values()),
                    help="comma-separated coordinates: 1M,11.7M,25.6M (default) or numbers")
    ap.add_argument("--repeat", type=int, default=5, help="timed calls per case (default 5)")
    ap.add_argument("--vote-repeat", type=int, default=10,
                    help="timed calls per vote and local case, cheap ones (default 10)")
    ap.add_argument("--json", help="write the figures here (rank 0)")
    ap.add_argument("--label", default=os.environ.get("BENCH_LABEL", ""),
                    help="what this run is, e.g. 'netns 1gbit'")
    ap.add_argument("--no-gloo", action="store_true", help="leave out torch.distributed gloo")
    ap.add_argument("--variants", action="store_true",
                    help="also time experimental vote schedules (benchmarks/vote_variants.py)")
    args = ap.parse_args()
    if args.repeat < 1 or args.vote_repeat < 1:
        ap.error("--repeat and --vote-repeat must be >= 1")
    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    m = comm.Get_size()
    if m < 2:
        raise SystemExit("bench_collectives needs >= 2 ranks: "
                         "python -m mpisign.launch -n 4 -- python benchmarks/bench_collectives.py")

    monitor = ompi_tool.PmlMonitor.open(comm)
    nodes = discover(comm)
    link = costmodel.measure_link(comm)
    loaded = costmodel.measure_link(comm, concurrent=True)  # every pair at once
    ring = ompi_tool.forced_allreduce_comm(comm, ompi_tool.ALLREDUCE_RING)
    verified = None
    if ring is not None and monitor is not None:
        # A ring sends only to the next rank: check it on the PML's byte counts.
        probe = np.ones(1 << 16, dtype=np.float32)
        comm.Barrier()
        before = monitor.read()
        ring.Allreduce(MPI.IN_PLACE, probe)
        delta = monitor.read() - before
        others = [r for r in range(m) if r != (comm.rank + 1) % m and delta[r]]
        verified = bool(comm.allreduce(not others and delta.sum() > 0, op=MPI.LAND))
    gloo = None if args.no_gloo else init_gloo(comm)
    # The authors' gather: a 2-rank communicator {0, i} for each worker i (root = worker).
    pairs = {}
    for i in range(1, m):
        sub = comm.Split(0 if comm.rank in (0, i) else MPI.UNDEFINED, 0 if comm.rank == 0 else 1)
        if sub != MPI.COMM_NULL:
            pairs[i] = sub

    run = dict(ranks=m, nodes=nodes.sizes, node_of=list(nodes.node_of), label=args.label, hostname=socket.gethostname(),
               mpi=MPI.Get_library_version().splitlines()[0], repeat=args.repeat,
               vote_repeat=args.vote_repeat,
               env={k: v for k, v in os.environ.items()
                    if k.startswith(("OMPI_MCA_", "NETNS_", "GLOO_"))},
               link=link.as_dict(), link_loaded=loaded.as_dict(),
               ring=dict(forced=ring is not None, verified=verified,
                         how="MPI_T: coll_tuned_use_dynamic_rules=1, "
                             "coll_tuned_allreduce_algorithm=4 on a Dup of COMM_WORLD",
                         why=ompi_tool.why.get("lib")),
               pml_monitoring=monitor is not None, identical={}, results=[])
    for n in args.sizes:
        rows, identical = run_size(comm, n, args, ring, gloo, pairs, monitor, nodes)
        run["results"] += rows
        run["identical"][str(n)] = identical
        if comm.rank == 0:
            print(f"# n = {n:,} done", file=sys.stderr, flush=True)
    if comm.rank == 0:
        print_table(run)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(run, indent=1))
    if gloo is not None:
        gloo.destroy_process_group()


if __name__ == "__main__":
    main()
