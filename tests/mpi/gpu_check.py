"""The GPU path over real ranks, on a GPU node (run by tests/gpu/test_gpu.py).

For every topology: majority_vote of CUDA tensors (fp32, fp16, bf16; ragged lengths, zeros, NaN,
inf) against the numpy reference on all ranks' signs, the result on the device and the same on
every rank; then SignSGD on CUDA parameters bit-identical to SignSGD on CPU copies fed the same
gradients (momentum 0: the signs are the gradients' own, so only the vote and the update's
rounding could differ). Which GPU path runs follows MPISIGN_CUDA_AWARE: 1, the packed words
stay on the device and MPI moves device memory; 0, they are staged through pinned host memory.
Then the same with ``quorum=`` (every rank: the result is the full vote's), on every topology
that takes one: a quorum vote runs on host words, so both settings take the staged path.
"""

import os

import numpy as np
import torch
from common import WORLD, case, progress, rank_data, reference_vote

import mpisign

comm = WORLD
rank, size = comm.Get_rank(), comm.Get_size()
device = torch.device("cuda", rank % torch.cuda.device_count())
torch.cuda.set_device(device)
resident = os.environ.get("MPISIGN_CUDA_AWARE") == "1"

step = 0
for topology in sorted(mpisign.TOPOLOGIES):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for n in (1, 65, 4099, 1_000_003):
            with case(f"{topology} {dtype} n={n}"):
                xs = [rank_data(n, r, seed=n + 11, dtype=dtype) for r in range(size)]
                if n > 2:
                    xs[0][1] = float("nan")
                    xs[size - 1][2] = float("inf")
                got = mpisign.majority_vote(xs[rank].to(device), comm, topology, step=step)
                assert got.is_cuda and got.dtype == dtype
                ref = reference_vote(xs, step=step)
                bad = np.flatnonzero(got.cpu().to(torch.float64).numpy() != ref)
                assert bad.size == 0, f"{topology} {dtype} n={n}: {bad.size} wrong, first {bad[:5]}"
            step += 1
            progress(step)


def train(where, topology, quorum=None):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(shape, generator=gen).to(dtype).to(where).requires_grad_()
              for shape, dtype in (((512, 300), torch.float32), ((300,), torch.bfloat16),
                                   ((4099,), torch.float16))]
    opt = mpisign.SignSGD(params, lr=1e-3, weight_decay=1e-2, comm=comm, topology=topology,
                          quorum=quorum)
    for k in range(4):
        for i, p in enumerate(params):
            g = rank_data(p.numel(), rank, seed=100 * k + i).reshape(p.shape)
            p.grad = g.to(p.dtype).to(where)
        opt.step()
        progress(f"{topology}-{where}-{k}")
    if quorum is not None:
        opt.drain()
    return [p.detach().cpu() for p in params], opt


for topology in sorted(mpisign.TOPOLOGIES):
    with case(f"{topology}: SignSGD on CUDA parameters, bit-identical to the CPU"):
        on_cpu, _ = train("cpu", topology)
        on_gpu, opt = train(device, topology)
        assert isinstance(opt.engine.plan.layout.packed, torch.Tensor) == resident, "not the GPU path expected"
        for a, b in zip(on_cpu, on_gpu):
            ints = torch.int16 if a.element_size() == 2 else torch.int32
            assert torch.equal(a.view(ints), b.view(ints)), f"{topology}: CPU and GPU differ"
        assert len(set(comm.allgather(opt.params_digest()))) == 1

for topology in ("server", "sharded", "tree"):
    with case(f"{topology}: quorum, majority_vote and SignSGD on CUDA tensors, staged"):
        xs = [rank_data(4099, r, seed=7, dtype=torch.float32) for r in range(size)]
        stats = {}
        got = mpisign.majority_vote(xs[rank].to(device), comm, topology, quorum=size,
                                    step=step, stats=stats)
        assert got.is_cuda and stats["counted"] == list(range(size)), stats
        ref = reference_vote(xs, step=step)
        assert np.array_equal(got.cpu().to(torch.float64).numpy(), ref)
        mpisign.drain_votes(comm)
        on_cpu, _ = train("cpu", topology, quorum=size)
        on_gpu, opt = train(device, topology, quorum=size)
        assert not isinstance(opt.engine.plan.layout.packed, torch.Tensor), "words on the device"
        for a, b in zip(on_cpu, on_gpu):
            ints = torch.int16 if a.element_size() == 2 else torch.int32
            assert torch.equal(a.view(ints), b.view(ints)), f"{topology}: CPU and GPU differ"

comm.Barrier()
if rank == 0:
    print(f"gpu_check OK on {size} ranks (resident words: {resident})", flush=True)
