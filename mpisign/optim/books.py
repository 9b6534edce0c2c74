"""The books of a sign optimizer: what ``torch.optim`` users expect of an optimizer object.

:class:`SignOptimizer` is a ``torch.optim.Optimizer`` that keeps books only: the options'
validation, ``defaults`` and ``param_groups``, the per-parameter ``state``, copying, and the
torch protocol (``step``, ``state_dict``, ``add_param_group``, GradScaler's). Its math is a rule
(:mod:`mpisign.optim.rules`) and its vote an engine (:mod:`mpisign.optim.engine`), both made at
construction; :class:`mpisign.Signum` and :class:`mpisign.SignSGD` are a few lines on it.
"""

from __future__ import annotations

import functools
import sys

import torch
from mpi4py import MPI
from torch.optim import Optimizer

from ..backends import packing
from ..collectives import check_comm, check_topology, default_timeout
from ..collectives.quorum import check_quorum
from .detection import DisagreementMonitor
from .grouped import check_group_options, is_process_group
from .engine import VoteEngine
from .guidance import check_learning_rate
from .layout import check_param


# -- torch.compile's exclusions, without importing torch._dynamo before anything else has ----
# Importing torch._dynamo costs 1.2 s of every rank's start (python -X importtime), and
# torch.optim.Optimizer imports it at the first call of add_param_group, zero_grad, state_dict
# and load_state_dict (each wrapped in torch._disable_dynamo). A call made while nothing has
# imported it cannot be under torch.compile: it runs the plain function. Once something has
# (torch.compile did), calls go through the disabled wrapper, as torch's own do.

def _plain_or_disabled(plain, disabled):
    @functools.wraps(plain)
    def call(*args, **kwargs):
        if "torch._dynamo" not in sys.modules:
            return plain(*args, **kwargs)
        return disabled(*args, **kwargs)
    return call


def compile_disabled(fn):
    """``torch.compiler.disable(fn)``, made lazily (see above): a compiled training step still
    runs ``fn`` as it is."""
    return _plain_or_disabled(fn, torch._disable_dynamo(fn))


def _optimizers(name: str):
    """``torch.optim.Optimizer``'s method ``name``, called as it is while nothing compiles."""
    disabled = getattr(Optimizer, name)
    return _plain_or_disabled(disabled.__wrapped__, disabled)


_optimizers_add_param_group = _optimizers("add_param_group")

__all__ = ["SignOptimizer", "check_torch_options"]

#: torch.optim's implementation options, and why a sign method with a vote has none of them.
_TORCH_OPTIONS = {
    "foreach": "mpisign chooses its kernels itself (one-pass compiled kernels on the CPU, CUDA "
               "kernels on the GPU, torch's ops elsewhere)",
    "fused": "mpisign chooses its kernels itself (one-pass compiled kernels on the CPU, CUDA "
             "kernels on the GPU, torch's ops elsewhere)",
    "maximize": "negate the loss instead: the vote is over the signs of what you minimize",
    "differentiable": "a majority vote of signs has no useful gradient",
    "capturable": "a CUDA graph cannot capture MPI calls",
}


def check_torch_options(name: str, options: dict) -> None:
    """TypeError for an unknown keyword; ValueError for torch.optim's implementation options
    set to anything but their defaults (None or False), saying why they do not apply."""
    for key, value in options.items():
        if key not in _TORCH_OPTIONS:
            raise TypeError(f"{name}() got an unexpected keyword argument {key!r}")
        if value not in (None, False):
            raise ValueError(f"{name} has no {key}={value!r}: {_TORCH_OPTIONS[key]}")


class SignOptimizer(Optimizer):
    """A sign optimizer with a majority vote over ``comm``: books plus ``rule`` plus an engine.

    Args:
        params: parameters or param groups, as for any ``torch.optim.Optimizer``.
        defaults: the rule's hyperparameters (``rule.hparams``), as for ``Optimizer``.
        rule: a :class:`mpisign.optim.rules.Rule`.
        comm, topology, timeout, check_every, overlap, bucket_mb, monitor, elastic, min_ranks:
            the vote's options, as :class:`mpisign.Signum` documents them.
    """

    # torch.optim's own, without importing torch._dynamo while nothing compiles (see above).
    zero_grad = _optimizers("zero_grad")
    state_dict = _optimizers("state_dict")
    load_state_dict = _optimizers("load_state_dict")

    #: torch.amp.GradScaler's protocol: ``scaler.step(opt)`` always calls :meth:`step`, whose
    #: rule takes the gradients unscaled itself. A sign does not care about the scale, and an
    #: inf/NaN gradient entry is already at most one vote, so no rank skips a step and all
    #: stay in unison (a skipped step on one rank would leave it a step behind the others).
    _step_supports_amp_scaling = True

    def __init__(self, params, defaults: dict, rule, comm=None, topology: str = "server", *,
                 timeout: float | None = None, check_every: int = 0, overlap: bool = False,
                 bucket_mb: float = 25.0, monitor: DisagreementMonitor | None = None,
                 elastic: bool = False, min_ranks: int = 1, quorum=None, grace: float = 0.0,
                 allow_minority: bool = False, lag: int = 2, grad_scaler=None, **torch_options):
        # Validate everything before any communication, so every rank raises the same error.
        check_torch_options(type(self).__name__, torch_options)
        rule.check(defaults)
        check_topology(topology)
        if is_process_group(comm):   # torch.distributed's: mpisign.optim.grouped
            check_group_options(type(self).__name__, topology, elastic, quorum, overlap)
        else:
            comm = check_comm(MPI.COMM_WORLD if comm is None else comm)
        if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
        if not isinstance(check_every, int) or check_every < 0:
            raise ValueError(f"check_every must be an int >= 0, got {check_every!r}")
        if not isinstance(bucket_mb, (int, float)) or not bucket_mb > 0:
            raise ValueError(f"bucket_mb must be > 0, got {bucket_mb!r}")
        if monitor is not None and not isinstance(monitor, DisagreementMonitor):
            raise ValueError(f"monitor must be a DisagreementMonitor, got {monitor!r}")
        if not isinstance(min_ranks, int) or min_ranks < 1:
            raise ValueError(f"min_ranks must be an int >= 1, got {min_ranks!r}")
        if isinstance(lag, bool) or not isinstance(lag, int) or lag < 1:
            raise ValueError(f"lag must be an int >= 1 (steps), got {lag!r}")
        if grad_scaler is not None and not (callable(getattr(grad_scaler, "get_scale", None))
                                            and callable(getattr(grad_scaler, "is_enabled",
                                                                 None))):
            raise ValueError(f"grad_scaler must be a torch.amp.GradScaler, got {grad_scaler!r}")
        if quorum is not None:
            quorum = check_quorum(topology, comm, quorum, grace, allow_minority)
            if overlap:
                raise ValueError("quorum= with overlap=True is not supported yet: a vote begun "
                                 "by a gradient hook cannot count the missing gradients")
        self.rule = rule
        self._advised = False   # the first step's advice (mpisign.optim.guidance) is given
        super().__init__(params, defaults)   # each group through add_param_group: checked
        bucket_words = max(1, int(bucket_mb * 2**20 / 4) // packing.WORD_BITS)
        self.engine = VoteEngine(self, rule, comm, topology,
                                 default_timeout() if timeout is None else float(timeout),
                                 check_every, bool(overlap), bucket_words, monitor,
                                 bool(elastic), min_ranks, quorum, float(grace), lag)
        self.engine.scaler = grad_scaler

    # -- the engine's options and figures, under the names users know ------------------------
    comm = property(lambda self: self.engine.comm)
    rank = property(lambda self: self.engine.rank)
    world_size = property(lambda self: self.engine.world_size)
    stats = property(lambda self: self.engine.stats)
    topology = property(lambda self: self.engine.topology)
    timeout = property(lambda self: self.engine.timeout)
    check_every = property(lambda self: self.engine.check_every)
    overlap = property(lambda self: self.engine.overlap)
    bucket_words = property(lambda self: self.engine.bucket_words)
    monitor = property(lambda self: self.engine.monitor)
    elastic = property(lambda self: self.engine.elastic)
    min_ranks = property(lambda self: self.engine.min_ranks)

    @property
    def topology_used(self) -> str:
        """The topology the votes travel by ("auto" resolved; known after the first step)."""
        return self.engine.topology_used

    # -- what torch.optim users expect of an optimizer object ---------------------------------
    def __repr__(self) -> str:
        head, _, rest = super().__repr__().partition("\n")
        return (f"{head}\n    topology: {self.topology_used}, ranks: {self.world_size}, "
                f"overlap: {self.overlap}\n{rest}")

    def __deepcopy__(self, memo):
        """A working optimizer over copies of the parameters (or of the model copied with it:
        ``deepcopy((model, opt))``), with copies of the local state and statistics.
        Communicators are not copied: the copy votes over the same ranks, on a duplicate of its
        own made at its first step, which every rank must then take too. Copying is local."""
        import copy
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key != "engine":
                setattr(new, key, copy.deepcopy(value, memo))
        new.engine = self.engine.copy_for(new, memo)
        return new

    def __copy__(self):
        raise TypeError(
            f"copy.copy of a {type(self).__name__} would share its vote (communicator, layout, "
            f"buffers in flight) with the original, and two optimizers cannot take turns in "
            f"one vote. Use copy.deepcopy(opt), which makes a working copy.")

    def __getstate__(self):
        raise TypeError(
            f"a {type(self).__name__} cannot be pickled: it holds an MPI communicator, which "
            f"means nothing in another process. Save opt.state_dict() (this rank's local state "
            f"and step) and load it into a new optimizer; copy.deepcopy(opt) works in-process.")

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("step", 0)
            group.setdefault("weight_decay", 0.0)
        self.engine.forget_layout()

    def _check_groups(self) -> None:
        """The hyperparameters in ``param_groups`` (a scheduler or the user may write them)."""
        for i, group in enumerate(self.param_groups):
            self.rule.check(group, f"param_groups[{i}]: ")

    def add_param_group(self, param_group: dict) -> None:
        self.rule.check({**self.defaults, **param_group})
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)   # a generator
        for p in params:   # a (name, tensor) pair from named_parameters(), as torch.optim takes
            check_param(p[1] if isinstance(p, tuple) else p)
        param_group = {**param_group, "params": params}
        param_group.setdefault("step", 0)
        _optimizers_add_param_group(self, param_group)

    # -- the step ---------------------------------------------------------------------------
    @compile_disabled
    @torch.no_grad()
    def step(self, closure=None):
        """One voted step. Every rank of ``comm`` must call it the same number of times.

        ``torch.compile(opt.step)`` runs it as it is (excluded from compilation: MPI calls and
        data-dependent packing do not trace), so a compiled training step keeps working.
        """
        # Before any communication, so that a bad value raises the same error on every rank.
        self._check_groups()
        if not self._advised:   # once: a learning rate no sign method would want
            self._advised = True
            if self.rank == 0:
                check_learning_rate(type(self).__name__, self.param_groups)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.engine.step()
        return loss

    # -- a quorum's late rank (quorum=) ------------------------------------------------------
    quorum = property(lambda self: self.engine.quorum)
    grace = property(lambda self: self.engine.grace)

    def late(self) -> bool:
        """With ``quorum=``: True when the vote of this rank's coming step has already closed
        without it (it fell behind). A loop then saves the work of that step::

            if opt.late():
                opt.skip()     # the closed vote's result, without forward, backward or send
                continue

        Without a quorum, or on the root, always False."""
        return self.engine.late()

    @compile_disabled
    @torch.no_grad()
    def skip(self) -> None:
        """Take the step whose vote closed without this rank: its result moves the parameters
        as on every rank; no local step (the momentum stays). Only when :meth:`late`."""
        self._check_groups()
        self.engine.skip()

    def drain(self) -> None:
        """Nothing left in flight: call it after the last step, and before this rank blocks
        outside MPI (a torch.distributed collective, a file lock) while other ranks still
        wait for this step's result (the root of a vote leaves its results in flight, and only
        its own MPI calls move them). With ``quorum=``, collective: the lagged header checks
        made and the late ranks' messages taken, so no request is pending at exit; without,
        local."""
        self.engine.drain()

    # -- consistency ------------------------------------------------------------------------
    def params_digest(self) -> bytes:
        """A 16-byte hash of every optimized parameter's bytes on this rank."""
        return self.engine.params_digest()

    def check_consistency(self) -> None:
        """Raise :class:`mpisign.ParameterDivergence` on every rank unless all hold identical
        parameters. With ``elastic``, a dead rank met here is recovered from, and the
        recovery's own comparison of the survivors' parameters stands in for this one."""
        self.engine.check_consistency()
