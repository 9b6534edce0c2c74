"""mpisign.ddp: the DDP communication hook, over a torch.distributed process group and over MPI,
against mpisign.Signum bit for bit on real ranks (tests/mpi/ddp_check.py), the example under
torchrun and under mpisign.launch, and its bad input."""

import os
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import mpirun
import mpisign.ddp
from mpisign.collectives.torchdist import make_group_vote

REPO = Path(__file__).resolve().parent.parent
DATA = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.parametrize("ranks, transport, topology, rule", [
    (3, "group", "server", "signum"), (3, "mpi", "server", "signum"),
    (4, "group", "allgather", "signum"), (3, "mpi", "tree", "signum"),
    (3, "group", "tree", "lion"), (4, "group", "sharded", "lion"),
    (3, "mpi", "sharded", "lion")])
def test_the_hook_steps_as_the_optimizer_does_bit_for_bit(ranks, transport, topology, rule):
    """mpisign.Signum's (mpisign.Lion's) parameters: one bucket, buckets rebuilt after the
    first step, no_sync accumulation, find_unused_parameters, a checkpoint and restart,
    gradient_as_bucket_view + static_graph, a GradScaler, torch.compile of the DDP model."""
    out = mpirun.run(ranks, "ddp_check.py", transport, topology, rule, timeout=300)
    assert f"ddp_check OK on {ranks} ranks: {transport} {topology} {rule}" in out


@pytest.mark.parametrize("transport", ["group", "mpi"])
def test_a_rank_whose_hook_state_is_of_another_step_raises_on_every_rank(transport):
    """A restart from two checkpoints: the layout check (shapes, dtypes, step) of each new
    bucket names the rank; DDP itself checks the shapes when it is made."""
    out = mpirun.run(3, "ddp_check.py", transport, "mismatch", timeout=180)
    assert f"ddp_check OK on 3 ranks: {transport} mismatch signum" in out


def losses(out: str) -> list:
    return re.findall(r"step \d+: loss [0-9.]+", out)


@pytest.mark.skipif(not DATA.exists(), reason="Debian's dataset-fashion-mnist is not installed")
def test_the_example_under_torchrun_and_under_mpi_gives_the_same_losses():
    """A torchrun job with gloo and no MPI, and the same script under mpisign.launch voting
    over MPI: the same vote, so the same losses, digit for digit."""
    args = ["examples/ddp_signum.py", "--max-steps", "50", "--test-limit", "200"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    torchrun = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                               "3", *args], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=300)
    assert torchrun.returncode == 0, torchrun.stderr[-3000:]
    assert "test accuracy after 50 steps on 3 ranks (group)" in torchrun.stdout
    launched = subprocess.run([sys.executable, "-m", "mpisign.launch", "-n", "3", "--", "python",
                               *args, "--transport", "mpi"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    assert "test accuracy after 50 steps on 3 ranks (mpi)" in launched.stdout
    assert losses(torchrun.stdout) == losses(launched.stdout) != [], (torchrun.stdout,
                                                                      launched.stdout)


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1, timeout=timedelta(seconds=30))
    yield
    dist.destroy_process_group()


def test_a_group_of_one_rank_is_refused(one_rank_group):
    with pytest.raises(ValueError, match="one rank: there is no vote"):
        mpisign.ddp.SignumState()


def test_a_topology_a_group_cannot_carry_is_refused(one_rank_group):
    for topology in ("hierarchical", "auto"):
        with pytest.raises(ValueError, match="cannot run over a torch.distributed process"):
            make_group_vote(topology=topology)


def test_a_state_made_before_the_group_binds_it_at_its_first_bucket(tmp_path):
    """Lightning makes its DDPStrategy's ddp_comm_state before the process group: the state
    checks its own options at once, and binds the group at the first bucket (here a group of
    one rank, which it then refuses, from DDP's backward)."""
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="cannot run over a torch.distributed process"):
        mpisign.ddp.SignumState(topology="hierarchical")
    state = mpisign.ddp.SignumState()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1, timeout=timedelta(seconds=30))
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 2))
        ddp.register_comm_hook(state, mpisign.ddp.signum_hook)
        with pytest.raises(Exception, match="one rank: there is no vote"):
            ddp(torch.ones(4, 3)).sum().backward()
    finally:
        dist.destroy_process_group()


def test_bad_hyperparameters_are_refused_before_any_communication():
    assert not dist.is_initialized()   # the checks come before the transport's
    with pytest.raises(ValueError, match="momentum"):
        mpisign.ddp.SignumState(momentum=1.0)
    with pytest.raises(ValueError, match=r"betas\[1\]"):
        mpisign.ddp.LionState(betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="betas must be a pair"):
        mpisign.ddp.LionState(betas=0.9)
    with pytest.raises(ValueError, match="grad_scaler must be a torch.amp.GradScaler"):
        mpisign.ddp.LionState(grad_scaler=2.0 ** 16)
