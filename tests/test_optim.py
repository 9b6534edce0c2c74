"""Signum / SignSGD on one rank (COMM_SELF): the update against a plain-torch reference loop,
the documented rules (zeros, NaN/inf, parameters without a gradient, state_dict), argument
checks, the PyTorch habits on one rank (schedulers, GradScaler, torch.compile, deepcopy,
print), and ``majority_vote`` on one rank.

On real ranks (run by test_vote_mpi.py): the vote against a simulation of every worker
(tests/mpi/optim_check.py), overlap (overlap_check.py), the step header's checks and the
PyTorch habits across ranks (dropin_check.py), the device-resident words (resident_check.py).
"""

import copy
import io
import math
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from mpi4py import MPI

import mpisign
from mpisign import SignSGD, Signum

SELF = MPI.COMM_SELF


def reference_signum(params, grads_per_step, lr, momentum, wd):
    """Single-worker Signum written out longhand: ``sign(0) = 0``, so a coordinate whose
    momentum is exactly 0 does not move (weight decay aside), as in torch's optimizers."""
    params = [p.detach().clone() for p in params]
    mom = [torch.zeros_like(p) for p in params]
    for grads in grads_per_step:
        for p, m, g in zip(params, mom, grads):
            g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
            if momentum:
                m.copy_(momentum * m + (1 - momentum) * g)
                src = m
            else:
                src = g
            v = torch.sign(src)
            p.copy_(p - lr * (v + wd * p))
    return params


def make_params(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(7, 5, generator=g, dtype=dtype)),
            torch.nn.Parameter(torch.randn(13, generator=g, dtype=dtype))]


def random_grads(params, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
            for _ in range(steps)]


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("wd", [0.0, 0.05])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_single_rank_matches_reference(momentum, wd, dtype):
    params = make_params(dtype=dtype)
    grads = random_grads(params, 20)
    grads[3][0][0, 0] = 0.0
    ref = reference_signum(params, grads, lr=0.01, momentum=momentum, wd=wd)
    opt = Signum(params, lr=0.01, momentum=momentum, weight_decay=wd, comm=SELF)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach(), r, rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-6)
    assert opt.stats.bytes_sent == 0 and opt.stats.bytes_received == 0  # no MPI on one rank
    assert opt.stats.steps == 20


def test_param_groups_and_signsgd():
    a, b = make_params()
    grads = random_grads([a, b], 5)
    ra = reference_signum([a], [[g[0]] for g in grads], lr=0.1, momentum=0.0, wd=0.0)
    rb = reference_signum([b], [[g[1]] for g in grads], lr=0.01, momentum=0.0, wd=0.0)
    opt = SignSGD([{"params": [a], "lr": 0.1}, {"params": [b]}], lr=0.01, comm=SELF)
    for gs in grads:
        a.grad, b.grad = gs[0].clone(), gs[1].clone()
        opt.step()
    torch.testing.assert_close(a.detach(), ra[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(b.detach(), rb[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_zero_gradient_does_not_move_a_parameter_on_one_rank(momentum):
    """No vote on one rank: an exact 0 (and a NaN, scrubbed to 0) stays where it is, as in
    torch's optimizers; the alternating zero bit of the vote would move it by lr each step."""
    p = torch.nn.Parameter(torch.linspace(-1, 1, 100))
    before = p.detach().clone()
    opt = Signum([p], lr=1e-3, momentum=momentum, comm=SELF)
    for step in range(20):
        p.grad = torch.zeros(100)
        p.grad[step % 3] = float("nan")
        opt.step()
    assert torch.equal(p.detach(), before)


def test_nonfinite_gradients_never_reach_the_weights():
    p = torch.nn.Parameter(torch.ones(10))
    opt = Signum([p], lr=0.1, momentum=0.9, comm=SELF)
    for step in range(5):
        g = torch.full((10,), 2.0)
        g[0], g[1], g[2] = float("nan"), float("inf"), -float("inf")
        p.grad = g
        opt.step()
        assert torch.isfinite(p).all()
        assert torch.isfinite(opt.state[p]["momentum_buffer"]).all()
    assert opt.stats.nonfinite == 15 and opt.stats.nonfinite_steps == 5
    # Finite coordinates trained normally: 5 steps of -lr.
    torch.testing.assert_close(p.detach()[3:], torch.full((7,), 0.5))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_a_parameter_without_gradient_anywhere_is_not_updated(momentum):
    """As in torch.optim: .grad None on every rank (here the only one) moves nothing, not even
    by weight decay, and leaves the momentum as it was."""
    p, q = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
    frozen = torch.nn.Parameter(torch.ones(3), requires_grad=False)
    opt = Signum([p, q, frozen], lr=0.1, momentum=momentum, weight_decay=0.5, comm=SELF)
    p.grad, q.grad = torch.ones(4), torch.ones(4)
    opt.step()
    moved = q.detach().clone()
    buf = opt.state[q].get("momentum_buffer", torch.zeros(4)).clone()
    q.grad = None
    for _ in range(3):
        p.grad = torch.ones(4)
        opt.step()
    assert torch.equal(q.detach(), moved)
    assert torch.equal(opt.state[q].get("momentum_buffer", torch.zeros(4)), buf)
    assert p.detach()[0] < moved[0]
    torch.testing.assert_close(frozen.detach(), torch.ones(3))  # requires_grad=False: untouched
    fresh = torch.nn.Parameter(torch.ones(2))
    Signum([fresh], lr=0.1, comm=SELF).step()   # a step before any backward moves nothing
    assert torch.equal(fresh.detach(), torch.ones(2))


def test_state_dict_resume_is_exact():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    data = [(torch.randn(8, 6), torch.randn(8, 2)) for _ in range(12)]

    def train(model, opt, batches):
        for x, y in batches:
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()

    straight = copy.deepcopy(model)
    opt = Signum(straight.parameters(), lr=0.01, momentum=0.9, weight_decay=0.01, comm=SELF)
    train(straight, opt, data)

    first = copy.deepcopy(model)
    opt1 = Signum(first.parameters(), lr=0.01, momentum=0.9, weight_decay=0.01, comm=SELF)
    train(first, opt1, data[:5])
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)
    resumed = copy.deepcopy(model)
    resumed.load_state_dict(ckpt["model"])
    opt2 = Signum(resumed.parameters(), lr=0.01, momentum=0.9, weight_decay=0.01, comm=SELF)
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.param_groups[0]["step"] == 5
    train(resumed, opt2, data[5:])
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(opt.state[next(straight.parameters())]["momentum_buffer"],
                       opt2.state[next(resumed.parameters())]["momentum_buffer"])


def test_lr_scheduler_sets_the_step_size():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = SignSGD([p], lr=0.5, comm=SELF)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    moved = []
    for _ in range(3):
        before = p.detach().clone()
        p.grad = torch.ones(3)
        opt.step()
        sched.step()
        moved.append((before - p.detach())[0].item())
    assert moved == [0.5, 0.25, 0.125]


@pytest.mark.parametrize("kwargs, name", [
    (dict(lr=-1.0), "lr"), (dict(lr=math.nan), "lr"), (dict(lr="0.1"), "lr"),
    (dict(lr=torch.ones(2)), "lr"), (dict(momentum=np.float32(1.0)), "momentum"),
    (dict(momentum=1.0), "momentum"), (dict(momentum=-0.1), "momentum"),
    (dict(weight_decay=-1.0), "weight_decay"), (dict(topology="ring"), "topology"),
    (dict(comm="world"), "comm"), (dict(timeout=0), "timeout"),
])
def test_invalid_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Signum([torch.nn.Parameter(torch.ones(2))], **kwargs)


def test_bad_parameters():
    with pytest.raises(ValueError, match="empty"):
        Signum([], comm=SELF)
    with pytest.raises(ValueError, match="lr"):
        opt = Signum([torch.nn.Parameter(torch.ones(2))], comm=SELF)
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "lr": -1.0})
    emb = torch.nn.Embedding(5, 2, sparse=True)
    opt = Signum(emb.parameters(), comm=SELF)
    emb(torch.tensor([1])).sum().backward()
    with pytest.raises(ValueError, match="sparse"):
        opt.step()


def test_public_api_names():
    for name in ["Signum", "SignSGD", "majority_vote", "pack_signs", "unpack_signs"]:
        assert hasattr(mpisign, name)
    assert set(mpisign.TOPOLOGIES) >= {"server", "tree"}


@pytest.mark.parametrize("lr", [0.0, torch.tensor(0.5), np.float64(0.5), np.float32(0.5)],
                         ids=["zero", "tensor", "np.float64", "np.float32"])
def test_learning_rates_as_torch_takes_them(lr):
    p = torch.nn.Parameter(torch.zeros(3))
    opt = Signum([p], lr=lr, momentum=0.0, comm=SELF)
    p.grad = torch.tensor([1.0, -2.0, 3.0])
    opt.step()
    assert torch.equal(p.detach(), -float(lr) * torch.tensor([1.0, -1.0, 1.0]))


@pytest.mark.parametrize("key, value", [("lr", -0.1), ("momentum", 1.0),
                                        ("weight_decay", math.inf)])
def test_param_groups_written_after_construction_are_checked_at_the_step(key, value):
    p = torch.nn.Parameter(torch.zeros(3))
    opt = Signum([p], lr=0.1, comm=SELF)
    opt.param_groups[0][key] = value
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match=rf"param_groups\[0\]: {key}"):
        opt.step()
    assert torch.equal(p.detach(), torch.zeros(3))   # nothing moved


def test_signsgd_refuses_a_momentum_that_a_scheduler_writes():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = SignSGD([p], lr=0.1, comm=SELF)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match="SignSGD has no momentum.*cycle_momentum=False"):
        opt.step()
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10,
                                                cycle_momentum=False)
    opt.param_groups[0]["momentum"] = 0.0
    opt.step()
    sched.step()


def test_print_shows_topology_ranks_and_overlap():
    opt = Signum([torch.nn.Parameter(torch.zeros(3))], lr=0.1, comm=SELF, topology="tree")
    text = repr(opt)
    assert text.startswith("Signum (") and "ranks: 1" in text and "overlap: False" in text
    assert "lr: 0.1" in text


def test_deepcopy_gives_a_working_optimizer_and_pickle_says_why_not():
    model = torch.nn.Linear(4, 2)
    opt = Signum(model.parameters(), lr=0.1, momentum=0.9, comm=SELF)
    x = torch.randn(8, 4)
    model(x).sum().backward()
    opt.step()
    model2, opt2 = copy.deepcopy((model, opt))
    assert opt2.param_groups[0]["params"][0] is model2.weight and opt2.comm is opt.comm
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m(x).sum().backward()
        o.step()
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert opt2.stats.steps == opt.stats.steps == 2
    with pytest.raises(TypeError, match="cannot be pickled.*state_dict"):
        pickle.dumps(opt)


def test_grad_scaler_steps_with_unscaled_momentum():
    """scaler.step(opt) always steps (a sign does not care about the scale, an inf entry is
    at most one vote), and the momentum is the one an unscaled run gets, bit for bit."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    plain = copy.deepcopy(model)
    opt = Signum(model.parameters(), lr=0.01, momentum=0.9, comm=SELF)
    ref = Signum(plain.parameters(), lr=0.01, momentum=0.9, comm=SELF)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for step in range(6):
        x = torch.randn(5, 4)
        for m, o in ((model, opt), (plain, ref)):
            o.zero_grad()
            loss = m(x).pow(2).sum()
            (scaler.scale(loss) if o is opt else loss).backward()
            if step == 3:
                m.weight.grad[0, 0] = math.inf
        scaler.step(opt)
        scaler.update()
        ref.step()
    assert scaler.get_scale() == 2.0 ** 9   # backed off once, at the inf
    assert opt.stats.steps == 6 and opt.stats.nonfinite == 1
    for a, b in zip(model.parameters(), plain.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(opt.state.values(), ref.state.values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])


def test_compiled_step_matches_the_eager_one():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    eager_model = copy.deepcopy(model)
    opt = Signum(model.parameters(), lr=0.01, momentum=0.9, comm=SELF)
    eager = Signum(eager_model.parameters(), lr=0.01, momentum=0.9, comm=SELF)
    compiled_step = torch.compile(opt.step)
    for _ in range(3):
        x = torch.randn(5, 4)
        for m, o in ((model, opt), (eager_model, eager)):
            o.zero_grad()
            m(x).sum().backward()
        compiled_step()
        eager.step()
    for a, b in zip(model.parameters(), eager_model.parameters()):
        assert torch.equal(a, b)


def test_an_eager_training_loop_never_imports_torch_dynamo():
    """Importing torch._dynamo costs every rank 1.2 s at its start: a loop with no
    torch.compile (steps, zero_grad, state_dict, load_state_dict, a new param group) must not
    import it, and once something has, the step is still excluded from compilation (above)."""
    script = """
import sys, torch, mpisign
from mpi4py import MPI
net = torch.nn.Linear(4, 3)
opt = mpisign.Signum(net.parameters(), lr=0.01, comm=MPI.COMM_SELF)
for _ in range(2):
    opt.zero_grad(); net(torch.randn(5, 4)).sum().backward(); opt.step()
opt.load_state_dict(opt.state_dict())
opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))]})
print("dynamo" if "torch._dynamo" in sys.modules else "no dynamo")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("no dynamo"), out.stdout


def test_majority_vote_on_one_rank_is_the_sign_with_0_for_0_and_nan():
    x = torch.tensor([0.0, -0.0, 2.0, -3.0, math.nan, -math.inf])
    for _ in range(3):   # no drift from call to call
        assert torch.equal(mpisign.majority_vote(x, SELF), torch.tensor([0, 0, 1, -1, 0, -1.0]))
    assert mpisign.majority_vote(x.to(torch.bfloat16), SELF).dtype == torch.bfloat16


def test_majority_vote_results_memory_is_taken_only_when_nothing_holds_it():
    """mpisign.vote._Results: a result's memory is used again only when no tensor, view, numpy
    array, DLPack export or storage of it is left; at most two arrays are kept."""
    from mpisign.vote import _Results
    like = torch.zeros(4, 5)
    holders = {"the tensor": lambda t: t, "a view": lambda t: t[1:], "detach": lambda t: t.detach(),
               "numpy": lambda t: t.numpy(), "DLPack": lambda t: np.from_dlpack(t),
               "storage": lambda t: t.untyped_storage()}
    for name, hold in holders.items():
        pool = _Results()
        first = pool.take(like)
        ptr, held = first.data_ptr(), hold(first)
        del first
        second = pool.take(like)
        assert second.data_ptr() != ptr, f"memory held by {name} was taken"
        del held
        assert pool.take(like).data_ptr() == ptr, f"{name}: free memory was not taken"
        assert len(pool.arrays) == 2
    assert _Results().take(torch.zeros(3, dtype=torch.bfloat16)).dtype == torch.bfloat16


# -- torch.optim's contract, the parts #30 names ----------------------------------------------
@pytest.mark.parametrize("make", [Signum, SignSGD, mpisign.Lion])
def test_a_step_with_nothing_to_optimize_does_nothing(make):
    """A frozen model (a fine-tune's first phase, torch's hook tests): step() is a no-op, as
    in torch.optim; the layout comes back when a parameter requires a gradient again."""
    model = torch.nn.Linear(3, 2).requires_grad_(False)
    before = [p.clone() for p in model.parameters()]
    opt = make(model.parameters(), lr=0.1, comm=SELF)
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    model.weight.requires_grad_(True)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    assert not torch.equal(model.weight, before[0]) and torch.equal(model.bias, before[1])


def test_signsgd_accepts_momentum_zero_and_refuses_any_other():
    """Code that builds optimizers from one config passes momentum=0 to SignSGD too."""
    opt = SignSGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1, momentum=0.0, comm=SELF)
    assert opt.param_groups[0]["momentum"] == 0.0
    with pytest.raises(ValueError, match="SignSGD has no momentum.*use Signum"):
        SignSGD([torch.nn.Parameter(torch.zeros(3))], momentum=0.9, comm=SELF)


@pytest.mark.parametrize("option, why", [("foreach", "chooses its kernels"),
                                         ("fused", "chooses its kernels"),
                                         ("maximize", "negate the loss"),
                                         ("differentiable", "no useful gradient"),
                                         ("capturable", "cannot capture MPI")])
@pytest.mark.parametrize("make", [Signum, SignSGD, mpisign.Lion])
def test_torch_implementation_options_say_why_they_do_not_apply(make, option, why):
    params = [torch.nn.Parameter(torch.zeros(3))]
    make(params, comm=SELF, **{option: None if option in ("foreach", "fused") else False})
    with pytest.raises(ValueError, match=f"has no {option}=True: .*{why}"):
        make(params, comm=SELF, **{option: True})
    with pytest.raises(TypeError, match="unexpected keyword argument 'nesterov'"):
        make(params, comm=SELF, nesterov=True)


def test_complex_parameters_are_refused_at_construction_and_in_add_param_group():
    z = torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))
    with pytest.raises(ValueError, match="real floating point.*view_as_real"):
        Signum([z], comm=SELF)
    opt = Signum([torch.nn.Parameter(torch.zeros(3))], comm=SELF)
    with pytest.raises(ValueError, match="real floating point"):
        opt.add_param_group({"params": iter([z])})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": (p for p in [torch.nn.Parameter(torch.zeros(2))])})
    assert len(opt.param_groups[1]["params"]) == 1   # a generator is taken whole


def test_copy_copy_says_to_deepcopy():
    opt = Signum([torch.nn.Parameter(torch.zeros(3))], comm=SELF)
    with pytest.raises(TypeError, match=r"copy.copy .*copy.deepcopy\(opt\)"):
        copy.copy(opt)


def test_grad_scaler_with_overlap_is_refused_before_anything_moves():
    """Under overlap the hooks send before scaler.step() sets the scale: a clear error at the
    first step whose hooks packed (the first step lays out, without hooks), nothing moved;
    the same loop with overlap=False runs."""
    from mpisign.optim.overlap import GradientChanged
    for overlap in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1))
        opt = Signum(model.parameters(), lr=0.1, comm=SELF, overlap=overlap, bucket_mb=1e-5)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        for step in range(3):
            opt.zero_grad()
            scaler.scale(model(torch.ones(2, 4)).sum()).backward()
            before = [p.clone() for p in model.parameters()]
            if overlap and step == 1:
                with pytest.raises(GradientChanged, match="GradScaler.*overlap=False"):
                    scaler.step(opt)
                assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
                break
            scaler.step(opt)
            scaler.update()


@pytest.mark.parametrize("make", [Signum, mpisign.Lion])
def test_grad_scaler_with_overlap_given_the_scaler_is_bit_for_bit(make):
    """#30: ``grad_scaler=scaler``: the hooks ask the scaler for the scale its loss was
    multiplied by, so overlap=True under GradScaler is bit for bit overlap=False, while the
    scale grows every step and backs off after an inf gradient."""
    results = []
    for overlap in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4, growth_interval=1)
        opt = make(model.parameters(), lr=0.01, comm=SELF, overlap=overlap, bucket_mb=1e-5,
                   grad_scaler=scaler if overlap else None)
        scales = []
        for step in range(6):
            opt.zero_grad()
            loss = model(torch.randn(4, 6, generator=torch.Generator().manual_seed(step))).sum()
            if step == 3:
                loss = loss * float("inf")   # found_inf: the scale backs off
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            scales.append(scaler.get_scale())
        assert len(set(scales)) > 2, scales
        assert (opt.stats.overlapped > 0) == overlap   # the hooks did pack under the scaler
        results.append(([p.detach().clone() for p in model.parameters()], scales))
    (a, scales_a), (b, scales_b) = results
    assert scales_a == scales_b
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_momentum_rounds_as_torch_s_foreach_sgd(dtype):
    """#30: the momentum of a half-precision parameter is torch.optim.SGD(foreach=True)'s
    buffer (momentum=dampening=beta: m = beta m + (1 - beta) g), bit for bit, not the
    per-tensor loop's (foreach=False), which rounds otherwise."""
    torch.manual_seed(0)
    base = torch.randn(5000).to(dtype)
    grads = [torch.randn(5000).to(dtype) for _ in range(5)]
    buffers = {}
    for name in ("ours", "foreach", "loop"):
        p = torch.nn.Parameter(base.clone())
        if name == "ours":
            opt = Signum([p], lr=0.0, momentum=0.9, comm=SELF)
        else:
            opt = torch.optim.SGD([p], lr=0.0, momentum=0.9, dampening=0.9,
                                  foreach=name == "foreach")
            p.grad = torch.zeros_like(p)
            opt.step()   # SGD's first step takes the gradient as the buffer: start from 0
        for g in grads:
            p.grad = g.clone()
            opt.step()
        buffers[name] = opt.state[p]["momentum_buffer"]
    assert torch.equal(buffers["ours"], buffers["foreach"])
    assert not torch.equal(buffers["ours"], buffers["loop"])   # the README's "not the loop"


def test_grad_scaler_must_be_a_scaler():
    with pytest.raises(ValueError, match="grad_scaler must be a torch.amp.GradScaler"):
        Signum([torch.nn.Parameter(torch.zeros(3))], comm=SELF, grad_scaler=2.0)


def test_the_non_finite_warning_names_the_step_call_and_the_optimizer_s_count(caplog):
    """#31 item 5: the user's second step() call is "call 2", after 1 completed step."""
    p = torch.nn.Parameter(torch.zeros(3))
    opt = mpisign.Signum([p], lr=0.01)
    p.grad = torch.ones(3)
    opt.step()
    p.grad = torch.tensor([1.0, float("nan"), float("inf")])
    with caplog.at_level("WARNING", logger="mpisign.optim.engine"):
        opt.step()
    assert "2 non-finite gradient entries in step() call 2 (after 1 completed steps: " \
           "param_groups[0]['step'] == 1)" in caplog.text, caplog.text
