"""torch.optim's contract, for every optimizer in ``tests/optimizer_db.py`` and every input it
describes (overlap off and on among them), on one process. These follow the protocol of
pytorch's generic optimizer tests (``test/test_optim.py``, not in the wheel), adapted to a sign
method: what must hold of any optimizer, not SGD's numbers. The cases that involve a vote run
on real ranks in ``test_the_contract_on_real_ranks`` (``tests/mpi/contract_check.py``)."""

import copy
import re
import warnings

import pytest
import torch
from optimizer_db import OPTIMIZERS, assert_same, errors_of, inputs_of, make, run_steps
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.optim.swa_utils import SWALR, AveragedModel
from torch.testing._internal.common_optimizers import OptimizerErrorEnum

import mpirun

CASES = [pytest.param(info, case, id=f"{info.name}-{case.desc}")
         for info in OPTIMIZERS for case in inputs_of(info)]
INFOS = [pytest.param(info, id=info.name) for info in OPTIMIZERS]


def _model(dtype=torch.float32, seed=0):
    """Weights as a model has them: a matrix, a bias, a 0-dim scale, a non-contiguous view."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(9, 70, generator=gen, dtype=dtype)),
            torch.nn.Parameter(torch.randn(70, generator=gen, dtype=dtype)),
            torch.nn.Parameter(torch.randn((), generator=gen, dtype=dtype)),
            torch.nn.Parameter(torch.randn(70, 9, generator=gen, dtype=dtype).t())]


def _grads(params, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
            for _ in range(steps)]


def _kw(case, **more) -> dict:
    return {**copy.deepcopy(case.kwargs), **more}


@pytest.mark.parametrize("info", INFOS)
def test_errors(info):
    """Every error input: the error torch's own optimizers raise (or the engine's own, by
    name), at construction or at the step, as the description says."""
    for bad in errors_of(info):
        kwargs = bad.optimizer_error_input.kwargs
        params = bad.optimizer_error_input.params
        if params is None:
            params = [torch.nn.Parameter(torch.zeros(3))]
        if bad.error_on == OptimizerErrorEnum.STEP_ERROR:
            opt = make(info, params, kwargs)
            with pytest.raises(bad.error_type, match=bad.error_regex):
                opt.step()
        elif issubclass(bad.error_type, Warning):
            with pytest.warns(bad.error_type, match=bad.error_regex):
                make(info, params, kwargs)
        else:
            with pytest.raises(bad.error_type, match=bad.error_regex):
                make(info, params, kwargs)


@pytest.mark.parametrize("info,case", CASES)
def test_step_is_noop_for_zero_grads(info, case):
    """torch's own test: exact-zero gradients move nothing (weight decay aside). A padding row
    of an embedding, a masked or pruned weight, a never-seen token's row stays where it is."""
    kwargs = _kw(case, weight_decay=0.0)
    params = _model()
    before = [p.detach().clone() for p in params]
    opt = make(info, params, kwargs)
    run_steps(opt, params, [[torch.zeros_like(p) for p in params]] * 3)
    assert_same(params, before)


@pytest.mark.parametrize("info,case", CASES)
def test_an_embedding_padding_row_stays(info, case):
    """The same inside a real gradient: rows 0 (padding) and 4 (never seen) of an embedding
    keep their exact bits while the rows in use move."""
    emb = torch.nn.Embedding(5, 70, padding_idx=0)
    before = emb.weight.detach().clone()
    opt = make(info, emb.parameters(), _kw(case, weight_decay=0.0))
    for step in range(4):
        opt.zero_grad()
        emb(torch.tensor([0, 1, 2, 3, 0, step % 3 + 1])).sum().backward()
        opt.step()
        assert torch.equal(emb.weight[0], before[0]), step
        assert torch.equal(emb.weight[4], before[4]), step
    assert (emb.weight[1:4] != before[1:4]).all()


@pytest.mark.parametrize("info,case", CASES)
def test_params_without_grads_do_not_move(info, case):
    """``.grad is None`` (never backpropagated, or zero_grad(set_to_none=True)): no step, not
    even weight decay, and its state (a rule may keep a zero momentum for it, which a rank
    with no gradient votes with on several ranks) stays as it was."""
    params = _model()
    before = [p.detach().clone() for p in params]
    opt = make(info, params, _kw(case))
    opt.step()
    assert_same(params, before)
    params[0].grad = torch.ones_like(params[0])
    opt.step()
    assert_same(params[1:], before[1:])
    for p in params[1:]:
        for value in opt.state[p].values():
            assert not torch.is_tensor(value) or value.dim() == 0 or not value.any()


@pytest.mark.parametrize("info", INFOS)
def test_nothing_to_optimize_is_a_noop(info):
    """A frozen backbone's phase: no parameter requires a gradient; step() does nothing."""
    frozen = [torch.nn.Parameter(torch.ones(3), requires_grad=False)]
    opt = make(info, frozen, {})
    opt.step()
    assert torch.equal(frozen[0], torch.ones(3))


@pytest.mark.parametrize("info,case", CASES)
def test_state_dict_round_trip(info, case):
    """Three steps; a state_dict, deep-copied and loaded into a new optimizer over copies of
    the parameters (other tensors, other ids); three more steps each: the same bits."""
    params = _model()
    grads = _grads(params, 6)
    opt = make(info, params, _kw(case))
    run_steps(opt, params, grads[:3])
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    other = make(info, twins, _kw(case))
    other.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert other.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    run_steps(opt, params, grads[3:])
    run_steps(other, twins, grads[3:])
    assert_same(params, twins)


@pytest.mark.parametrize("info", INFOS)
def test_load_state_dict_casts_state_to_the_params_dtype(info):
    """As torch.optim: a float32 optimizer's state loaded over float64 parameters becomes
    float64 (and the step goes on)."""
    params = _model(torch.float32)
    opt = make(info, params, {})
    run_steps(opt, params, _grads(params, 2))
    wide = _model(torch.float64)
    other = make(info, wide, {})
    other.load_state_dict(opt.state_dict())
    for p in wide:
        for value in other.state[p].values():
            if torch.is_tensor(value) and value.is_floating_point() and value.dim() > 0:
                assert value.dtype == torch.float64
    run_steps(other, wide, _grads(wide, 2))


@pytest.mark.parametrize("info", INFOS)
def test_schedulers_drive_lr_as_they_drive_sgd(info):
    """Every scheduler set of the description: the same lr, step by step, as over
    torch.optim.SGD, and the scheduler's state_dict round-trips."""
    for factories in info.scheduler_inputs:
        params, twins = _model(), _model()
        opt, sgd = make(info, params, {"lr": 0.1}), torch.optim.SGD(twins, lr=0.1)
        ours = [f(opt) for f in factories]
        theirs = [f(sgd) for f in factories]
        for step, gs in enumerate(_grads(params, 8)):
            run_steps(opt, params, [gs])
            run_steps(sgd, twins, [gs])
            for s, t in zip(ours, theirs):
                if isinstance(s, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    s.step(1.0), t.step(1.0)
                else:
                    s.step(), t.step()
            assert opt.param_groups[0]["lr"] == sgd.param_groups[0]["lr"], step
        for s in ours:
            s.load_state_dict(copy.deepcopy(s.state_dict()))


@pytest.mark.parametrize("info", INFOS)
def test_hooks_run_in_torch_order(info):
    """Step pre/post hooks (the optimizer's own and the global ones) and the state_dict hooks
    run, in torch's order, and a removed hook no longer runs."""
    params = _model()
    opt = make(info, params, {})
    calls = []
    handles = [opt.register_step_pre_hook(lambda o, a, k: calls.append("pre")),
               opt.register_step_post_hook(lambda o, a, k: calls.append("post")),
               opt.register_state_dict_pre_hook(lambda o: calls.append("sd-pre")),
               opt.register_state_dict_post_hook(lambda o, sd: calls.append("sd-post")),
               opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load-pre")),
               opt.register_load_state_dict_post_hook(lambda o: calls.append("load-post"))]
    glob = register_optimizer_step_pre_hook(
        lambda o, a, k: calls.append("global-pre"))
    try:
        run_steps(opt, params, _grads(params, 1))
        opt.load_state_dict(opt.state_dict())
    finally:
        glob.remove()
    assert calls == ["global-pre", "pre", "post", "sd-pre", "sd-post", "load-pre", "load-post"]
    for h in handles:
        h.remove()
    calls.clear()
    run_steps(opt, params, _grads(params, 1))
    assert calls == []


@pytest.mark.parametrize("info,case", CASES)
def test_views_and_noncontiguous_params_step_as_their_copies(info, case):
    """A transposed (non-contiguous) parameter and a contiguous copy of it: the same bits."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(70, 9, generator=gen)
    strided = torch.nn.Parameter(base.clone().t())
    dense = torch.nn.Parameter(base.clone().t().contiguous())
    assert not strided.is_contiguous()
    grads = _grads([dense], 4)
    run_steps(make(info, [strided], _kw(case)), [strided], grads)
    run_steps(make(info, [dense], _kw(case)), [dense], grads)
    assert torch.equal(strided.detach(), dense.detach())


@pytest.mark.parametrize("info", INFOS)
def test_empty_and_zero_dim_params(info):
    """Empty tensors (0 coordinates) and 0-dim scalars: the step runs, the scalar moves."""
    empty, scalar = torch.nn.Parameter(torch.zeros(0, 3)), torch.nn.Parameter(torch.tensor(1.0))
    opt = make(info, [empty, scalar], {"lr": 0.5})
    run_steps(opt, [empty, scalar], [[torch.zeros(0, 3), torch.tensor(2.0)]] * 2)
    assert scalar.item() < 1.0 and empty.shape == (0, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("info", INFOS)
def test_every_float_dtype(info, dtype):
    """Every float dtype steps, stays finite, and keeps its state in the parameter's dtype."""
    params = _model(dtype)
    opt = make(info, params, {"lr": 0.05, "weight_decay": 0.1})
    before = [p.detach().clone() for p in params]
    run_steps(opt, params, _grads(params, 3))
    for p, b in zip(params, before):
        assert p.dtype == dtype and torch.isfinite(p).all() and not torch.equal(p, b)
        for value in opt.state[p].values():
            if torch.is_tensor(value) and value.dim() > 0:
                assert value.dtype == dtype


@pytest.mark.parametrize("info,case", [c for c in CASES if not c.values[1].kwargs.get("overlap")])
def test_overlap_is_bit_identical_to_no_overlap(info, case):
    """``overlap=True`` (the vote started from gradient hooks during backward) gives the same
    bits as ``overlap=False``, on a model whose gradients come from autograd."""
    results = []
    for overlap in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.Tanh(),
                                    torch.nn.Linear(20, 3))
        opt = make(info, model.parameters(), _kw(case, overlap=overlap, bucket_mb=1e-3))
        gen = torch.Generator().manual_seed(5)
        for _ in range(4):
            opt.zero_grad()
            model(torch.randn(8, 12, generator=gen)).square().sum().backward()
            opt.step()
        results.append(list(model.parameters()))
    assert_same(*results)


@pytest.mark.parametrize("info", INFOS)
def test_averaged_model_and_swalr(info):
    """torch.optim.swa_utils: AveragedModel follows the model, SWALR anneals the lr."""
    model = torch.nn.Linear(6, 2)
    opt = make(info, model.parameters(), {"lr": 0.05})
    swa, sched = AveragedModel(model), SWALR(opt, swa_lr=0.01, anneal_epochs=2)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 6)).sum().backward()
        opt.step()
        swa.update_parameters(model)
        sched.step()
    assert int(swa.n_averaged) == 3 and opt.param_groups[0]["lr"] == pytest.approx(0.01)


@pytest.mark.parametrize("info", INFOS)
def test_deepcopy_steps_alike(info):
    """A deep copy of optimizer and model goes on exactly as the original."""
    params = _model()
    opt = make(info, params, {})
    run_steps(opt, params, _grads(params, 2))
    params2, opt2 = copy.deepcopy((params, opt))
    more = _grads(params, 2, seed=7)
    run_steps(opt, params, more)
    run_steps(opt2, params2, more)
    assert_same(params, params2)


@pytest.mark.parametrize("info", INFOS)
def test_the_description_knows_what_it_refuses(info):
    """What the description says the optimizer does not take, it refuses by name."""
    for flag in ("foreach", "fused", "differentiable", "capturable", "maximize"):
        assert flag not in info.supported_impls
        with pytest.raises(ValueError, match=re.escape(f"{flag}=True: ")):
            make(info, [torch.nn.Parameter(torch.zeros(2))], {flag: True})
        make(info, [torch.nn.Parameter(torch.zeros(2))], {flag: False})   # torch's default
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        z = torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))
        with pytest.raises(ValueError, match="complex"):
            make(info, [z], {})


@pytest.mark.parametrize("ranks", [3, 4])
def test_the_contract_on_real_ranks(ranks):
    """The cases that involve the vote, for every optimizer and input, on 3 and 4 real ranks
    (an odd count needs the exact-zero AND, an even one ties by itself): state dicts round-trip
    every rank's state, overlap on and off agree, gradients that are 0 on every rank move
    nothing, an embedding's padding row and unseen row keep their bits."""
    mpirun.run(ranks, "contract_check.py", timeout=600)


@pytest.mark.parametrize("info", INFOS)
def test_named_parameters_as_torch_takes_them(info):
    """``model.named_parameters()`` (torch >= 2.6): the names go into the state_dict's groups,
    and the step is that of the bare parameters."""
    torch.manual_seed(0)
    named, bare = torch.nn.Linear(6, 3), torch.nn.Linear(6, 3)
    bare.load_state_dict(named.state_dict())
    a, b = make(info, named.named_parameters(), {}), make(info, bare.parameters(), {})
    for model, opt in ((named, a), (bare, b)):
        run_steps(opt, list(model.parameters()), _grads(list(model.parameters()), 3))
    assert_same(list(named.parameters()), list(bare.parameters()))
    assert a.state_dict()["param_groups"][0]["param_names"] == ["weight", "bias"]
