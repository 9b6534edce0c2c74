"""mpisign.ddp's hook on real ranks, in a real DDP over a real gloo process group: its parameters
after N steps against mpisign.Signum's (mpisign.Lion's, with ``lion``) on the same data, bit for
bit.

The process group is made beside MPI (rank 0 picks a free port and tells the others), so one
launch runs both transports: the hook over the group (``comm=None``) and over MPI.

Usage: ddp_check.py group|mpi [TOPOLOGY | mismatch] [signum | lion]
"""

import copy
import sys

import torch
import torch.distributed as dist
from common import WORLD, case, expect_everywhere, init_gloo, progress
from torch.nn.parallel import DistributedDataParallel as DDP

import mpisign
import mpisign.ddp

transport = sys.argv[1]
mode = sys.argv[2] if len(sys.argv) > 2 else "server"
topology = "server" if mode == "mismatch" else mode
rule = sys.argv[3] if len(sys.argv) > 3 else "signum"
rank, size = WORLD.Get_rank(), WORLD.Get_size()
STEPS, LR, BETA, BETAS = 6, 0.01, 0.9, (0.9, 0.99)


def hook_state(comm, saved=None, **options):
    if rule == "lion":
        state = mpisign.ddp.LionState(betas=BETAS, comm=comm, topology=topology, **options)
    else:
        state = mpisign.ddp.SignumState(momentum=BETA, comm=comm, topology=topology, **options)
    if saved is not None:
        state.load_state_dict(saved)
    return state


# A state made before the process group exists (Lightning makes its DDPStrategy's state so):
# it binds the group at its first bucket. The first case below uses it.
EARLY = hook_state(None) if transport == "group" and mode != "mismatch" else None
init_gloo()


class Net(torch.nn.Module):
    def __init__(self, unused: bool = False):
        super().__init__()
        torch.manual_seed(7)
        self.body = torch.nn.Linear(13, 40)
        self.head = torch.nn.Linear(40, 3)
        self.spare = torch.nn.Linear(3, 3) if unused else None   # never in the graph

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def batch(step: int, micro: int = 0):
    g = torch.Generator().manual_seed(10_000 * step + 100 * rank + micro)
    x = torch.randn(8, 13, generator=g)
    x[:, 0] = 0.0   # a coordinate of body.weight whose gradient is exactly 0 on every rank
    if poisoned and rank == 1 and step == 2:   # every gradient of rank 1 NaN at step 2
        x[3, 5] = float("nan")
    return x, torch.randn(8, 3, generator=g)


poisoned = False   # the case "a NaN gradient" sets it
nonfinite = {}     # what the optimizer and the hook counted: "reference", "hook"


def loss_of(model, step, micro=0):
    x, y = batch(step, micro)
    return torch.nn.functional.mse_loss(model(x), y)


def optimizer(params, **options):
    if rule == "lion":
        return mpisign.Lion(params, lr=LR, betas=BETAS, comm=WORLD, **options)
    return mpisign.Signum(params, lr=LR, momentum=BETA, comm=WORLD, **options)


def reference(accumulate: int, unused: bool = False, scaled: bool = False):
    """The optimizer over MPI on the same data: the gradients of each step summed over the
    micro-batches, as DDP's no_sync accumulates them; ``scaled``: under a GradScaler whose
    scale grows every step."""
    model = Net(unused)
    scaler = grows() if scaled else None
    opt = optimizer(model.parameters(), **({"grad_scaler": scaler} if scaled else {}))
    for step in range(STEPS):
        opt.zero_grad()
        for micro in range(accumulate - 1):
            scaled_backward(loss_of(model, step, micro), scaler)
        backward_and_step(loss_of(model, step, accumulate - 1), opt, scaler)
    nonfinite["reference"] = opt.stats.nonfinite
    return [p.detach().clone() for p in model.parameters()]


def scaled_backward(loss, scaler) -> None:
    (scaler.scale(loss) if scaler is not None else loss).backward()


def backward_and_step(loss, opt, scaler) -> None:
    """``loss.backward()`` and ``opt.step()``, through the GradScaler if there is one."""
    scaled_backward(loss, scaler)
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()


def grows():
    """A GradScaler (on the CPU) whose scale doubles every step, from 2**10."""
    return torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1)


def with_hook(accumulate: int, unused: bool = False, bucket_cap_mb: float = 25.0,
              resume_at: int | None = None, scaled: bool = False, compiled: bool = False,
              early: bool = False, **options):
    """The hook in a DDP of the same model; ``resume_at``: a new DDP, hook state and SGD at
    that step, loaded from the old ones' state_dicts (a checkpoint and a restart); ``scaled``:
    under a GradScaler given to the hook's state; ``compiled``: the DDP model under
    ``torch.compile`` (aot_eager: the graph is traced and run as compiled, no C compiler);
    ``early``: the state made before the process group (:data:`EARLY`)."""
    model = Net(unused)
    comm = None if transport == "group" else WORLD
    scaler = grows() if scaled else None

    def make(saved=None):
        ddp = DDP(model, find_unused_parameters=unused, bucket_cap_mb=bucket_cap_mb, **options)
        state = (EARLY if early and saved is None else
                 hook_state(comm, saved and saved[0], **({"grad_scaler": scaler} if scaled else {})))
        opt = torch.optim.SGD(ddp.parameters(), lr=LR, momentum=0.0)
        if saved is not None:
            opt.load_state_dict(saved[1])
        ddp.register_comm_hook(state, mpisign.ddp.lion_hook if rule == "lion"
                               else mpisign.ddp.signum_hook)
        return (torch.compile(ddp, backend="aot_eager") if compiled else ddp), state, opt
    ddp, state, opt = make()
    for step in range(STEPS):
        if step == resume_at:
            saved = copy.deepcopy((state.state_dict(), opt.state_dict()))
            del ddp, state, opt
            ddp, state, opt = make(saved)
        opt.zero_grad()
        for micro in range(accumulate - 1):
            with ddp.no_sync():
                loss_of(ddp, step, micro).backward()
        backward_and_step(loss_of(ddp, step, accumulate - 1), opt, scaler)
        progress(step)
    if scaled:
        assert scaler.get_scale() == 2.0 ** (10 + STEPS), scaler.get_scale()
    nonfinite["hook"] = state.nonfinite
    return [p.detach().clone() for p in model.parameters()]


def same(a, b, what):
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), (what, i, (x - y).abs().max().item())


if mode == "mismatch":   # rank 1 restarts from another step's state: raised everywhere
    with case(f"{transport}: a hook state of another step on rank 1"):
        ddp = DDP(Net())
        state = hook_state(None if transport == "group" else WORLD)
        if rank == 1:
            state.load_state_dict(dict(state.state_dict(), step=5))
        ddp.register_comm_hook(state, mpisign.ddp.vote_hook)
        with expect_everywhere(ValueError, r"rank\(s\) \[1\] have another layout"):
            loss_of(ddp, 0).backward()
    dist.destroy_process_group()
    print(f"ddp_check OK on {size} ranks: {transport} mismatch {rule}", flush=True)
    sys.exit(0)

what = f"{transport} {topology} {rule}"
with case(f"{what}: one bucket{', the state made before the group' if EARLY else ''}"):
    same(with_hook(1, early=EARLY is not None), reference(1), "one bucket")
with case(f"{what}: small buckets, rebuilt after the first step"):
    # 0.0005 MB: each parameter its own bucket, whose order DDP rebuilds after step 0.
    same(with_hook(1, bucket_cap_mb=0.0005), reference(1), "small buckets")
with case(f"{what}: no_sync accumulation"):
    same(with_hook(3), reference(3), "accumulation")
with case(f"{what}: find_unused_parameters"):
    same(with_hook(1, unused=True), reference(1, unused=True), "unused")
with case(f"{what}: a checkpoint of the hook's state, and a restart"):
    same(with_hook(1, resume_at=3), reference(1), "resume")
with case(f"{what}: gradient_as_bucket_view, static_graph"):
    same(with_hook(1, gradient_as_bucket_view=True, static_graph=True), reference(1), "views")
with case(f"{what}: GradScaler, its scale doubling every step"):
    same(with_hook(1, scaled=True), reference(1, scaled=True), "GradScaler")
with case(f"{what}: torch.compile of the DDP model"):
    same(with_hook(1, compiled=True), reference(1), "torch.compile")
with case(f"{what}: a NaN gradient on rank 1 votes as 0, counted"):
    poisoned = True
    same(with_hook(1), reference(1), "NaN")
    poisoned = False
    assert nonfinite["hook"] == nonfinite["reference"] == (
        sum(p.numel() for p in Net().parameters()) if rank == 1 else 0), nonfinite
with case(f"{what}: another rule's state is refused"):
    other = hook_state(None if transport == "group" else WORLD)
    with expect_everywhere(ValueError, r"the state is (Lion|Signum)Rule's, this hook's rule is"):
        foreign = dict(other.state_dict(), rule="LionRule" if rule == "signum" else "SignumRule")
        other.load_state_dict(foreign)
dist.destroy_process_group()
print(f"ddp_check OK on {size} ranks: {what}", flush=True)
