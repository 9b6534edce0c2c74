"""Distributed Lion (mpisign.Lion) on real ranks, against a one-process reference that replays
every rank's momentum in torch, as the published Lion writes it, and takes the majority of the
signs with numpy on unpacked values, with the documented zero rules.

Covered for each topology named, with and without overlap: two param groups (their own lr and
weight decay), a float64 parameter, a parameter whose .grad is None on even ranks (the presence
OR: those ranks vote with b1 * m), exact zeros (an all-zero first step votes by the zero rule),
and a NaN/inf gradient entry on one rank (one vote, counted). Also: a scheduler that writes
betas on one rank is refused on every rank before any parameter moves, and, with
``elastic RANK@STEP``, a rank SIGKILLed mid-run under ULFM while the survivors go on.

Also ``resume``: every rank's state through gather_state_dict, a checkpoint and
scatter_state_dict, with the monitor on.

Usage: lion_check.py TOPOLOGY... | mismatch | resume | elastic TOPOLOGY RANK@STEP
"""

import io
import os
import signal
import sys

import numpy as np
import torch
from common import WORLD, case, expect_everywhere, name_nodes, progress

import mpisign

comm = WORLD
rank, size = comm.Get_rank(), comm.Get_size()
STEPS, LR, WD, BETAS = 7, 2.0**-7, 0.5, (0.9, 0.99)
GROUPS = [dict(lr=LR, weight_decay=WD), dict(lr=2 * LR, weight_decay=0.0)]


def model():
    torch.manual_seed(7)
    return [torch.nn.Parameter(torch.randn(70)), torch.nn.Parameter(torch.randn(3, 5)),
            torch.nn.Parameter(torch.randn(9, dtype=torch.float64)),
            torch.nn.Parameter(torch.randn(4))]   # the last: a gradient on odd ranks only


def gradient(r, step, i, p):
    if i == 3 and r % 2 == 0:
        return None
    if step == 0 and i == 1:
        return torch.zeros(p.shape, dtype=p.dtype)   # m = 0 and g = 0: c = 0, the zero rule
    g = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + 10 * r + i),
                    dtype=p.dtype)
    if step == 2 and r == 1 and i == 0:
        g[5], g[6] = float("nan"), float("-inf")   # one rank's broken entries: votes of 0
    return g


def group_of(i):
    return GROUPS[0] if i < 2 else GROUPS[1]


def majority(sent: list, zero_bits: list) -> np.ndarray:
    """sign(sum of signs) in numpy, an exact 0 voting +1 where its zero bit is 1, else -1;
    0 (no step) where every voter sent an exact 0."""
    total = np.zeros(sent[0].numel(), dtype=np.int64)
    everywhere = np.ones(sent[0].numel(), dtype=bool)
    for c, bit in zip(sent, zero_bits):
        a = c.double().numpy().reshape(-1)
        total += np.where(a > 0, 1, np.where(a < 0, -1, 1 if bit else -1))
        everywhere &= a == 0
    total[everywhere] = 0
    return np.sign(total)


def reference(voters_at=lambda step: range(size), redone=None):
    """Every rank's Lion replayed here (lion-pytorch's order of operations, per rank); the
    vote by numpy; ranks not in ``voters_at(step)`` neither vote nor keep momentum after. The
    zero rule's bit is (rank + step) % 2 by each voter's rank among the voters, except in the
    step ``redone`` by survivors: its signs were packed before the failure, by the old ranks."""
    params = [p.detach().clone() for p in model()]
    momenta = {r: [torch.zeros_like(p) for p in params] for r in range(size)}
    b1, b2 = BETAS
    for step in range(STEPS):
        voters = list(voters_at(step))
        for i, p in enumerate(params):
            grads = {r: gradient(r, step, i, p) for r in voters}
            if all(g is None for g in grads.values()):
                continue
            sent = []
            for r in voters:
                m, g = momenta[r][i], grads[r]
                g = torch.zeros_like(p) if g is None else torch.nan_to_num(g, 0.0, 0.0, 0.0)
                sent.append(m.clone().mul_(b1).add(g, alpha=1 - b1) if grads[r] is not None
                            else m * b1)
                if grads[r] is not None:
                    m.mul_(b2).add_(g, alpha=1 - b2)
                else:
                    m.mul_(b2)   # some rank had the gradient: the vote moved p
            ranks = voters if step == redone else range(len(voters))
            v = torch.from_numpy(majority(sent, [(r + step) % 2 for r in ranks]))
            v = v.to(p.dtype).view_as(p)
            lr, wd = group_of(i)["lr"], group_of(i)["weight_decay"]
            p.mul_(1 - lr * wd).add_(v, alpha=-lr)
    return params


def train(topology, overlap, params, opt, kills=None, steps=range(STEPS)):
    for step in steps:
        progress(step)
        if kills and kills.get(rank) == step:
            os.kill(os.getpid(), signal.SIGKILL)
        grads = [gradient(rank, step, i, p) for i, p in enumerate(params)]
        opt.zero_grad(set_to_none=True)
        if overlap:   # the gradients arrive through autograd, so that the hooks fire
            sum((p * g).sum() for p, g in zip(params, grads) if g is not None).backward()
        else:
            for p, g in zip(params, grads):
                p.grad = g
        opt.step()


def build(params, topology, **options):
    return mpisign.Lion([{"params": params[:2], **GROUPS[0]}, {"params": params[2:], **GROUPS[1]}],
                        betas=BETAS, comm=comm, topology=topology, **options)


def voting(topologies):
    want = reference()
    for topology in topologies:
        if topology == "hierarchical":   # two nodes where there are two ranks or more
            name_nodes(f"{size // 2},{size - size // 2}" if size > 1 else None)
        for overlap in (False, True):
            with case(f"{topology} overlap={overlap}"):
                params = model()
                opt = build(params, topology, overlap=overlap, bucket_mb=2**-12, check_every=3)
                train(topology, overlap, params, opt)
                for i, (p, q) in enumerate(zip(params, want)):
                    assert torch.equal(p.detach(), q), \
                        f"parameter {i}: off by {(p.detach() - q).abs().max().item()}"
                assert opt.stats.nonfinite == (2 if rank == 1 else 0), opt.stats.nonfinite
                assert len(set(comm.allgather(opt.params_digest()))) == 1


def mismatch():
    """A scheduler (or a user) that writes betas on one rank only: HyperparameterMismatch on
    every rank, naming beta1, and no parameter moved."""
    with case("betas written on one rank"):
        params = model()
        before = [p.detach().clone() for p in params]
        opt = build(params, "server")
        if rank == size - 1:
            opt.param_groups[0]["betas"] = (0.95, 0.99)
        for i, p in enumerate(params):
            p.grad = torch.ones_like(p)
        with expect_everywhere(mpisign.HyperparameterMismatch, "beta1"):
            opt.step()
        assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    with case("bad betas refused on every rank"):
        for bad in [(1.0, 0.99), (0.9, -0.1), (0.9,), "0.9", (float("nan"), 0.99)]:
            with expect_everywhere(ValueError, "betas"):
                mpisign.Lion(model(), betas=bad, comm=comm)
        with expect_everywhere(ValueError, "weight_decay"):
            mpisign.Lion(model(), weight_decay=-0.1, comm=comm)
        with expect_everywhere(ValueError, "lr"):
            mpisign.Lion(model(), lr=-1e-3, comm=comm)


def resume():
    """Every rank's state gathered to a checkpoint that rank 0 writes (weights_only on load),
    handed back to new optimizers over copies of the parameters: the run goes on as if it
    had never stopped; the monitor sees every rank's disagreement meanwhile."""
    with case("gather_state_dict, torch.save/load, scatter_state_dict"):
        params = model()
        opt = build(params, "sharded", monitor=mpisign.DisagreementMonitor())
        train("sharded", False, params, opt, steps=range(3))
        state = mpisign.gather_state_dict(opt)
        if rank == 0:
            buffer = io.BytesIO()
            torch.save(state, buffer)
            state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
        again = [torch.nn.Parameter(p.detach().clone()) for p in params]
        opt2 = build(again, "sharded", monitor=mpisign.DisagreementMonitor())
        mpisign.scatter_state_dict(opt2, state)
        assert opt2.param_groups[0]["betas"] == BETAS
        train("sharded", False, again, opt2, steps=range(3, STEPS))
        for i, (p, q) in enumerate(zip(again, reference())):
            assert torch.equal(p.detach(), q), f"parameter {i} differs after the resume"
        every = opt2.stats.disagreement_by_rank
        assert len(every) == size and all(0 < d < 1 for d in every), every


def elastic(topology, kill):
    victim, at = (int(x) for x in kill.split("@"))
    with case(f"elastic {topology} rank {victim} dies at step {at}"):
        params = model()
        opt = build(params, topology, elastic=True)
        train(topology, False, params, opt, kills={victim: at})
        assert opt.stats.lost_ranks == [victim], opt.stats.lost_ranks
        want = reference(lambda s: [r for r in range(size) if r != victim or s < at], at)
        for i, (p, q) in enumerate(zip(params, want)):
            assert torch.equal(p.detach(), q), f"parameter {i} differs on a survivor"
        print(f"@survivor rank={rank} size={opt.comm.Get_size()}", flush=True)


if __name__ == "__main__":
    np.seterr(all="ignore")
    if sys.argv[1] == "mismatch":
        mismatch()
    elif sys.argv[1] == "resume":
        resume()
    elif sys.argv[1] == "elastic":
        elastic(sys.argv[2], sys.argv[3])
    else:
        voting(sys.argv[1:])
    if sys.argv[1] != "elastic":
        comm.Barrier()
    if rank == 0:
        print(f"lion_check OK on {size} ranks: {' '.join(sys.argv[1:])}", flush=True)
