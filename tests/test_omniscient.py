"""mpisign.train.adversary.Omniscient, the non-blind attack: real ranks, and its argument checks."""

import pytest
from mpi4py import MPI

import mpirun
from mpisign.train.adversary import Omniscient, make_attack
from mpisign.train import main


def test_two_of_five_flip_exactly_the_close_coordinates():
    """Honest splits 3-0 keep their sign, 2-1 flip; Signum adversaries vote minus the honest
    majority of momenta; against the mean they send minus the honest mean."""
    out = mpirun.run(5, "omniscient_check.py", "2", timeout=90)
    assert "omniscient_check OK: 2 of 5 adversaries" in out


@pytest.mark.parametrize("k", [0, 1, -1, 1.0])
def test_needs_an_honest_rank_and_an_adversary(k):
    with pytest.raises(ValueError, match="0 < adversaries < 1"):
        Omniscient(MPI.COMM_SELF, k)


def test_is_not_a_blind_attack():
    with pytest.raises(ValueError, match="not blind"):
        make_attack("omniscient")


def test_train_refuses_omniscient_without_honest_ranks(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--attack", "omniscient", "--adversaries", "1"])
    assert exc.value.code == 2
    assert "--attack omniscient copies the honest ranks" in capsys.readouterr().err

