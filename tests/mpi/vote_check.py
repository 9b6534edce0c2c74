"""majority_vote on every rank vs a numpy reference on all ranks' unpacked signs.

Covers one topology (every topology without an argument), float16/bfloat16/float32/float64,
ragged lengths, zeros, NaN and inf, and checks the exact bytes each rank moved against the
topology's formula. Each case is named (common.case), so a failure says which one broke.
Usage: vote_check.py [TOPOLOGY]
"""

import sys

import numpy as np
import torch
from mpi4py import MPI
from common import WORLD, case, expect_everywhere, progress, rank_data, reference_vote

import mpisign
from mpisign import collectives
from mpisign.collectives import costmodel
from mpisign.vote import shared_vote_comm
from mpisign.backends.packing import n_words

comm = WORLD
rank, size = comm.Get_rank(), comm.Get_size()
LENGTHS = [0, 1, 7, 8, 31, 32, 33, 63, 64, 65, 127, 1000, 4099, 100_003]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

TOPOLOGIES = sys.argv[1:] or sorted(mpisign.TOPOLOGIES)


def check_case(topology: str, dtype, n: int, step: int) -> None:
    xs = [rank_data(n, r, seed=n * 7 + 1, dtype=dtype) for r in range(size)]
    if n > 2:
        xs[0][1] = float("nan")
        xs[size - 1][2] = float("inf")
    shape = (n,) if n % 2 else (2, n // 2)
    x = xs[rank].reshape(shape)
    stats = {}
    got = mpisign.majority_vote(x, comm, topology, step=step, stats=stats)
    assert got.shape == x.shape and got.dtype == x.dtype, (got.shape, got.dtype)
    ref = reference_vote(xs, step=step)
    mism = np.flatnonzero(got.reshape(-1).to(torch.float64).numpy() != ref)
    assert mism.size == 0, f"{topology} {dtype} n={n}: {mism.size} wrong, first {mism[:5]}"
    # Bit-identical on every rank.
    everyone = comm.allgather(got.reshape(-1).to(torch.float64).numpy().tobytes())
    assert all(b == everyone[0] for b in everyone), f"{topology} n={n}: ranks differ"
    # Exact bytes on the wire: 8 bytes a word, tie mask only for even size.
    w, k = n_words(n), (2 if size % 2 == 0 else 1)
    sent = comm.allgather(stats["bytes_sent"])
    recv = comm.allgather(stats["bytes_received"])
    assert sum(sent) == sum(recv), (sent, recv)
    if size > 1 and topology == "server":
        assert sent[0] == 8 * w * k * (size - 1) and recv[0] == 8 * w * (size - 1)
        assert all(s == 8 * w for s in sent[1:]), sent
        assert all(r == 8 * w * k for r in recv[1:]), recv
    if size > 1 and topology == "tree":
        # Every rank but the root receives the result once and sends its count once.
        assert all(r >= 8 * w * k for r in recv[1:]), recv
        assert min(sent[1:]) == 8 * w, sent  # a leaf sends just its sign bits
    if size > 1 and topology == "allgather":
        assert sent == recv == [8 * w * (size - 1)] * size, (sent, recv)
    if size > 1 and topology == "sharded":
        # Shard r has w_r words: rank r sends the others (w - w_r) words of signs and
        # k * w_r words of result each; it receives w_r words of signs from each and
        # k * (w - w_r) words of result.
        b = [j * w // size for j in range(size + 1)]
        mine = [b[j + 1] - b[j] for j in range(size)]
        assert sent == [8 * (w - mine[r] + k * mine[r] * (size - 1))
                        for r in range(size)], sent
        assert recv == [8 * (mine[r] * (size - 1) + k * (w - mine[r]))
                        for r in range(size)], recv
    if size > 1 and topology == "hierarchical":
        # One node here (the ranks share memory): the model's exact bytes, none between nodes.
        assert list(zip(sent, recv)) == costmodel.traffic("hierarchical", n, size), (sent, recv)
        assert stats["bytes_sent_between_nodes"] == stats["bytes_received_between_nodes"] == 0
    if size == 1:
        assert sent == [0] and recv == [0]


step = 0
for topology in TOPOLOGIES:
    for dtype in DTYPES:
        for n in LENGTHS:
            with case(f"{topology} {dtype} n={n}"):
                check_case(topology, dtype, n, step)
            step += 1
            progress(step)

# Calls of one kind reuse their collective and buffers; out= (a new tensor, or x itself) holds
# the same bits as a fresh result, and stats count this call's bytes alone.
for topology in TOPOLOGIES:
    with case(f"{topology} reused, into out= and into x"):
        n, kept = 4099, None
        for k, dest in enumerate(["new", "out", "x", "new"]):
            xs = [rank_data(n, r, seed=1000 + k) for r in range(size)]
            x = xs[rank].clone()
            out = {"new": None, "out": torch.full_like(x, 5.0), "x": x}[dest]
            stats = {}
            got = mpisign.majority_vote(x, comm, topology, step=step, stats=stats, out=out)
            assert out is None or got is out, dest
            ref = reference_vote(xs, step=step)
            assert np.array_equal(got.to(torch.float64).numpy(), ref), dest
            if size > 1:
                calls = shared_vote_comm(comm).kept
                call = calls[(topology, n, x.device, x.dtype, None)]
                assert kept is None or call is kept, "the collective was built again"
                kept = call
                if topology == "allgather":
                    assert stats == {"bytes_sent": 8 * n_words(n) * (size - 1),
                                     "bytes_received": 8 * n_words(n) * (size - 1)}, stats
            step += 1
        with expect_everywhere(ValueError, "out must be"):   # an out of the wrong shape
            mpisign.majority_vote(torch.ones(5), comm, topology, out=torch.empty(4))
    progress(step)

# A loop `y = majority_vote(x)` takes the memory of the result before the last one once nothing
# holds it; results still held (a list of them, a view, a numpy array) keep their bits.
with case("results' memory used again only when nothing holds it"):
    n, ptrs, refs = 1000, [], []
    for k in range(6):
        xs = [rank_data(n, r, seed=2000 + k, dtype=torch.bfloat16) for r in range(size)]
        refs.append(reference_vote(xs, step=step))
        y = mpisign.majority_vote(xs[rank].view(10, 100), comm, "sharded", step=step)
        assert np.array_equal(y.reshape(-1).to(torch.float64).numpy(), refs[k])
        ptrs.append(y.data_ptr())
        if k == 0:
            whole = y        # result 0 held whole
        if k == 1:
            part = y[3:]     # result 1 held by a view only
        step += 1
    if size > 1:
        # 2 and 3 are new (0 and 1 are held, and so is the last result during a call); 4 takes
        # 2's memory and 5 takes 3's.
        assert len(set(ptrs[:4])) == 4 and ptrs[4:] == ptrs[2:4], ptrs
    assert np.array_equal(whole.reshape(-1).to(torch.float64).numpy(), refs[0])
    assert np.array_equal(part.reshape(-1).to(torch.float64).numpy(), refs[1][300:])
progress(step)

# The sharded vote's ring allgather of the result (forced at every length, and by default at a
# size whose shards pass costmodel.RING_MIN_BYTES): the server's bits, the model's exact bytes.
server = collectives.ServerVote(comm)
RING_CASES = [(n, 0) for n in LENGTHS] + [(64 * 100_000 * max(1, size // 2), None)]
for n, ring_min in RING_CASES if "sharded" in TOPOLOGIES else []:
    with case(f"sharded ring n={n} ring_min_bytes={ring_min}"):
        rng = np.random.default_rng([n, rank])
        words = rng.integers(0, 2**64, size=n_words(n), dtype=np.uint64, endpoint=False)
        if n % 64:
            words[-1] &= np.uint64((1 << (n % 64)) - 1)
        kw = {} if ring_min is None else {"ring_min_bytes": ring_min}
        sharded = collectives.ShardedVote(comm, **kw)
        plus, tie = sharded.vote(words, n)
        want_plus, want_tie = server.vote(words, n)
        assert np.array_equal(plus, want_plus), n
        assert tie is None or np.array_equal(tie, want_tie), n
        model = costmodel.traffic("sharded", n, size, **kw)[rank]
        assert (sharded.traffic.sent, sharded.traffic.received) == model, (n, model)
        if ring_min is None and size > 2:
            assert costmodel.sharded_ring_gather(n, size), "the default size did not take the ring"
    step += 1
    progress(step)

# The roots of the server and tree votes leave their result sends in flight (a result larger
# than any eager limit: each receiver pulls it); the bucket's next vote completes them before
# it writes the result buffer again. Each result, read before the next vote, is the majority of
# the unpacked bits (numpy), on every rank.
def unpacked_majority(n: int, seed: int):
    ones = sum(np.unpackbits(random_words(n, r, seed).view(np.uint8), count=n,
                             bitorder="little").astype(np.int64) for r in range(size))
    return 2 * ones > size, 2 * ones == size


def random_words(n: int, r: int, seed: int) -> np.ndarray:
    words = np.random.default_rng([seed, r]).integers(0, 2**64, size=n_words(n),
                                                       dtype=np.uint64, endpoint=False)
    if n % 64:
        words[-1] &= np.uint64((1 << (n % 64)) - 1)
    return words


for topology in [t for t in ("server", "tree") if t in TOPOLOGIES and size > 1]:
    with case(f"{topology}: result sends left in flight until the bucket's next vote"):
        voter, n, left = collectives.TOPOLOGIES[topology](comm), 64 * 20_000 + 5, None
        senders = {"server": [0], "tree": [r for r in range(size)
                                          if costmodel.tree_children(r, size)]}[topology]
        for k in range(3):
            plus, tie = voter.vote(random_words(n, rank, 3000 + k), n)
            if left is not None:   # the last vote's sends: completed before this one began
                assert all(req == MPI.REQUEST_NULL for req in left), (k, left)
            left = voter._sending.get(0, ([], None, None))[0]
            assert (len(left) > 0) == (rank in senders), (rank, len(left))
            want_plus, want_tie = unpacked_majority(n, 3000 + k)
            got = np.unpackbits(plus.view(np.uint8), count=n, bitorder="little").astype(bool)
            assert np.array_equal(got, want_plus), k
            if size % 2 == 0:
                got = np.unpackbits(tie.view(np.uint8), count=n, bitorder="little")
                assert np.array_equal(got.astype(bool), want_tie), k
            step += 1
    progress(step)

# Argument errors come before any communication, on every rank alike.
for bad, word in [(dict(topology="ring"), "topology"), (dict(comm="world"), "comm")]:
    with case(f"{bad} is refused on every rank"):
        with expect_everywhere(ValueError, word):
            mpisign.majority_vote(torch.ones(3), **bad)
with case("an int32 tensor is refused on every rank"):
    with expect_everywhere(ValueError, "dtype"):
        mpisign.majority_vote(torch.ones(3, dtype=torch.int32), comm)
comm.Barrier()
if rank == 0:
    print(f"vote_check OK on {size} ranks, {step} votes", flush=True)
sys.exit(0)
