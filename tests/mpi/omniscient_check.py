"""The non-blind attack does what mpisign.train.adversary.Omniscient documents.

Usage: omniscient_check.py K
The first K ranks are adversaries; every check compares with a numpy reference built from
every rank's tensors (allgathered), not with the library's own vote.

1. signSGD (no momentum), planned honest splits: on a coordinate where ``a`` of the H honest
   ranks vote "+", the voted step keeps the honest majority's sign iff ``|2a - H| > K``.
2. Signum (momentum 0.9), random gradients, a few steps: each adversary's momentum, the thing
   it votes with, has exactly minus the sign of the honest ranks' majority of momenta.
3. The fp32 mean baseline (torch SGD): each adversary's gradient is minus the honest mean.
"""

import sys

import numpy as np
import torch
from common import WORLD, case, progress

import mpisign
from mpisign.train.adversary import Omniscient

comm = WORLD
rank, size = comm.Get_rank(), comm.Get_size()
K = int(sys.argv[1])
H = size - K
honest = rank >= K
D = 1000
LR = 0.01

attack = Omniscient(comm, K)

# 1. Planned splits: coordinate j has a = j % (H + 1) honest "+" votes; honest rank h (0-based
# among the honest) votes "+" iff h < a. Adversaries start from noise (it must not matter).
with case("signSGD, planned honest splits: kept iff |2a - H| > K"):
    a = np.arange(D) % (H + 1)
    if honest:
        grad = np.where(rank - K < a, 1.0, -1.0) * (1 + np.arange(D) % 7)
    else:
        grad = np.random.default_rng(rank).standard_normal(D)
    p = torch.nn.Parameter(torch.zeros(D))
    p.grad = torch.from_numpy(grad).float()
    opt = mpisign.SignSGD([p], lr=LR, comm=comm)
    attack(opt, step=0)
    if not honest:
        honest_majority = np.where(2 * a > H, 1.0, np.where(2 * a < H, -1.0, 0.0))
        assert np.array_equal(p.grad.numpy(), -honest_majority), "adversary's gradient"
    opt.step()
    voted = -p.detach().numpy() / LR
    honest_sign = np.sign(2 * a - H)
    decided = honest_sign != 0
    keeps = np.abs(2 * a - H) > K
    assert np.array_equal(voted[decided & keeps], honest_sign[decided & keeps]), "kept"
    assert np.array_equal(voted[decided & ~keeps], -honest_sign[decided & ~keeps]), "flipped"
    progress("planned")

# 2. Signum with momentum: what an adversary votes with is minus the honest majority of the
# momenta the honest ranks vote with, every step.
with case("Signum: each adversary votes minus the honest majority of momenta"):
    torch.manual_seed(0)
    q = torch.nn.Parameter(torch.zeros(D))
    opt = mpisign.Signum([q], lr=LR, momentum=0.9, comm=comm)
    rng = np.random.default_rng(100 + rank)
    for step in range(4):
        q.grad = torch.from_numpy(rng.standard_normal(D) + 0.3).float()
        attack(opt, step=step)
        opt.step()
        momenta = np.stack(comm.allgather(opt.state[q]["momentum_buffer"].numpy()))
        reference = np.sign(np.sign(momenta[K:]).sum(axis=0))
        if not honest:
            assert np.array_equal(np.sign(momenta[rank]), -reference), f"step {step}"
        progress(f"signum-{step}")
    assert len(set(comm.allgather(opt.params_digest()))) == 1, "ranks diverged"
    disagreement = comm.allgather(opt.stats.disagreement)

# 3. The mean baseline: minus the honest mean gradient.
with case("fp32 mean: each adversary sends minus the honest mean"):
    r = torch.nn.Parameter(torch.zeros(D))
    r.grad = torch.from_numpy(np.random.default_rng(200 + rank).standard_normal(D)).float()
    original = np.stack(comm.allgather(r.grad.numpy().copy()))
    attack(torch.optim.SGD([r], lr=LR), step=0)
    if not honest:
        assert np.allclose(r.grad.numpy(), -original[K:].mean(axis=0), atol=1e-6), "mean"
    progress("mean")
attack.free()
if rank == 0:
    print(f"omniscient_check OK: {K} of {size} adversaries; flipped "
          f"{int((decided & ~keeps).sum())} of {int(decided.sum())} decided coordinates; "
          f"last Signum step's disagreement by rank {np.round(disagreement, 3).tolist()}",
          flush=True)
