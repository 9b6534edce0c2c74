"""Checkpoints are data, never code: what mpisign.train.checkpoint loads, refuses and restores.

A poisoned file is a pickle whose unpickling would call ``os.system`` (it would create a marker
file): every loader must refuse it by name, and the marker must not appear.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

import mpirun
from mpisign.train import checkpoint


class Poison:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_capture_and_restore_round_trip_through_a_data_only_file(tmp_path):
    torch.save({"rng": checkpoint.capture_rng()}, tmp_path / "own.pt")
    first = (random.random(), np.random.rand(), torch.rand(2))
    checkpoint.restore_rng(checkpoint.load_file(tmp_path / "own.pt")["rng"])
    again = (random.random(), np.random.rand(), torch.rand(2))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])


def test_an_old_checkpoint_with_numpy_rng_state_still_loads(tmp_path):
    """Before this rule, capture_rng stored np.random.get_state() as is: a numpy array."""
    old = {"python": random.getstate(), "numpy": np.random.get_state(),
           "torch": torch.get_rng_state()}
    torch.save({"rng": old, "config": {"lr": 1e-3, "lr_decay_epochs": []}}, tmp_path / "old.pt")
    expected = np.random.rand(4)
    checkpoint.restore_rng(checkpoint.load_file(tmp_path / "old.pt")["rng"])
    assert np.array_equal(np.random.rand(4), expected)


@pytest.mark.parametrize("payload", ["poison", "object-array", "list", "garbage"])
def test_anything_but_plain_data_is_refused_by_name(tmp_path, payload):
    marker = tmp_path / "PWNED"
    path = tmp_path / "common.pt"
    if payload == "garbage":
        path.write_bytes(b"not a torch file")
    else:
        obj = {"poison": {"model": Poison(marker)},
               "object-array": {"a": np.array([1, "x"], dtype=object)},
               "list": [torch.zeros(1)]}[payload]
        torch.save(obj, path)
    with pytest.raises(checkpoint.CheckpointError, match=str(path)):
        checkpoint.load_file(path)
    assert not marker.exists()


def test_resume_from_a_poisoned_rank_file_stops_every_rank(tmp_path):
    """2 real ranks: a run, then someone else's rank-00001.pt; --resume must refuse it on
    every rank (exit 2, named), run nothing, and leave the run as it was."""
    out, marker = tmp_path / "run", tmp_path / "PWNED"
    common = ["--dataset", "digits", "--no-progress", "--out", str(out)]
    run = mpirun.mpiexec_command(2, [sys.executable, "-m", "mpisign.train", *common,
                                     "--max-steps", "3"])
    subprocess.run(run, env=mpirun.mpi_env(), check=True, capture_output=True, timeout=120)
    where = checkpoint.latest(out)
    torch.save({"rank": 1, "optimizer": Poison(marker)}, where / "rank-00001.pt")
    before = (out / "metrics.jsonl").read_text()
    resume = mpirun.mpiexec_command(2, [sys.executable, "-m", "mpisign.train", *common,
                                        "--max-steps", "6", "--resume"])
    proc = subprocess.run(resume, env=mpirun.mpi_env(), capture_output=True, text=True,
                          timeout=120)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text
    assert "rank-00001.pt is not a checkpoint" in text and "posix.system" in text, text
    assert not marker.exists()
    assert (out / "metrics.jsonl").read_text() == before
    assert checkpoint.latest(out) == where


def test_diagnostics_refuses_a_poisoned_checkpoint(tmp_path):
    marker = tmp_path / "PWNED"
    torch.save({"model": Poison(marker), "step": 0}, tmp_path / "common.pt")
    proc = subprocess.run([sys.executable, "-m", "mpisign.diagnostics", "--checkpoint",
                           str(tmp_path / "common.pt"), "--out", str(tmp_path / "diag")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "is not a checkpoint" in proc.stderr and not marker.exists()
