"""mpisign.train.adversary: each blind multiplicative attack does what its table row says."""

import pytest
import torch

from mpisign.train.adversary import ATTACKS, attack_gradients, make_attack


def grad():
    return torch.tensor([1.5, -2.0, 0.0, 3.0, -0.25])


def test_invert_scale_zero():
    g = grad()
    make_attack("invert")(g)
    assert torch.equal(g, -grad())
    g = grad()
    make_attack("scale", factor=1e20)(g)
    assert torch.equal(torch.sign(g), torch.sign(grad())) and g.abs().max() > 1e20
    g = grad()
    make_attack("zero")(g)
    assert not g.any()


def test_inf_and_nan_make_every_entry_non_finite_or_nan():
    g = grad()
    make_attack("inf")(g)
    assert torch.isinf(g[grad() != 0]).all() and torch.isnan(g[2])   # 0 * inf
    g = grad()
    make_attack("nan")(g)
    assert torch.isnan(g).all()


def test_random_signs_are_seeded_and_fresh_each_call():
    a = make_attack("random", generator=torch.Generator().manual_seed(3))
    b = make_attack("random", generator=torch.Generator().manual_seed(3))
    g1, g2 = torch.ones(1000), torch.ones(1000)
    a(g1)
    b(g2)
    assert torch.equal(g1, g2) and set(g1.tolist()) == {-1.0, 1.0}
    assert abs(g1.mean().item()) < 0.15
    g3 = torch.ones(1000)
    a(g3)
    assert not torch.equal(g1, g3)


def test_attack_gradients_skips_parameters_without_grad():
    p, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    p.grad = torch.ones(3)
    attack_gradients([p, q], make_attack("invert"))
    assert torch.equal(p.grad, -torch.ones(3)) and q.grad is None


def test_bad_names_and_factors():
    with pytest.raises(ValueError, match="attack must be one of"):
        make_attack("flip")
    with pytest.raises(ValueError, match="factor must be > 0"):
        make_attack("scale", factor=-1.0)
    assert set(ATTACKS) >= {"invert", "random", "scale", "inf", "nan", "zero"}
