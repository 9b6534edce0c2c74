"""torch.optim's contract where a vote is involved, for every optimizer and every input of
``tests/optimizer_db.py``, on real ranks (``tests/test_contract.py`` runs it on 3):

* every rank's state through ``state_dict()`` and ``load_state_dict()`` into a new optimizer
  over copies of the parameters: the same bits as the run that went on, on every rank;
* ``overlap`` off and on: the same bits (the input's own ``overlap`` aside);
* exact-zero gradients on every rank: nothing moves (an even number of ranks: the zero bits
  tie; an odd number: the coordinates found 0 on every rank are a tie), and an embedding whose
  padding row is 0 on every rank and whose other rows are 0 on some ranks only: the padding row
  keeps its bits;
* GradScaler with overlap, the optimizer given its scaler (``grad_scaler=``): overlap=False's
  bits;
* the parameters agree on every rank (``params_digest``).

Usage: contract_check.py
"""

import copy
import os
import sys

import numpy as np
import torch
from common import WORLD, case, progress

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from optimizer_db import OPTIMIZERS, assert_same, inputs_of, make, run_steps  # noqa: E402  (tests/, beside this folder)

comm = WORLD
rank, size = comm.Get_rank(), comm.Get_size()


def model():
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(9, 70, generator=gen)),
            torch.nn.Parameter(torch.randn(70, generator=gen)),
            torch.nn.Parameter(torch.randn(70, 9, generator=gen).t())]


def grads(params, steps, seed):
    """This rank's gradients: each rank its own noise."""
    gen = torch.Generator().manual_seed(1000 * seed + rank)
    return [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(steps)]


def agree(opt) -> None:
    assert len(set(comm.allgather(opt.params_digest()))) == 1, "ranks differ"


def state_dict_round_trip(info, kwargs) -> None:
    params = model()
    gs = grads(params, 6, seed=1)
    opt = make(info, params, kwargs, comm)
    run_steps(opt, params, gs[:3])
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    other = make(info, twins, kwargs, comm)
    other.load_state_dict(copy.deepcopy(opt.state_dict()))
    run_steps(opt, params, gs[3:])
    run_steps(other, twins, gs[3:])
    assert_same(params, twins, "after load_state_dict")
    agree(other)


def overlap_agrees(info, kwargs) -> None:
    results = []
    for overlap in (False, True):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.Tanh(),
                                  torch.nn.Linear(20, 3))
        opt = make(info, net.parameters(), {**kwargs, "overlap": overlap, "bucket_mb": 1e-3},
                   comm)
        gen = torch.Generator().manual_seed(5 + rank)
        for _ in range(4):
            opt.zero_grad()
            net(torch.randn(8, 12, generator=gen)).square().sum().backward()
            opt.step()
        agree(opt)
        results.append(list(net.parameters()))
    assert_same(*results, "overlap on against off")


def zeros_everywhere(info, kwargs) -> None:
    params = model()
    before = [p.detach().clone() for p in params]
    kwargs = {**kwargs, "weight_decay": 0.0, "lr": 0.01}
    opt = make(info, params, kwargs, comm)
    for step in range(5):
        run_steps(opt, params, [[torch.zeros_like(p) for p in params]])
        for p, b in zip(params, before):
            moved = (p.detach() - b).abs().max().item()
            assert moved == 0, f"step {step}: an all-zero coordinate moved by {moved}"
    agree(opt)


def padding_row(info, kwargs) -> None:
    emb = torch.nn.Embedding(6, 70, padding_idx=0)
    with torch.no_grad():
        emb.weight.copy_(torch.randn(6, 70, generator=torch.Generator().manual_seed(2)))
        emb.weight[0] = 0.5   # a padding row that is not 0 itself
    before = emb.weight.detach().clone()
    opt = make(info, emb.parameters(), {**kwargs, "weight_decay": 0.0}, comm)
    for step in range(5):
        opt.zero_grad()
        rows = [0, 1, 2, 0, (3, 5)[(rank + step) % 2]]   # 3 and 5 on some ranks; 4 on none
        emb(torch.tensor(rows)).square().sum().backward()
        opt.step()
        assert torch.equal(emb.weight[0], before[0]), f"step {step}: the padding row moved"
        assert torch.equal(emb.weight[4], before[4]), f"step {step}: an unseen row moved"
    assert (emb.weight[1:3] != before[1:3]).all()
    agree(opt)


def zero_masks_and() -> None:
    """exchanges.all_zero against numpy's AND of every rank's mask: words whole, empty and
    mixed, on every rank and on some; large enough that a freed buffer shows."""
    from mpisign.mpi import exchanges
    for it in range(5):
        rng = np.random.default_rng(100 * it + rank)
        words = 18455
        zeros = (rng.integers(0, 2**63, size=words, dtype=np.uint64)
                 & rng.integers(0, 2**63, size=words, dtype=np.uint64))
        zeros[rng.random(words) < 0.3] = exchanges.FULL
        zeros[rng.random(words) < 0.3] = 0
        zeros[:7] = exchanges.FULL   # whole on every rank
        got = exchanges.all_zero(comm, zeros, 60, "a test's AND")
        want = np.bitwise_and.reduce(np.array(comm.allgather(zeros)), axis=0)
        assert np.array_equal(np.zeros_like(zeros) if got is None else got, want), it


def scaled_overlap(info) -> None:
    """GradScaler with overlap, the optimizer given its scaler: bit for bit overlap=False,
    the scale growing every step and backing off after an inf on one rank."""
    results = []
    for overlap in (False, True):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.Tanh(),
                                  torch.nn.Linear(20, 3))
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4, growth_interval=1)
        opt = make(info, net.parameters(), {"overlap": overlap, "bucket_mb": 1e-3,
                                            "grad_scaler": scaler if overlap else None}, comm)
        gen = torch.Generator().manual_seed(5 + rank)
        for step in range(5):
            opt.zero_grad()
            loss = net(torch.randn(8, 12, generator=gen)).square().sum()
            if step == 2 and rank == 1:
                loss = loss * float("inf")
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        agree(opt)
        results.append(list(net.parameters()))
    assert_same(*results, "GradScaler with overlap against without")


with case("the AND of the zero masks"):
    zero_masks_and()
n = 0
for info in OPTIMIZERS:
    with case(f"{info.name}: GradScaler with overlap"):
        scaled_overlap(info)
    for optim_input in inputs_of(info):
        kwargs = copy.deepcopy(optim_input.kwargs)
        label = f"{info.name} {optim_input.desc}"
        with case(f"{label}: state_dict round trip"):
            state_dict_round_trip(info, kwargs)
        if not kwargs.get("overlap"):
            with case(f"{label}: overlap on and off"):
                overlap_agrees(info, kwargs)
        with case(f"{label}: zeros on every rank"):
            zeros_everywhere(info, kwargs)
        with case(f"{label}: an embedding's padding row"):
            padding_row(info, kwargs)
        n += 1
        progress(n)
comm.Barrier()
if rank == 0:
    print(f"contract_check OK on {size} ranks: {n} inputs of {len(OPTIMIZERS)} optimizers",
          flush=True)
