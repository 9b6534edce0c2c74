"""mpisign.mpi.nodes: the grouping rule, and discovery on one process (the MPI runs are in
tests/mpi/hierarchical_check.py)."""

from mpi4py import MPI

from mpisign.mpi.nodes import Nodes, discover


def test_nodes_are_numbered_by_their_lowest_rank():
    nodes = Nodes.from_keys(["b", "a", "b", "c", "a"])
    assert nodes.node_of == (0, 1, 0, 2, 1)
    assert nodes.members == ((0, 2), (1, 4), (3,))
    assert nodes.sizes == [2, 2, 1] and len(nodes) == 3
    assert nodes.describe() == "3 nodes of 2+2+1 ranks"
    assert Nodes.from_keys([7]).describe() == "1 node of 1 ranks"


def test_discover_on_one_rank_by_name_and_by_shared_memory(monkeypatch):
    monkeypatch.delenv("MPISIGN_NODE", raising=False)
    assert discover(MPI.COMM_SELF).members == ((0,),)          # the shared-memory split
    assert discover(MPI.COMM_SELF, name="n1").members == ((0,),)
    monkeypatch.setenv("MPISIGN_NODE", "n2")
    assert discover(MPI.COMM_SELF).node_of == (0,)
