"""torch.distributed as mpisign's second transport, on 3 and 4 real ranks over gloo:
majority_vote(x, comm=process_group) against numpy and against the same call over MPI
(tests/mpi/group_vote_check.py); Signum, SignSGD and Lion with comm=process_group against the
same optimizers over MPI, bit for bit, with their header's errors (tests/mpi/group_optim_check.py);
and the refusals on one process. (The DDP hook over a group: tests/test_ddp.py.)"""

import os
import re
import subprocess
import sys
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import mpirun
from mpisign import majority_vote


@pytest.mark.parametrize("ranks", [3, 4])
def test_the_vote_over_a_process_group_is_numpys_and_mpis(ranks):
    out = mpirun.run(ranks, "group_vote_check.py", timeout=300)
    assert f"group_vote_check OK on {ranks} ranks" in out


@pytest.mark.parametrize("ranks, topology", [(3, "server"), (4, "allgather"), (4, "tree"),
                                             (3, "sharded")])
def test_the_optimizers_over_a_process_group_step_as_over_mpi(ranks, topology):
    out = mpirun.run(ranks, "group_optim_check.py", topology, timeout=300)
    assert f"group_optim_check OK on {ranks} ranks: {topology}" in out


@pytest.mark.parametrize("ranks", [3, 4])
def test_signum_under_torchrun_with_no_mpi_launcher_is_a_plain_torch_reference(ranks):
    """torchrun's own process group, every process an MPI singleton: Signum over the group
    against plain torch recomputing every rank's gradients and voting them in numpy."""
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                             str(ranks), "torchrun_optim.py"], cwd=mpirun.SCRIPTS,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        mpirun.kill_job(proc)
        raise
    assert proc.returncode == 0, out[-3000:]
    assert sorted(re.findall(r"torchrun_optim OK on rank (\d+) of", out)) == [
        str(r) for r in range(ranks)], out[-3000:]


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1, timeout=timedelta(seconds=30))
    yield dist.group.WORLD
    dist.destroy_process_group()


def test_a_group_of_one_rank_gives_the_sign(one_rank_group):
    x = torch.tensor([2.0, -3.0, 0.0, float("nan")])
    assert majority_vote(x, comm=one_rank_group).tolist() == [1.0, -1.0, 0.0, 0.0]


def test_bad_input_over_a_group_is_refused_before_any_communication(one_rank_group):
    with pytest.raises(ValueError, match="floating dtype"):
        majority_vote(torch.ones(3, dtype=torch.int64), comm=one_rank_group)
    with pytest.raises(ValueError, match="topology must be one of"):
        majority_vote(torch.ones(3), comm=one_rank_group, topology="hierarchical")
    with pytest.raises(ValueError, match="quorum= needs"):
        majority_vote(torch.ones(3), comm=one_rank_group, quorum=1)


def test_an_optimizer_over_a_group_of_one_rank_steps_alone(one_rank_group):
    """One rank: no vote, the sign itself, as over a one-rank MPI communicator."""
    import mpisign
    p = torch.nn.Parameter(torch.tensor([1.0, 1.0, 1.0]))
    opt = mpisign.SignSGD([p], lr=0.5, comm=one_rank_group)
    p.grad = torch.tensor([2.0, -3.0, 0.0])
    opt.step()
    assert p.tolist() == [0.5, 1.5, 1.0]
