"""The majority-vote collective and the optimizer on real ranks: mpiexec -n 1..5.

Each script compares every rank's result with a single-process reference computed another way
(numpy on the unpacked signs of all ranks) and checks that all ranks hold the same bits.
"""

import os
import re
import shutil

import pytest

import mpirun
import mpisign

SIZES = [1, 2, 3, 4, 5]


@pytest.mark.parametrize("n", SIZES)
def test_majority_vote_matches_numpy_reference(n):
    """Every topology, one after another in one launch (a launch costs seconds of start-up on
    2 cores); the failure report names the case (topology, dtype, length: tests/mpirun.py)."""
    out = mpirun.run(n, "vote_check.py", *sorted(mpisign.TOPOLOGIES), timeout=300)
    assert f"vote_check OK on {n} ranks" in out


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6, 7, 8])
def test_hierarchical_vote_over_groupings_matches_numpy(n):
    """Every grouping of n ranks into nodes that the script knows (one node, one rank a node,
    3+3, 2+3, 1+2+3, 4+4, interleaved, ...): numpy's bits, the documented bytes inside and
    between nodes, and majority_vote and Signum with nodes named by $MPISIGN_NODE."""
    out = mpirun.run(n, "hierarchical_check.py", timeout=300)
    assert f"hierarchical_check OK on {n} ranks" in out


# The paper's topologies on every size; the newer ones on one odd and one even size (the
# collective-level test above already runs them on every size).
#: Ranks -> the topologies optim_check runs on them, one after another in one launch.
OPTIM_CASES = {1: ["server", "tree"], 2: ["server", "tree"],
               3: ["server", "tree", "sharded", "allgather", "auto"],
               4: ["server", "tree", "sharded", "allgather"], 5: ["server", "tree"]}


@pytest.mark.parametrize("n", sorted(OPTIM_CASES))
def test_signum_matches_simulated_workers(n):
    out = mpirun.run(n, "optim_check.py", ",".join(OPTIM_CASES[n]), timeout=300)
    for topology in OPTIM_CASES[n]:
        assert f"optim_check {topology} OK on {n} ranks" in out, out[-2000:]


@pytest.mark.parametrize("topology", sorted(mpisign.TOPOLOGIES))
def test_overlap_is_bit_identical_to_blocking(topology):
    out = mpirun.run(4, "overlap_check.py", topology)
    assert f"overlap_check {topology} OK on 4 ranks" in out


def test_overlap_with_the_hierarchical_vote_over_two_nodes():
    """Nodes of 1 and 3 ranks: buckets' votes in flight at once, each with its four phases."""
    out = mpirun.run(4, "overlap_check.py", "hierarchical", "1,3")
    assert "overlap_check hierarchical OK on 4 ranks" in out


@pytest.mark.parametrize("topology", ["server", "tree"])
def test_missing_rank_ends_in_timeout_naming_it(topology):
    out = mpirun.run(3, "stall_check.py", "skip", topology, timeout=90,
                     env={"MPISIGN_TIMEOUT": "4"}, expect_fail=True)
    assert "VoteTimeout" in out, out[-2000:]
    # Whoever waits on the silent rank 2 names it (server: the root; tree: its parent, rank 0);
    # rank 1 waits on rank 0's result and names rank 0.
    assert re.search(r"no message from rank\(s\) \[2\]", out), out[-2000:]
    assert f"{topology} vote at step 2" in out


def test_launcher_reports_where_a_stalled_job_stopped():
    with pytest.raises(AssertionError) as err:
        mpirun.run(2, "stall_check.py", "hang", "server", timeout=15)
    assert "stalled" in str(err.value)
    assert "rank 0 at step 1" in str(err.value) and "rank 1 at step 1" in str(err.value)


@pytest.mark.skipif(shutil.which("g++") is None and not os.environ.get("CXX"),
                    reason="the emulated kernels need a C++ compiler")
@pytest.mark.parametrize("n, topology",
                         [(4, t) for t in sorted(mpisign.TOPOLOGIES)] + [(3, "tree")])
def test_device_resident_words_match_host_words(n, topology):
    """The CUDA-aware GPU path (words, tally and result on the device, tensors handed to MPI),
    with CPU tensors for device ones and the kernels run by the host shim: majority_vote right,
    and Signum bit-identical to the host path."""
    out = mpirun.run(n, "resident_check.py", topology)
    assert f"resident_check {topology} OK on {n} ranks" in out


@pytest.mark.skipif(shutil.which("g++") is None and not os.environ.get("CXX"),
                    reason="the emulated kernels need a C++ compiler")
def test_device_resident_words_through_the_hierarchical_vote_over_two_nodes():
    """Counts of device words added across nodes of 1 and 3 ranks (torch ops on the device)."""
    out = mpirun.run(4, "resident_check.py", "hierarchical", "1,3")
    assert "resident_check hierarchical OK on 4 ranks" in out


DROPIN_CASES = ["compile", "grad_scaler", "isolation", "deepcopy", "vote_loop",
                "signsgd_momentum", "initial_mismatch", "state_gather", "layout_one_rank",
                "hparams_one_rank", "step_mismatch", "none_everywhere", "overlap_two_backwards",
                "monitor_in_header", "overlap_on_a_thread", "nothing_to_optimize",
                "overlap_layout_change", "overlap_grad_changed"]


@pytest.mark.parametrize("case", DROPIN_CASES)
def test_signum_as_a_drop_in_optimizer(case, tmp_path):
    """PyTorch habits on 3 real ranks (tests/mpi/dropin_check.py): one launch per case."""
    out = mpirun.run(3, "dropin_check.py", case, str(tmp_path / "ckpt.pt"), timeout=120)
    assert f"dropin_check {case} OK on 3 ranks" in out


def test_a_failing_launch_names_its_case():
    """tests/mpirun.py's report leads with the case that failed and the rank it failed on."""
    with pytest.raises(AssertionError) as err:
        mpirun.run(2, "case_check.py", timeout=60)
    assert "failed: rank 1 second: AssertionError: deliberate failure on rank 1" in str(err.value)


@pytest.mark.parametrize("n", [2, 3])
def test_an_error_expected_everywhere_is_checked_on_every_rank(n):
    """tests/mpi/common.py's expect_everywhere, which the scripts' argument-error checks use:
    it fails on every rank, naming the ranks that did not raise (or raised another error, or
    another message), and passes only when all did."""
    out = mpirun.run(n, "expect_check.py", timeout=60)
    assert f"expect_check OK on {n} ranks" in out


def test_only_a_launch_that_never_started_is_tried_again():
    """tests/mpirun.py relaunches once when the launcher failed before any rank ran, never when
    a rank ran (that failure is the test's)."""
    refused = "---\nThe PMIx server's listener thread failed to start. We cannot\ncontinue.\n"
    assert mpirun.launch_failed(refused)
    assert not mpirun.launch_failed("@progress rank=0 step=1\n" + refused)
    assert not mpirun.launch_failed("@case rank=1 x\n" + refused)
    assert not mpirun.launch_failed("Traceback ...\nAssertionError: wrong bits\n")
