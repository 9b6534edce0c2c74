"""mpisign.Lion: on one rank it is Lion (the published PyTorch Lion, bit for bit); on M real
ranks it is Distributed Lion with a majority vote (tests/mpi/lion_check.py, against a replay of
every rank); its compiled one-pass kernels equal the reference path bit for bit."""

import copy
import re

import pytest
import torch
from mpi4py import MPI

import mpirun
import mpisign
from mpisign.backends import native
from mpisign.backends.host import CompiledSigns, HostSigns
from mpisign.backends.packing import n_words
from mpisign.optim.lion import LionRule



@pytest.fixture
def lion_pytorch():
    """PyPI's lion-pytorch (a test dependency, setup.py's extra "test")."""
    return pytest.importorskip("lion_pytorch")


def _params(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1000, 37, generator=gen, dtype=dtype),   # 37,000: not a word multiple
            torch.randn(513, generator=gen, dtype=dtype), torch.randn((), dtype=dtype)]


def _grads(params, step, seed=1):
    gen = torch.Generator().manual_seed(1000 * seed + step)
    return [torch.randn(p.shape, generator=gen, dtype=p.dtype) * (1 + step % 3) for p in params]


def _side_by_side(make_ours, make_theirs, steps=40, dtype=torch.float32):
    """The same gradients into both optimizers; both after ``steps`` steps, and how many
    coordinates of Lion's ``c`` were exactly 0 on the way: there ``sign(0) = 0`` leaves the
    parameter alone, in both (bfloat16 rounds ``c`` to 0 about 3 times in 10^6 here; float32
    not once in these tests)."""
    base = _params(dtype)
    ours = [p.clone().requires_grad_() for p in base]
    theirs = [p.clone().requires_grad_() for p in base]
    a, b = make_ours(ours), make_theirs(theirs)
    zeros = 0
    for step in range(steps):
        for x, y, g in zip(ours, theirs, _grads(base, step)):
            x.grad, y.grad = g.clone(), g.clone()
        exact_zeros = [_c(b, y) == 0 for y in theirs]
        a.step()
        b.step()
        zeros += sum(int(z.sum()) for z in exact_zeros)
    return (a, ours), (b, theirs), zeros


def _c(opt, p):
    """Lion's c = b1 m + (1 - b1) g before the step, from the published Lion's own state."""
    m = opt.state[p].get("exp_avg", torch.zeros_like(p))
    return m.mul(0.9).add(p.grad, alpha=0.1)


@pytest.mark.parametrize("weight_decay", [0.0, 0.3])
@pytest.mark.parametrize("kernels", ["compiled", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16,
                                   torch.float16])
def test_one_rank_equals_lion_pytorch_bit_for_bit(weight_decay, kernels, dtype, monkeypatch,
                                                  lion_pytorch):
    """PyPI's lion-pytorch (lucidrains), the PyTorch Lion users install: equal parameters and
    momenta after 40 steps, through the fused one-pass kernel and through the rule's torch ops."""
    if kernels == "reference":
        monkeypatch.setenv("MPISIGN_KERNELS", "reference")
    elif not native.available():
        pytest.skip("compiled kernels not built")
    (ours, a), (theirs, b), zeros = _side_by_side(
        lambda ps: mpisign.Lion(ps, lr=1e-3, betas=(0.9, 0.99), weight_decay=weight_decay,
                                comm=MPI.COMM_SELF),
        lambda ps: lion_pytorch.Lion(ps, lr=1e-3, betas=(0.9, 0.99), weight_decay=weight_decay),
        dtype=dtype)
    assert zeros == 0 or dtype in (torch.bfloat16, torch.float16), zeros
    # The kernel is planned where it was built; it declines bfloat16 (the rule's ops run).
    assert (ours.engine.plan.fused is not None) == (kernels == "compiled")
    for x, y in zip(a, b):
        assert torch.equal(x, y), f"off by {(x - y).abs().max().item()}"
        assert torch.equal(ours.state[x]["exp_avg"], theirs.state[y]["exp_avg"])


def test_one_rank_equals_lion_pytorch_under_grad_scaler(lion_pytorch):
    """GradScaler's scale is a power of two: the rule unscales inside its update, exactly."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.Tanh(), torch.nn.Linear(30, 1))
    twin = copy.deepcopy(model)
    ours = mpisign.Lion(model.parameters(), lr=1e-3, weight_decay=0.1, comm=MPI.COMM_SELF)
    theirs = lion_pytorch.Lion(twin.parameters(), lr=1e-3, weight_decay=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for step in range(15):
        x = torch.randn(16, 20, generator=torch.Generator().manual_seed(step))
        ours.zero_grad()
        scaler.scale(model(x).pow(2).mean()).backward()
        scaler.step(ours)
        scaler.update()
        theirs.zero_grad()
        twin(x).pow(2).mean().backward()
        theirs.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_one_rank_against_timm_lion_says_where_they_differ():
    """timm's Lion decays its momentum with ``lerp_`` (m + (1 - b2) (g - m)): one rounding
    apart from ``m * b2 + (1 - b2) g``. The first step is equal bit for bit (m = 0); after 40
    steps the momenta differ in their last bits almost everywhere (33,229 of 37,514 here), and
    a parameter can differ only where that flipped a sign (none did here): at most 1 in 1,000,
    each by a whole number of 2 lr steps."""
    timm_optim = pytest.importorskip("timm.optim")
    lr = 2.0**-10
    (ours, a), (theirs, b), _ = _side_by_side(
        lambda ps: mpisign.Lion(ps, lr=lr, comm=MPI.COMM_SELF),
        lambda ps: timm_optim.Lion(ps, lr=lr), steps=1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    (ours, a), (theirs, b), zeros = _side_by_side(
        lambda ps: mpisign.Lion(ps, lr=lr, comm=MPI.COMM_SELF),
        lambda ps: timm_optim.Lion(ps, lr=lr), steps=40)
    assert zeros == 0
    differ = sum(int((x != y).sum()) for x, y in zip(a, b))
    total = sum(x.numel() for x in a)
    assert differ < 1e-3 * total, (differ, total)
    for x, y in zip(a, b):
        steps = (x.double() - y.double()) / (2 * lr)
        assert torch.allclose(steps, steps.round(), atol=1e-2)


def test_one_rank_against_the_papers_program():
    """The paper's Program 1 (Chen et al. 2023), the form google/automl's lion_pytorch.py
    writes: ``update = m * b1 + g * (1 - b1)``, two products and a sum each rounded, where
    torch's add with alpha may be one FMA. A sign differs only where c is within a rounding of
    0: not once in 40 steps of 38,000 coordinates."""
    def program_1(params, lr, b1, b2, wd, grads_by_step):
        ms = [torch.zeros_like(p) for p in params]
        for grads in grads_by_step:
            for p, m, g in zip(params, ms, grads):
                p.mul_(1 - lr * wd)
                update = m * b1 + g * (1 - b1)
                p.add_(torch.sign(update), alpha=-lr)
                m.mul_(b2).add_(g, alpha=1 - b2)
        return params

    base = _params()
    ours = [p.clone().requires_grad_() for p in base]
    opt = mpisign.Lion(ours, lr=1e-3, weight_decay=0.2, comm=MPI.COMM_SELF)
    for step in range(40):
        for p, g in zip(ours, _grads(base, step)):
            p.grad = g
        opt.step()
    want = program_1([p.clone() for p in base], 1e-3, 0.9, 0.99, 0.2,
                     [_grads(base, s) for s in range(40)])
    assert all(torch.equal(p.detach(), q) for p, q in zip(ours, want))


@pytest.mark.skipif(not native.available(), reason="compiled kernels not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [0, 1, 63, 64, 65, 1000, 4099])
def test_the_fused_kernel_equals_the_rules_torch_ops(dtype, n):
    """One pass (update, scrub, pack) against the rule's own send plus the reference pack, with
    NaN and inf gradients and exact zeros (both zero bits), ragged lengths, GradScaler's scale."""
    gen = torch.Generator().manual_seed(n)
    g = torch.randn(n, generator=gen, dtype=dtype)
    m = torch.randn(n, generator=gen, dtype=dtype)
    if n > 10:
        g[3], g[4], g[5] = float("nan"), float("inf"), -float("inf")
        g[7], m[7] = 0.0, 0.0   # c = 0: the zero bit
    rule, host = LionRule(), HostSigns()
    group = dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0)
    for zero_bit in (0, 1):
        for scale in (1.0, 2.0**-7):
            want_m = m.clone()
            clean = torch.nan_to_num(g, 0.0, 0.0, 0.0)
            sources, _ = rule.send([want_m], [clean], {want_m: {"exp_avg": want_m}}, group, scale)
            want = host.words(n_words(n))
            host.pack(sources[0], zero_bit, want)
            got_m, got = m.clone(), host.words(n_words(n))
            bad = CompiledSigns().lion_update_and_pack([g], [got_m], 0.9, 0.1 * scale, 0.99,
                                                       (1 - 0.99) * scale, zero_bit, [got])
            assert bad == (3 if n > 10 else 0)
            assert (got == want).all()
            assert torch.equal(got_m, want_m)


@pytest.mark.skipif(not native.available(), reason="compiled kernels not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_apply_decayed_equals_torch(dtype):
    """p = p * d - lr * v in one pass, against torch's p.mul_(d); p.add_(v, alpha=-lr)."""
    n = 1000
    gen = torch.Generator().manual_seed(5)
    p = torch.randn(n, generator=gen, dtype=dtype)
    p[:4] = torch.tensor([0.0, -0.0, 1e-30, -1e30], dtype=dtype)
    v = torch.randint(-1, 2, (n,), generator=gen).to(dtype)
    plus = torch.zeros(n_words(n) * 64, dtype=torch.bool)
    plus[:n] = v > 0
    tie = torch.zeros_like(plus)
    tie[:n] = v == 0
    as_words = lambda bits: (bits.view(-1, 64).long() << torch.arange(64)).sum(1).numpy().view(
        "uint64").copy()
    for lr, decay in [(1e-3, 1 - 1e-3 * 0.1), (2.0**-7, 1.0), (0.3, 0.5)]:
        want = p.clone().mul_(decay).add_(v, alpha=-lr)
        got = p.clone()
        CompiledSigns().apply_decayed(got, as_words(plus), as_words(tie), lr, decay)
        assert torch.equal(got, want), (lr, decay)


def test_books_and_protocol():
    """What a torch.optim user expects: defaults, betas in param groups and state_dict, a
    deepcopy that steps on its own, a compiled step, repr."""
    p = torch.nn.Parameter(torch.randn(10))
    opt = mpisign.Lion([p], lr=3e-4, betas=(0.95, 0.98), weight_decay=0.5, comm=MPI.COMM_SELF)
    assert opt.defaults["betas"] == (0.95, 0.98) and "Lion" in repr(opt)
    p.grad = torch.randn(10)
    torch.compile(opt.step)()
    assert set(opt.state[p]) == {"exp_avg"}
    sd = opt.state_dict()
    clone = copy.deepcopy(opt)
    q = clone.param_groups[0]["params"][0]
    q.grad = p.grad.clone()
    clone.step()
    opt.step()
    assert torch.equal(p, q)
    fresh = mpisign.Lion([torch.nn.Parameter(torch.zeros(10))], comm=MPI.COMM_SELF)
    fresh.load_state_dict(sd)
    assert fresh.param_groups[0]["betas"] == (0.95, 0.98)


@pytest.mark.parametrize("bad, match", [
    (dict(betas=(1.0, 0.99)), r"betas\[0\] must be in \[0, 1\)"),
    (dict(betas=(0.9, -0.01)), r"betas\[1\] must be in \[0, 1\)"),
    (dict(betas=0.9), r"betas must be a pair"),
    (dict(lr=-1e-4), r"lr must be a finite number >= 0"),
    (dict(weight_decay=-0.1), r"weight_decay must be a finite number >= 0"),
])
def test_bad_hyperparameters_are_refused_before_anything_moves(bad, match):
    with pytest.raises(ValueError, match=match):
        mpisign.Lion([torch.nn.Parameter(torch.zeros(3))], comm=MPI.COMM_SELF, **bad)
    p = torch.nn.Parameter(torch.zeros(3))
    opt = mpisign.Lion([p], comm=MPI.COMM_SELF)
    key = next(iter(bad))
    opt.param_groups[0][key] = bad[key]   # a scheduler's write: refused at the step
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match=match):
        opt.step()
    assert torch.equal(p.detach(), torch.zeros(3))


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_distributed_lion_equals_a_replay_of_every_rank(n):
    """Every topology, overlap off and on, on n real ranks."""
    topologies = sorted(mpisign.TOPOLOGIES)
    out = mpirun.run(n, "lion_check.py", *topologies, timeout=300)
    assert f"lion_check OK on {n} ranks: {' '.join(topologies)}" in out


def test_a_rank_that_writes_betas_alone_is_named_on_every_rank():
    out = mpirun.run(3, "lion_check.py", "mismatch", timeout=120)
    assert "lion_check OK on 3 ranks: mismatch" in out


def test_every_ranks_state_through_a_checkpoint_resumes_the_run_exactly():
    out = mpirun.run(3, "lion_check.py", "resume", timeout=120)
    assert "lion_check OK on 3 ranks: resume" in out


@pytest.mark.parametrize("topology, kill", [("server", "0@3"), ("server", "1@3"),
                                            ("sharded", "2@4")])
def test_elastic_lion_survivors_equal_the_replay(topology, kill):
    """A rank SIGKILLed under ULFM (the server itself, a rank that has a gradient the even
    ranks lack, a shard owner): the survivors redo the step and equal the replay without it."""
    out = mpirun.run(4, "lion_check.py", "elastic", topology, kill, elastic=True, timeout=180)
    victim = int(kill.split("@")[0])
    survivors = sorted(int(r) for r in re.findall(r"@survivor rank=(\d+)", out))
    assert survivors == [r for r in range(4) if r != victim], out[-3000:]
