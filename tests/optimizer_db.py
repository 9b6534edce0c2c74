"""Every optimizer on the vote engine, described with torch's own ``OptimizerInfo`` (from the
installed wheel's ``torch/testing/_internal/common_optimizers.py``), so that the generic contract
tests (``tests/test_contract.py`` on one process, ``tests/mpi/contract_check.py`` on real ranks)
run over each of them. A new rule on the engine is one more entry in :data:`OPTIMIZERS`.

What a sign method cannot take is said here, not skipped silently: ``foreach``, ``fused``,
``differentiable``, ``capturable`` and ``maximize`` set to True are refused by name, each with
its reason (``mpisign/optim/books.py``; a sign method chooses its kernels itself, and flipping
the loss is the user's one-character change); complex parameters and sparse gradients are
refused (``supports_complex``/``supports_sparse`` False).
"""

from __future__ import annotations

import torch
from mpi4py import MPI
from torch.optim.lr_scheduler import (CosineAnnealingLR, ExponentialLR, LinearLR,
                                      ReduceLROnPlateau, StepLR)
from torch.testing._internal.common_optimizers import (ErrorOptimizerInput, OptimizerInfo,
                                                       OptimizerInput,
                                                       get_error_inputs_for_all_optims)

import mpisign

__all__ = ["OPTIMIZERS", "inputs_of", "errors_of", "make", "run_steps", "assert_same"]


def _common(device, dtype=None) -> list:
    """What every rule takes: the engine's options and the books' lr and weight decay."""
    return [
        OptimizerInput(params=None, kwargs={}, desc="default"),
        OptimizerInput(params=None, kwargs={"lr": 1e-2}, desc="non-default lr"),
        OptimizerInput(params=None, kwargs={"lr": torch.tensor(1e-3)}, desc="tensor lr"),
        OptimizerInput(params=None, kwargs={"weight_decay": 0.1}, desc="weight_decay"),
        OptimizerInput(params=None, kwargs={"overlap": True}, desc="overlap"),
        OptimizerInput(params=None, kwargs={"overlap": True, "weight_decay": 0.1,
                                            "bucket_mb": 1e-4},
                       desc="overlap, weight_decay, small buckets"),
    ]


def _signum_inputs(device, dtype=None) -> list:
    return _common(device, dtype) + [
        OptimizerInput(params=None, kwargs={"momentum": 0.0}, desc="no momentum"),
        OptimizerInput(params=None, kwargs={"momentum": 0.5, "weight_decay": 0.1},
                       desc="momentum with weight_decay"),
    ]


def _lion_inputs(device, dtype=None) -> list:
    return _common(device, dtype) + [
        OptimizerInput(params=None, kwargs={"betas": (0.5, 0.9)}, desc="betas"),
        OptimizerInput(params=None, kwargs={"betas": (0.0, 0.0), "weight_decay": 0.5},
                       desc="betas 0: the sign of the gradient, heavy decay"),
    ]


def _bad(kwargs: dict, regex: str, desc: str, error=ValueError) -> ErrorOptimizerInput:
    return ErrorOptimizerInput(OptimizerInput(params=None, kwargs=kwargs, desc=desc),
                               error_type=error, error_regex=regex)


def _engine_errors(device, dtype) -> list:
    """torch's errors for every optimizer, and the engine's own."""
    return get_error_inputs_for_all_optims(device, dtype) + [
        _bad({"lr": -0.1}, "lr", "negative lr"),
        _bad({"weight_decay": -1.0}, "weight_decay", "negative weight decay"),
        _bad({"topology": "ring"}, "topology", "unknown topology"),
        _bad({"timeout": 0}, "timeout", "zero timeout"),
        _bad({"bucket_mb": 0}, "bucket_mb", "empty buckets"),
        _bad({"foreach": True}, "foreach=True: mpisign chooses", "foreach, named"),
        _bad({"fused": True}, "fused=True: mpisign chooses", "fused, named"),
        _bad({"maximize": True}, "maximize=True: negate the loss", "maximize, named"),
        _bad({"capturable": True}, "capturable=True: a CUDA graph", "capturable, named"),
        _bad({"differentiable": True}, "differentiable=True", "differentiable, named"),
        _bad({"no_such_option": 1}, "no_such_option", "an unknown keyword", TypeError),
    ]


def _signum_errors(device, dtype) -> list:
    return _engine_errors(device, dtype) + [
        _bad({"momentum": 1.0}, "momentum", "momentum of 1"),
        _bad({"momentum": -0.5}, "momentum", "negative momentum"),
    ]


def _signsgd_errors(device, dtype) -> list:
    return _engine_errors(device, dtype) + [
        _bad({"momentum": 0.9}, "SignSGD has no momentum", "momentum on SignSGD"),
    ]


def _lion_errors(device, dtype) -> list:
    return _engine_errors(device, dtype) + [
        _bad({"betas": (1.0, 0.99)}, "beta", "beta1 of 1"),
        _bad({"betas": (0.9, -0.1)}, "beta", "negative beta2"),
    ]


_SCHEDULERS = (
    [lambda opt: StepLR(opt, gamma=0.9, step_size=3), lambda opt: ReduceLROnPlateau(opt)],
    [lambda opt: ExponentialLR(opt, gamma=0.8)],
    [lambda opt: LinearLR(opt, start_factor=0.3, total_iters=4),
     lambda opt: CosineAnnealingLR(opt, T_max=7)],
)


def _info(cls, inputs, errors) -> OptimizerInfo:
    return OptimizerInfo(cls, optim_inputs_func=inputs, optim_error_inputs_func=errors,
                         scheduler_inputs=_SCHEDULERS, supported_impls=(),
                         not_og_supported_flags=(), supports_complex=False,
                         supports_sparse=False, has_capturable_arg=False)


OPTIMIZERS = [
    _info(mpisign.Signum, _signum_inputs, _signum_errors),
    _info(mpisign.SignSGD, lambda device, dtype=None: _common(device, dtype) + [
        OptimizerInput(params=None, kwargs={"momentum": 0.0}, desc="momentum=0 from a config"),
    ], _signsgd_errors),
    _info(mpisign.Lion, _lion_inputs, _lion_errors),
]


def inputs_of(info: OptimizerInfo, device: str = "cpu") -> list:
    return info.optim_inputs_func(device=device)


def errors_of(info: OptimizerInfo, device: str = "cpu") -> list:
    return info.optim_error_inputs_func(device=device, dtype=None)


def run_steps(opt, params: list, steps_grads: list) -> None:
    """One ``opt.step()`` for each list of gradients (a copy of each into its ``.grad``)."""
    for grads in steps_grads:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()


def assert_same(a: list, b: list, what: str = "") -> None:
    """The same bits in each pair of tensors, or an AssertionError saying by how much not."""
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x.detach(), y.detach()), \
            f"{what}: parameter {i} off by {(x - y).abs().max().item()}"


def make(info: OptimizerInfo, params, kwargs: dict, comm=MPI.COMM_SELF):
    """The optimizer of ``info`` over ``params`` with ``kwargs`` on ``comm`` (one process: the
    communicator of this process alone)."""
    return info.optim_cls(params, comm=comm, **kwargs)
