"""The cost model's arithmetic against hand-computed values (no MPI, no timing)."""

import math

import pytest

from mpisign.collectives import costmodel as cm
from mpisign.collectives.costmodel import Cost, Link

MSG = Link(alpha=1.0, beta=0.0)          # prices messages only
WIRE = Link(alpha=0.0, beta=1.0)         # prices wire bytes only
PASS = Link(alpha=0.0, beta=0.0, gamma=1.0)  # prices compute bytes only


def test_sizes():
    assert cm.packed_bytes(0) == 0
    assert cm.packed_bytes(1) == 8
    assert cm.packed_bytes(64) == 8
    assert cm.packed_bytes(65) == 16
    assert [cm.result_planes(m) for m in (2, 3, 4, 5)] == [2, 1, 2, 1]
    assert [cm.count_planes(m) for m in (1, 2, 3, 4, 7, 8)] == [1, 2, 2, 3, 3, 4]


def test_pass_counts():
    # M = 3: P = 2; zeroed counter 2, three votes of 1 + 2*2 = 5 -> 15; compare count > 1:
    # 2 to start, plane 1 (bit clear) 4, plane 0 (bit set) 1 -> 7. Total 24.
    assert cm.tally_passes(3) == 24
    # M = 4: P = 3; 3 + 4 * 7 = 31; count > 2: 2 + plane 2 (clear) 4 + plane 1 (set) 1
    # + plane 0 (clear) 4 = 11. Total 42.
    assert cm.tally_passes(4) == 42
    assert cm.add_counts_passes(3) == 21


def test_link():
    link = Link.from_bandwidth(1.0, alpha=2e-6)
    assert link.beta == pytest.approx(8e-9)
    assert link.gbit_per_s == pytest.approx(1.0)
    assert Link(0, 0).gbit_per_s == math.inf
    assert Cost(2, 10, 100).seconds(Link(1.0, 0.5, 0.25)) == 2 + 5 + 25
    for bad in (dict(alpha=-1, beta=0), dict(alpha=0, beta=math.nan), dict(alpha=0, beta=0, gamma="x")):
        with pytest.raises(ValueError):
            Link(**bad)
    with pytest.raises(ValueError):
        Link.from_bandwidth(0, alpha=0)


def test_server():
    n, w = 640, 80
    # M = 4: 3 in, 3 out at the root; 3 W in, 3 * 2W out (tie mask: M even).
    assert cm.predict("server", n, 4, MSG) == 6
    assert cm.predict("server", n, 4, WIRE) == 3 * w + 6 * w
    # M = 3 (odd): no tie mask.
    assert cm.predict("server", n, 3, WIRE) == 2 * w + 2 * w
    assert cm.predict("server", n, 3, PASS) == (1 + 24 + 1) * w
    assert cm.traffic("server", n, 4) == [(480, 240), (80, 160), (80, 160), (80, 160)]
    assert cm.traffic("server", n, 3) == [(160, 160), (80, 80), (80, 80)]


def test_tree():
    n, w = 640, 80
    # M = 8, chain 0 <- 4 <- 6 <- 7: up 3 messages of P(4)=3, P(2)=2, P(1)=1 planes;
    # down: rank 0 sends to 3 children, rank 4 to 2, rank 6 to 1: 6 message times of 2W.
    assert cm.predict("tree", n, 8, MSG) == 3 + 6
    assert cm.predict("tree", n, 8, WIRE) == 6 * w + 6 * 2 * w
    # M = 4: chain 0 <- 2 <- 3, up P(2) + P(1) = 3 planes; down 2 + 1 = 3 sends of 2W.
    assert cm.predict("tree", n, 4, WIRE) == 3 * w + 3 * 2 * w
    # Compute at M = 4: rank 0 adds into 2 then 3 planes (15 + 21), rank 2 into 2 planes (15),
    # then the majority (count > 2: 11 passes) and two result planes: 64 passes.
    assert cm.predict("tree", n, 4, PASS) == (15 + 21 + 15 + 11 + 2) * w
    # Per rank, M = 4 (k = 2): rank 0 gets 1 plane from 1 and 2 from 2, sends 2W to each;
    # rank 2 gets 1 plane from 3 and 2W from 0, sends 2 planes up and 2W to 3.
    assert cm.traffic("tree", n, 4) == [(4 * w, 3 * w), (w, 2 * w), (4 * w, 3 * w), (w, 2 * w)]


def test_sharded():
    # n = 512: 8 words, W = 64 bytes; M = 4: shards of 2 words (16 bytes).
    n = 512
    assert cm.predict("sharded", n, 4, MSG) == 6
    assert cm.predict("sharded", n, 4, WIRE) == 48 + 2 * 48
    assert cm.traffic("sharded", n, 4) == [(48 + 2 * 3 * 16, 3 * 16 + 2 * 48)] * 4
    # M = 3, 8 words split at 0, 2, 5, 8: shards of 16, 24, 24 bytes, no tie mask.
    assert cm.traffic("sharded", n, 3) == [(48 + 2 * 16, 2 * 16 + 48), (40 + 2 * 24, 2 * 24 + 40),
                                           (40 + 2 * 24, 2 * 24 + 40)]
    # Busiest direction: rank 0 sends 48 bytes of signs, ranks 1, 2 receive 48: 2 phases x 48.
    assert cm.predict("sharded", n, 3, WIRE) == 2 * 48


def test_sharded_ring_gather_rule_and_bytes():
    # Forced ring on the M = 3 example above: rank r forwards every result shard but r + 1's.
    n = 512
    assert cm.traffic("sharded", n, 3, ring_min_bytes=0) == [
        (48 + (64 - 24), 2 * 16 + 48), (40 + (64 - 24), 2 * 24 + 40), (40 + (64 - 16), 2 * 24 + 40)]
    ring = cm.traffic("sharded", n, 3, ring_min_bytes=0)
    assert sum(s for s, _ in ring) == sum(r for _, r in ring)
    # The default threshold: large shards take the ring, small ones and M = 2 never.
    assert cm.sharded_ring_gather(25_557_032, 4) and cm.sharded_ring_gather(25_557_032, 8)
    assert not cm.sharded_ring_gather(1_000_000, 8) and not cm.sharded_ring_gather(25_557_032, 2)
    shard = cm.RING_MIN_BYTES // 8  # words; M = 3 (k = 1): shards of exactly RING_MIN_BYTES
    assert cm.sharded_ring_gather(64 * 3 * shard, 3)
    assert not cm.sharded_ring_gather(64 * 3 * (shard - 1), 3)


def test_sharded_bytes_flat_in_m():
    n = 25_557_032
    w = cm.packed_bytes(n)
    for m in range(2, 65):
        sent = max(s for s, _ in cm.traffic("sharded", n, m))
        assert sent <= (1 + cm.result_planes(m)) * w  # bounded whatever M is
    assert max(s for s, _ in cm.traffic("sharded", n, 64)) < 3 * w


def test_allgather_and_peers():
    n, w = 640, 80
    assert cm.predict("allgather", n, 4, MSG) == 3
    assert cm.predict("allgather", n, 4, WIRE) == 3 * w
    assert cm.traffic("allgather", n, 4) == [(3 * w, 3 * w)] * 4
    assert cm.predict("allgather8", n, 4, WIRE) == 3 * n
    assert cm.traffic("allgather8", n, 4) == [(3 * n, 3 * n)] * 4
    # The authors' gather: 3 serialized messages in, then a binomial broadcast (2 rounds of 2W).
    assert cm.predict("bcast_gather", n, 4, MSG) == 3 + 2
    assert cm.predict("bcast_gather", n, 4, WIRE) == 3 * w + 2 * 2 * w
    assert cm.traffic("bcast_gather", n, 4) == [(4 * w, 3 * w), (w, 2 * w), (3 * w, 2 * w), (w, 2 * w)]


def test_fp32_allreduces():
    n, f = 1000, 4000
    assert cm.predict("ring_allreduce", n, 4, MSG) == 6
    assert cm.predict("ring_allreduce", n, 4, WIRE) == 2 * f * 3 / 4
    assert cm.predict("ring_allreduce", n, 4, PASS) == f * 3 / 4
    assert cm.traffic("ring_allreduce", n, 4) == [(6000, 6000)] * 4
    assert cm.predict("rd_allreduce", n, 8, WIRE) == 3 * f
    assert cm.predict("rd_allreduce", n, 6, MSG) == 2 + 2  # 4 ranks' steps + fold in/out
    assert cm.predict("rabenseifner_allreduce", n, 8, MSG) == 6
    assert cm.predict("rabenseifner_allreduce", n, 8, WIRE) == 2 * f * 7 / 8


def test_vote_is_a_32nd_of_the_ring():
    # Odd M, n a multiple of 64 M: sharded moves exactly 1/32 of the ring's bytes; even M 2/64.
    n = 64 * 3 * 5 * 1000
    assert cm.predict("sharded", n, 3, WIRE) * 32 == cm.predict("ring_allreduce", n, 3, WIRE)
    assert cm.predict("sharded", n, 5, WIRE) * 32 == cm.predict("ring_allreduce", n, 5, WIRE)
    n = 64 * 4 * 1000
    assert cm.predict("sharded", n, 4, WIRE) * 64 == 3 * cm.predict("ring_allreduce", n, 4, WIRE)


def test_one_rank_is_free():
    for a in cm.ALGORITHMS:
        assert cm.predict(a, 1000, 1, Link(1, 1, 1)) == 0
        assert cm.traffic(a, 1000, 1) == [(0, 0)]


def test_choose():
    n = 25_557_032
    # Latency only: the fewest messages win (allgather: M-1, one round).
    assert cm.choose(n, 4, MSG) == "allgather"
    # Bandwidth only, many ranks: sharded's flat traffic wins.
    assert cm.choose(n, 16, WIRE) == "sharded"
    # Two ranks, bandwidth only: allgather sends W, sharded 3W/2 (tie mask): allgather.
    assert cm.choose(n, 2, WIRE) == "allgather"
    # Three ranks, bandwidth only (W = packed_bytes(n), one result plane at odd M): the
    # server's root takes 2W in and sends 2W; the tree's longest chain (0 <- 1) carries one
    # plane up and its root sends each of its 2 children W: 3W. The tree, whatever the order.
    w = cm.packed_bytes(n)
    assert cm.predict("server", n, 3, WIRE) == 4 * w and cm.predict("tree", n, 3, WIRE) == 3 * w
    assert cm.choose(n, 3, WIRE, candidates=("server", "tree")) == "tree"
    assert cm.choose(n, 3, WIRE, candidates=("tree", "server")) == "tree"
    with pytest.raises(ValueError):
        cm.choose(n, 4, WIRE, candidates=())


def test_bad_arguments():
    with pytest.raises(ValueError, match="algorithm must be one of"):
        cm.predict("ring", 10, 4, MSG)
    with pytest.raises(ValueError, match="ranks"):
        cm.cost("sharded", 10, 0)
    with pytest.raises(ValueError, match="n_coords"):
        cm.cost("sharded", -1, 2)


def test_names_match_the_collectives():
    from mpisign.collectives import TOPOLOGIES

    assert set(cm.TOPOLOGIES) == set(TOPOLOGIES)


def test_hierarchical_bytes_reduce_to_the_sharded_vote_at_the_extremes():
    """One node: the node's alltoall and allgather are the sharded vote's (messages posted at
    once). One rank a node: the counts between nodes are one plane, the raw signs: again the
    sharded vote. Two independent derivations of the same bytes."""
    never_ring = 1 << 62
    for n in (0, 1, 64 * 7 + 3, 100_003):
        for m in (2, 3, 4, 5, 8):
            flat = cm.traffic("sharded", n, m, ring_min_bytes=never_ring)
            assert cm.traffic("hierarchical", n, m) == flat, (n, m)
            assert cm.traffic("hierarchical", n, m, nodes=[1] * m) == flat, (n, m)
            assert cm.between_nodes("hierarchical", n, [m]) == [(0, 0)]


def test_hierarchical_between_nodes_is_p_plus_k_planes():
    """Equal nodes of L ranks, N nodes: each node sends and receives (P(L) + k) W (N-1)/N
    between nodes, where the flat sharded vote (messages at once) sends L (1 + k) W (N-1)/N."""
    n = 64 * 8 * 4 * 100   # words divide evenly into shards and pieces
    w = cm.packed_bytes(n)
    for sizes in ([2, 2], [4, 4], [8, 8], [4, 4, 4, 4]):
        big_n, L = len(sizes), sizes[0]
        k = cm.result_planes(sum(sizes))
        want = (cm.count_planes(L) + k) * w * (big_n - 1) // big_n
        assert cm.between_nodes("hierarchical", n, sizes) == [(want, want)] * big_n, sizes
    # Uneven nodes: what one node sends, the others receive.
    for sizes in ([1, 2, 3], [3, 1], [5, 2]):
        moved = cm.between_nodes("hierarchical", 100_003, sizes)
        assert sum(s for s, _ in moved) == sum(r for _, r in moved)
        per_rank = cm.traffic("hierarchical", 100_003, sum(sizes), nodes=sizes)
        assert sum(s for s, _ in per_rank) == sum(r for _, r in per_rank)


def test_between_nodes_of_the_flat_topologies():
    n, sizes = 64 * 800, [2, 2]
    w, k = cm.packed_bytes(n), 2
    # allgather: every rank sends W to each of the 2 ranks of the other node.
    assert cm.between_nodes("allgather", n, sizes) == [(2 * 2 * w, 2 * 2 * w)] * 2
    # server: the other node's 2 workers send W up and receive k W.
    assert cm.between_nodes("server", n, sizes) == [(2 * k * w, 2 * w), (2 * w, 2 * k * w)]
    # ring allreduce: one crossing each way per node.
    f = 4 * n
    assert cm.between_nodes("ring_allreduce", n, sizes) == [(2 * f * 3 // 4,) * 2] * 2
    with pytest.raises(ValueError, match="between_nodes knows"):
        cm.between_nodes("tree", n, sizes)


def test_choose_nodes():
    n = 25_557_032
    fast = Link.from_bandwidth(2000, alpha=2e-6)
    slow = Link.from_bandwidth(100, alpha=5e-6)
    # Bandwidth-bound between nodes, 8 ranks a node: the hierarchical vote.
    assert cm.choose_nodes(n, [8] * 16, fast, slow) == "hierarchical"
    assert cm.predict_nodes("hierarchical", n, [8] * 16, fast, slow) < \
        cm.predict_nodes("sharded", n, [8] * 16, fast, slow)
    # One node: the single-link model, priced on the link inside.
    assert cm.predict_nodes("sharded", n, [4], fast, slow) == cm.predict("sharded", n, 4, fast)
    # Latency only between nodes and few coordinates: fewer messages win over fewer bytes.
    assert cm.choose_nodes(64, [2, 2], MSG, MSG) == "allgather"
    with pytest.raises(ValueError, match="nodes must be"):
        cm.predict_nodes("sharded", n, [4, 0], fast, slow)
    with pytest.raises(ValueError, match="nodes must be"):
        cm.traffic("hierarchical", n, 5, nodes=[2, 2])
