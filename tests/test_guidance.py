"""The first step's advice (mpisign.optim.guidance): a learning rate no sign method would want
gets one LearningRateWarning; the usual ones get none. On several ranks only rank 0 warns
(tests/test_train.py, test_a_bad_learning_rate_is_warned_once)."""

from __future__ import annotations

import warnings

import pytest
import torch
from mpi4py import MPI

import mpisign
from mpisign.optim.guidance import LR_TO_RMS, LearningRateWarning
from mpisign.train.models import build_model


def cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("cnn", 1, 10, 28)   # the main job's model: weights of RMS 0.0137


def first_step(opt, model) -> list:
    """The warnings of the optimizer's first two steps."""
    x = torch.randn(4, 1, 28, 28)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            opt.zero_grad()
            model(x).sum().backward()
            opt.step()
    return [w for w in caught if issubclass(w.category, LearningRateWarning)]


@pytest.mark.parametrize("make", [
    lambda p: mpisign.Signum(p, lr=1.0, comm=MPI.COMM_SELF),     # Adadelta's default
    lambda p: mpisign.SignSGD(p, lr=0.1, comm=MPI.COMM_SELF),    # SGD's
    lambda p: mpisign.Lion(p, lr=0.05, comm=MPI.COMM_SELF),
], ids=["signum-1.0", "signsgd-0.1", "lion-0.05"])
def test_an_sgd_like_learning_rate_is_warned_once(make):
    model = cnn()
    caught = first_step(make(model.parameters()), model)
    assert len(caught) == 1, [str(w.message) for w in caught]
    text = str(caught[0].message)
    assert "lr is the step itself" in text and "Signum 1e-4 to 1e-3" in text, text
    assert "Lion 3e-5 to 3e-4" in text


@pytest.mark.parametrize("make", [
    lambda p: mpisign.Signum(p, lr=1e-3, comm=MPI.COMM_SELF),    # the main job's
    lambda p: mpisign.Signum(p, lr=1e-4, comm=MPI.COMM_SELF),    # the README's
    lambda p: mpisign.Lion(p, lr=1e-4, comm=MPI.COMM_SELF),      # Lion's default
    lambda p: mpisign.Signum(p, lr=3e-3, comm=MPI.COMM_SELF),    # trained (81% at 150 steps)
], ids=["signum-1e-3", "signum-1e-4", "lion-1e-4", "signum-3e-3"])
def test_the_usual_learning_rates_are_not_warned(make):
    model = cnn()
    assert first_step(make(model.parameters()), model) == []


def test_the_bound_is_relative_to_the_parameters_it_moves():
    rms = 0.0137   # about the CNN's
    model = cnn()
    measured = torch.cat([p.detach().flatten() for p in model.parameters()]).square().mean().sqrt()
    assert abs(float(measured) - rms) < 1e-3
    below = mpisign.Signum(model.parameters(), lr=0.9 * LR_TO_RMS * float(measured),
                           comm=MPI.COMM_SELF)
    assert first_step(below, model) == []
    model = cnn()
    above = mpisign.Signum(model.parameters(), lr=1.1 * LR_TO_RMS * float(measured),
                           comm=MPI.COMM_SELF)
    assert len(first_step(above, model)) == 1


def test_a_group_of_zeros_says_nothing_and_groups_are_named():
    model = cnn()
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    weights = [p for n, p in model.named_parameters() if not n.endswith("bias")]
    for b in biases:
        torch.nn.init.zeros_(b)
    opt = mpisign.Signum([{"params": biases, "lr": 1.0}, {"params": weights}], lr=1e-3,
                         comm=MPI.COMM_SELF)
    assert first_step(opt, model) == []   # all-zero biases: no scale to judge lr against
    model2 = cnn()
    opt = mpisign.Signum([{"params": list(model2.parameters())[:1], "lr": 1e-3},
                          {"params": list(model2.parameters())[1:], "lr": 1.0}],
                         lr=1e-3, comm=MPI.COMM_SELF)
    caught = first_step(opt, model2)
    assert len(caught) == 1 and "param_groups[1]'s lr=1" in str(caught[0].message)
