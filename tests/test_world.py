"""Silent singletons: a launcher that started N tasks, each alone in a COMM_WORLD of size 1.

The pytest process is itself a size-1 COMM_WORLD (an MPI singleton), so setting a launcher's
variables around it reproduces exactly what each task of a mismatched launch sees. The real
thing, ``srun --mpi=none``, is in tests/test_slurm.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
from mpi4py import MPI

import mpisign
from mpisign.mpi.world import (ALLOW_SINGLETON, LAUNCHER_SIZE_VARS, SingletonWorld, check_world,
                               launched_tasks)

LAUNCHER_VARS = (*LAUNCHER_SIZE_VARS, ALLOW_SINGLETON, "SLURM_NTASKS")


@pytest.fixture
def bare_env(monkeypatch):
    """No launcher variables, whatever ran pytest."""
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_the_mpi_launchers_figure_wins_over_slurms():
    # mpirun inside an allocation: its daemons' srun step has one task per node.
    env = {"SLURM_STEP_NUM_TASKS": "2", "OMPI_COMM_WORLD_SIZE": "8"}
    assert launched_tasks(env) == (8, "OMPI_COMM_WORLD_SIZE")
    assert launched_tasks({"PMI_SIZE": "4", "SLURM_STEP_NUM_TASKS": "4"}) == (4, "PMI_SIZE")
    assert launched_tasks({"SLURM_STEP_NUM_TASKS": "3"}) == (3, "SLURM_STEP_NUM_TASKS")
    assert launched_tasks({"SLURM_NTASKS": "3"}) is None   # a batch script's shell, not a task
    assert launched_tasks({"OMPI_COMM_WORLD_SIZE": "x", "PMI_SIZE": "2"}) == (2, "PMI_SIZE")
    assert launched_tasks({}) is None


@pytest.mark.parametrize("name", LAUNCHER_SIZE_VARS)
def test_a_size_1_world_under_a_launcher_of_3_is_refused(name):
    assert MPI.COMM_WORLD.Get_size() == 1
    with pytest.raises(SingletonWorld, match=rf"started 3 tasks \({name}=3\).*srun --mpi=pmix"):
        check_world(MPI.COMM_WORLD, {name: "3"})


@pytest.mark.parametrize("env", [{}, {"SLURM_STEP_NUM_TASKS": "1"},
                                 {"SLURM_STEP_NUM_TASKS": "3", ALLOW_SINGLETON: "1"}],
                         ids=["no-launcher", "one-task", "override"])
def test_single_rank_runs_that_are_meant_pass(env, bare_env):
    assert check_world(MPI.COMM_WORLD, env) is None
    # ... and, launched so, the rank votes alone: its result is its own signs.
    for name, value in env.items():
        bare_env.setenv(name, value)
    x = torch.tensor([0.5, -2.0, 3.0])
    assert torch.equal(mpisign.majority_vote(x, MPI.COMM_WORLD, step=0), torch.sign(x))


def test_other_communicators_are_the_users_choice(bare_env):
    launched = {"SLURM_STEP_NUM_TASKS": "3"}
    with pytest.raises(SingletonWorld):   # COMM_WORLD itself, in the same launch: refused
        check_world(MPI.COMM_WORLD, launched)
    bare_env.setenv("SLURM_STEP_NUM_TASKS", "3")
    x = torch.tensor([0.5, -2.0, 3.0])
    assert check_world(MPI.COMM_SELF, launched) is None
    assert torch.equal(mpisign.majority_vote(x, MPI.COMM_SELF, step=0), torch.sign(x))
    dup = MPI.COMM_WORLD.Dup()
    try:
        assert check_world(dup, launched) is None
        assert torch.equal(mpisign.majority_vote(x, dup, step=0), torch.sign(x))
    finally:
        dup.Free()


def test_signum_and_majority_vote_refuse_before_any_communication(bare_env):
    bare_env.setenv("SLURM_STEP_NUM_TASKS", "4")
    p = torch.nn.Parameter(torch.ones(5))
    with pytest.raises(SingletonWorld):
        mpisign.Signum([p], lr=0.1)                       # comm defaults to COMM_WORLD
    with pytest.raises(SingletonWorld):
        mpisign.majority_vote(torch.ones(5), MPI.COMM_WORLD)
    assert torch.equal(mpisign.majority_vote(torch.ones(3), MPI.COMM_SELF, step=0),
                       torch.ones(3))
    bare_env.setenv(ALLOW_SINGLETON, "1")
    mpisign.Signum([p], lr=0.1)


def test_train_refuses_within_seconds_and_writes_nothing(tmp_path):
    """A real process, as one task of `srun --mpi=pmi2 -n 3` with an Open MPI build sees it."""
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(PMI_SIZE="3", PMI_RANK="1", OMP_NUM_THREADS="1")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "mpisign.train", "--dataset", "digits",
                           "--out", str(out)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "PMI_SIZE=3" in proc.stderr and "MPISIGN_ALLOW_SINGLETON" in proc.stderr
    assert "usage:" not in proc.stderr   # not a usage error: the message alone
    assert not out.exists()
    assert time.monotonic() - t0 < 60
