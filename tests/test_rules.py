"""Rules on the vote engine: a rule's math is its own, the fused kernel belongs to one rule,
and a new rule written by the engine's recipe alone votes on real ranks."""

import torch

import mpisign
import mpirun
from mpisign.optim.rules import Rule, SignumRule


def test_a_toy_rule_through_the_recipe_on_three_ranks():
    topologies = sorted(mpisign.TOPOLOGIES)
    out = mpirun.run(3, "rule_check.py", *topologies, timeout=300)
    assert f"rule_check OK on 3 ranks: {' '.join(topologies)}" in out


class Doubled(SignumRule):
    """Signum's rule with its own send: votes with twice the momentum (the same sign) minus a
    fixed offset, so that its result differs from Signum's wherever the offset wins."""

    def send(self, params, grads, state, group, scale):
        sources, after = super().send(params, grads, state, group, scale)
        return [2 * s - 0.25 for s in sources], after


def _run(rule_or_none, grads):
    p = torch.nn.Parameter(torch.zeros(257))
    if rule_or_none is None:
        opt = mpisign.Signum([p], lr=0.5, momentum=0.5)
    else:
        opt = mpisign.optim.books.SignOptimizer(
            [p], dict(lr=0.5, momentum=0.5, weight_decay=0.0), rule_or_none)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return opt, p.detach().clone()


def test_a_rule_that_changes_send_never_gets_the_fused_kernel():
    """The bug this layering fixed: a subclass's math was bypassed by Signum's fused kernel on
    CPU float32. Now the kernel is Signum's rule's alone, and the subclass's send runs."""
    grads = [torch.randn(257, generator=torch.Generator().manual_seed(k)) * 0.1 for k in range(4)]
    signum, p_signum = _run(None, grads)
    doubled, p_doubled = _run(Doubled(), grads)
    if mpisign.backends.native.available():
        assert signum.engine.plan.fused is not None
    assert doubled.engine.plan.fused is None
    # The reference, computed here: Signum's momentum, then sign(2 m - 0.25).
    m, want = torch.zeros(257), torch.zeros(257)
    for g in grads:
        m = 0.5 * m + 0.5 * g
        want -= 0.5 * torch.sign(2 * m - 0.25)
    assert torch.equal(p_doubled, want)
    assert not torch.equal(p_doubled, p_signum)


def test_the_rule_names_the_hyperparameters_the_header_compares():
    class Two(Rule):
        hparams = ("lr", "beta")

    group = {"lr": 0.1, "beta": torch.tensor(0.5)}
    assert Two().values(group) == [0.1, 0.5]
    opt = mpisign.optim.books.SignOptimizer([torch.nn.Parameter(torch.zeros(3))],
                                            dict(lr=0.1, weight_decay=0.0), Rule())
    before = opt.engine.hparams_digest()
    opt.param_groups[0]["weight_decay"] = 0.01
    assert opt.engine.hparams_digest() != before
