"""The cost model's predictions for the hierarchical vote on large GPU clusters.

    python benchmarks/hier_table.py [--nodes 16,32,64,128] [--per-node 8] [--gbit 100,200,400]
        [--json out.json]

Nodes of 8 GPUs joined inside by an NVLink-class link (``--inside-gbit``, default 3600 Gbit/s,
alpha 2 us) and to each other by ``--gbit`` per node (alpha 5 us: all of a node's traffic to
other nodes shares it), compute free (gamma = 0: the GPU kernels' regime). For ResNet-50 (25.6M
coordinates) and a 1.3B-parameter model: the bytes the busiest node sends to other nodes and the
predicted time of the hierarchical vote, the flat sharded vote and the flat ring allreduce of
fp32 (:func:`mpisign.collectives.costmodel.predict_nodes`), and what :func:`choose_nodes` picks.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mpisign.collectives import costmodel as cm  # noqa: E402
from mpisign.collectives.costmodel import Link  # noqa: E402

MODELS = {"ResNet-50": 25_557_032, "1.3B": 1_300_000_000}
ALGORITHMS = ("hierarchical", "sharded", "ring_allreduce")


@functools.lru_cache(maxsize=None)
def busiest_node_bytes(algorithm: str, n: int, sizes: tuple) -> int:
    return max(s for s, _ in cm.between_nodes(algorithm, n, list(sizes)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", default="16,32,64,128")
    ap.add_argument("--per-node", type=int, default=8)
    ap.add_argument("--gbit", default="100,200,400", help="between nodes, per node")
    ap.add_argument("--inside-gbit", type=float, default=3600.0)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    inside = Link.from_bandwidth(args.inside_gbit, alpha=2e-6)
    rows = []
    for model, n in MODELS.items():
        print(f"\n## {model}: {n:,} coordinates, nodes of {args.per_node} ranks, NVLink-class "
              f"inside ({args.inside_gbit:g} Gbit/s), compute free")
        print(f"{'nodes':>6s}{'Gbit/s':>8s}" + "".join(f"{a + ' ms':>20s}" for a in ALGORITHMS)
              + f"{'hier/sharded':>14s}{'hier/ring':>11s}{'between MB: hier':>18s}"
              f"{'sharded':>9s}{'ring':>9s}  auto")
        for nodes in [int(x) for x in args.nodes.split(",")]:
            sizes = (args.per_node,) * nodes
            for gbit in [float(x) for x in args.gbit.split(",")]:
                between = Link.from_bandwidth(gbit, alpha=5e-6)
                ms = {a: 1e3 * cm.predict_nodes(a, n, list(sizes), inside, between)
                      for a in ALGORITHMS}
                mb = {a: busiest_node_bytes(a, n, sizes) / 1e6 for a in ALGORITHMS}
                pick = cm.choose_nodes(n, list(sizes), inside, between)
                rows.append(dict(model=model, n=n, nodes=nodes, per_node=args.per_node,
                                 gbit=gbit, ms=ms, between_mb=mb, auto=pick))
                print(f"{nodes:6d}{gbit:8g}" + "".join(f"{ms[a]:20.2f}" for a in ALGORITHMS)
                      + f"{ms['hierarchical'] / ms['sharded']:14.3f}"
                      f"{ms['hierarchical'] / ms['ring_allreduce']:11.3f}"
                      f"{mb['hierarchical']:18.1f}{mb['sharded']:9.1f}{mb['ring_allreduce']:9.1f}"
                      f"  {pick}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
