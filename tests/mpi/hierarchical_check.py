"""The hierarchical vote on real ranks, over many groupings into nodes, against numpy.

For each grouping of this launch's M ranks (one node; one rank a node; and 3+3, 2+3, 1+2+3,
4+4 ... where they fit M; and an interleaved one), random packed words of ragged lengths are
voted with HierarchicalVote, and every rank's (plus, tie) is checked against a majority that
numpy computes on the unpacked bits of all ranks' words, and against the other ranks' bits. The
bytes each rank moved, inside and between nodes, are checked against the documented per-phase
formulas (HierarchicalVote's docstring), written out here independently. Then majority_vote and
Signum with topology="hierarchical", nodes named by $MPISIGN_NODE, float32 and float64.
"""

import os
import sys

import numpy as np
import torch
from common import WORLD, case, progress, rank_data, reference_vote

import mpisign
from mpisign.collectives import costmodel
from mpisign.collectives import HierarchicalVote
from mpisign.mpi.nodes import Nodes
from mpisign.backends.packing import n_words

comm = WORLD
rank, size = comm.Get_rank(), comm.Get_size()
LENGTHS = [0, 1, 63, 64, 65, 1000, 4099, 100_003]


def groupings(m: int) -> dict:
    """Name -> node key of each rank."""
    named = {"3+3": [3, 3], "2+3": [2, 3], "1+2+3": [1, 2, 3], "4+4": [4, 4], "3+1": [3, 1],
             "1+3": [1, 3], "2+2": [2, 2], "2+2+3": [2, 2, 3], "5+2": [5, 2], "2+1+2+2": [2, 1, 2, 2]}
    out = {"one node": [0] * m, "one rank a node": list(range(m))}
    for name, sizes in named.items():
        if sum(sizes) == m:
            out[name] = [i for i, s in enumerate(sizes) for _ in range(s)]
    if m >= 3:
        out["interleaved"] = [r % 2 for r in range(m)]   # nodes need not be consecutive ranks
    return out


def numpy_majority(all_words: list, n: int):
    bits = [np.unpackbits(w.view(np.uint8), bitorder="little")[:n].astype(np.int64)
            for w in all_words]
    count = np.sum(bits, axis=0) if bits else np.zeros(0, np.int64)
    m = len(all_words)
    return count > m // 2, (count == m // 2) if m % 2 == 0 else None


def as_bits(words, n):
    return np.unpackbits(words.view(np.uint8), bitorder="little")[:n].astype(bool)


def shard_bounds(w, m):
    return [j * w // m for j in range(m + 1)]


def expected_bytes(keys, n):
    """(sent, received, sent between nodes, received between nodes) of this rank, from the
    per-phase table in HierarchicalVote's docstring."""
    names = list(dict.fromkeys(keys))
    members = [[r for r in range(len(keys)) if keys[r] == k] for k in names]
    sizes = [len(m) for m in members]
    me = names.index(keys[rank])
    local = members[me]
    big_n, s_count, w = len(sizes), max(sizes), n_words(n)
    k = 2 if len(keys) % 2 == 0 else 1
    planes = [int(s).bit_length() for s in sizes]
    shards = shard_bounds(w, s_count)
    owned = [s for s in range(s_count) if local[s % len(local)] == rank]
    inside_sent = inside_recv = between_sent = between_recv = 0
    for s in range(s_count):
        ws = shards[s + 1] - shards[s]
        pieces = shard_bounds(ws, big_n)
        wsj = [pieces[j + 1] - pieces[j] for j in range(big_n)]
        if s not in owned:
            inside_sent += ws                    # phase 1
            inside_recv += k * ws                # phase 4
            continue
        inside_recv += (len(local) - 1) * ws     # phase 1
        inside_sent += k * ws * (len(local) - 1)  # phase 4
        for j in range(big_n):
            if j != me:
                between_sent += planes[me] * wsj[j] + k * wsj[me]   # phases 2 and 3
                between_recv += planes[j] * wsj[me] + k * wsj[j]
    return tuple(8 * x for x in (inside_sent + between_sent, inside_recv + between_recv,
                                 between_sent, between_recv))


step = 0
for name, keys in groupings(size).items():
    nodes = Nodes.from_keys(keys)
    voter = HierarchicalVote(comm, nodes=nodes)
    for n in LENGTHS:
        with case(f"hierarchical {name} n={n}"):
            rng = np.random.default_rng([n, step])
            all_words = [rng.integers(0, 2**64, size=n_words(n), dtype=np.uint64,
                                      endpoint=False) for _ in range(size)]
            for words in all_words:
                if n % 64:
                    words[-1] &= np.uint64((1 << (n % 64)) - 1)
            t = voter.traffic
            before = (t.sent, t.received, t.sent_between_nodes, t.received_between_nodes)
            plus, tie = voter.vote(all_words[rank].copy(), n)
            want_plus, want_tie = numpy_majority(all_words, n)
            assert np.array_equal(as_bits(plus, n), want_plus), "plus differs from numpy"
            assert (tie is None) == (want_tie is None), "tie mask present at odd M or absent"
            if tie is not None:
                assert np.array_equal(as_bits(tie, n), want_tie), "tie differs from numpy"
            w = n_words(n)
            pad = 64 * w - n
            if pad:
                assert int(plus[-1]) >> (64 - pad) == 0, "padding bits leaked into plus"
            everyone = comm.allgather(plus.tobytes() + (b"" if tie is None else tie.tobytes()))
            assert all(b == everyone[0] for b in everyone), "ranks hold different bits"
            moved = tuple(a - b for a, b in zip(
                (t.sent, t.received, t.sent_between_nodes, t.received_between_nodes), before))
            assert moved == expected_bytes(keys, n), (moved, expected_bytes(keys, n))
            if keys == sorted(keys):   # consecutive ranks a node: the cost model's figures
                sizes = nodes.sizes
                assert moved[:2] == costmodel.traffic("hierarchical", n, size, nodes=sizes)[rank]
                by_node = costmodel.between_nodes("hierarchical", n, sizes)
                mine = comm.allreduce(np.array(moved[2:]) * (np.arange(len(sizes)) ==
                                                              nodes.node_of[rank])[:, None])
                assert [tuple(row) for row in mine] == by_node, (mine, by_node)
            if len(set(keys)) == 1:
                assert moved[2:] == (0, 0), "bytes counted between nodes on one node"
        step += 1
        progress(step)

# The public surfaces, with nodes named by $MPISIGN_NODE (as on the emulated cluster): split
# the ranks in two nodes, 1+(M-1) ranks, so that nodes of different sizes meet.
os.environ["MPISIGN_NODE"] = "first" if rank == 0 else "rest"
for dtype in (torch.float32, torch.float64):
    for n in (1, 65, 4099):
        with case(f"majority_vote hierarchical {dtype} n={n}"):
            xs = [rank_data(n, r, seed=n + 3, dtype=dtype) for r in range(size)]
            if n > 2:
                xs[size - 1][1] = float("nan")
            stats = {}
            got = mpisign.majority_vote(xs[rank], comm, "hierarchical", step=step, stats=stats)
            assert np.array_equal(got.to(torch.float64).numpy(), reference_vote(xs, step=step))
            if size > 1:
                sent_between = comm.allgather(stats["bytes_sent_between_nodes"])
                assert sum(sent_between) > 0 and sent_between[0] > 0, sent_between
        step += 1

with case("auto on two nodes: the links inside and between measured apart, one choice"):
    from mpisign import collectives
    dup = comm.Dup()
    choice = collectives.resolve_topology("auto", dup, 1 << 20)
    assert choice in mpisign.TOPOLOGIES, choice
    assert len(set(comm.allgather(choice))) == 1, "ranks chose differently"
    measured = collectives._links[dup.py2f()]
    assert measured.nodes.sizes == ([1, size - 1] if size > 1 else [1]), measured.nodes
    assert (measured.between is not None) == (size > 2), "a link between nodes measured or not"
    dup.Free()

with case("Signum hierarchical == server after 5 steps"):
    finals = {}
    for topology in ("server", "hierarchical"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(12, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3))
        opt = mpisign.Signum(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-3,
                             comm=comm, topology=topology)
        for i in range(5):
            g = torch.Generator().manual_seed(100 * rank + i)
            x, y = torch.randn(16, 12, generator=g), torch.randint(0, 3, (16,), generator=g)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        finals[topology] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        if topology == "hierarchical" and size > 1:   # a small model: some ranks own no words
            assert sum(comm.allgather(opt.stats.bytes_sent_between_nodes)) > 0, opt.stats
    assert torch.equal(finals["server"], finals["hierarchical"]), "Signum parameters differ"
    everyone = comm.allgather(finals["hierarchical"].numpy().tobytes())
    assert all(b == everyone[0] for b in everyone)

comm.Barrier()
if rank == 0:
    print(f"hierarchical_check OK on {size} ranks, {step} votes", flush=True)
sys.exit(0)
