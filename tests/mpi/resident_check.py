"""The GPU path with device-resident words (as with a CUDA-aware MPI), run on CPU tensors.

mpisign.cuda.kernels runs for real, its launches executed by the host shim (the same signs.cu);
"device" tensors are CPU tensors. The collectives are handed torch tensors, which mpi4py takes
through DLPack, as it takes CUDA tensors from a CUDA-aware MPI. Checked on real ranks, for every
topology: majority_vote against the numpy reference; every buffer MPI touched was a tensor; the
stream is synchronized once per phase of a vote (the posts between two waits), not once per
message; and Signum on the resident path bit-identical to Signum on the host path, with and
without overlap.
Usage: resident_check.py TOPOLOGY [NODE_SIZES], e.g. "hierarchical 1,3": nodes of 1 and 3 ranks
named by $MPISIGN_NODE.
"""

import sys

import numpy as np
import torch
from common import WORLD, case, name_nodes, progress, rank_data, reference_vote

import mpisign
from mpisign.backends import signs
from mpisign.collectives import base
from mpisign.cuda import emulate
from mpisign.cuda.bridge import ResidentSigns

comm = WORLD
rank, size = comm.Get_rank(), comm.Get_size()
topology = sys.argv[1]
nodes = name_nodes(sys.argv[2] if len(sys.argv) > 2 else None)

touched = []  # the type of every buffer handed to MPI by the collectives
syncs = []    # the stream synchronizations before MPI touches device buffers
phases = []   # the ends of phases with posted messages (waited for, or sends left in flight)


def stand_in_device(buf):
    """A torch tensor stands for a CUDA buffer here."""
    touched.append(type(buf))
    return isinstance(buf, torch.Tensor)


def count_sync(buf, settled=False):
    if not settled:   # settled: the stream is only queried (a GPU sync only if work is new)
        syncs.append(buf.device)


def counting_phases(end):
    def count(self, pending, what):
        if pending.requests:
            phases.append(what)
        end(self, pending, what)
    return count


base.on_device, base.ready_for_mpi = stand_in_device, count_sync
base.SignVote._wait = counting_phases(base.SignVote._wait)
base.SignVote._leave_sends = counting_phases(base.SignVote._leave_sends)


def clear():
    for seen in (touched, syncs, phases):
        seen.clear()


with emulate.kernels_on_cpu() as kernels:
    gpu = ResidentSigns("cpu", kernels)
    kernel_tallies = []
    _tally = gpu.tally
    gpu.tally = lambda votes, n: kernel_tallies.append(votes.shape) or _tally(votes, n)

    # ---- majority_vote -----------------------------------------------------------------------
    signs.signs_for = lambda tensors, *_, **__: gpu if gpu.handles(tensors[0]) else signs.HostSigns()
    step = 0
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for n in (1, 64, 65, 1000, 4099):
            with case(f"{topology} {dtype} n={n}"):
                xs = [rank_data(n, r, seed=n, dtype=dtype) for r in range(size)]
                if n > 2:
                    xs[0][1] = float("nan")
                    xs[size - 1][2] = float("inf")
                clear()
                got = mpisign.majority_vote(xs[rank], comm, topology, step=step)
                assert got.dtype == dtype and got.shape == xs[rank].shape
                ref = reference_vote(xs, step=step)
                bad = np.flatnonzero(got.to(torch.float64).numpy() != ref)
                assert bad.size == 0, f"{topology} {dtype} n={n}: {bad.size} wrong, first {bad[:5]}"
                if size > 1:
                    assert touched and all(t is torch.Tensor for t in touched), set(touched)
                    # One synchronization per phase, however many messages the phase posts.
                    assert len(syncs) == len(phases) >= 1, (len(syncs), phases)
                    if size > 2 and topology in ("sharded", "allgather"):
                        assert len(syncs) < len(touched), (len(syncs), len(touched))
            step += 1
            progress(step)
    # The tree adds counts with torch ops, not the kernel; the hierarchical vote too, across
    # nodes (on one node it tallies with the kernel).
    if size > 1 and topology != "tree" and len(nodes) == 1:
        with case(f"{topology}: the tally kernel ran"):
            assert any(comm.allgather(bool(kernel_tallies))), "the tally kernel never ran"

    # ---- Signum: resident words vs host words, bit for bit -------------------------------------
    def make_model():
        torch.manual_seed(3)
        m = torch.nn.Sequential(torch.nn.Linear(20, 48), torch.nn.ReLU(), torch.nn.Linear(48, 5))
        m.scale = torch.nn.Parameter(torch.ones(5, dtype=torch.bfloat16))  # half precision too
        m.still = torch.nn.Parameter(torch.ones(7))   # a gradient of exact zeros on every rank
        return m

    class SlowEvent:
        """A device's pack that is not done the first time a hook asks, done the next."""

        def __init__(self):
            self.asked = 0

        def query(self):
            self.asked += 1
            return self.asked > 1

    def train(resident: bool, overlap: bool):
        signs.signs_for = ((lambda params, *_, **__: gpu) if resident
                           else (lambda params, *_, **__: signs.HostSigns()))
        # With overlap on the device, a hook never waits for the device: a bucket whose pack is
        # still queued starts from a later hook (the next bucket's) or from step().
        gpu.mark = SlowEvent if overlap else (lambda: None)
        model = make_model()
        opt = mpisign.Signum(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-3,
                             comm=comm, topology=topology, overlap=overlap, bucket_mb=0.002)
        for k in range(5):
            g = torch.Generator().manual_seed(100 * k + rank)
            x, y = torch.randn(8, 20, generator=g), torch.randn(8, 5, generator=g)
            clear()  # before backward: with overlap, the hooks start the votes
            opt.zero_grad(set_to_none=True)
            out = model(x) * model.scale.float() + 0.0 * model.still.sum()
            torch.nn.functional.mse_loss(out, y).backward()
            opt.step()
            if resident and size > 1:
                assert touched and all(t is torch.Tensor for t in touched), set(touched)
                assert len(syncs) == len(phases) >= 1, (len(syncs), phases)
            progress(f"{'resident' if resident else 'host'}-{overlap}-{k}")
        assert isinstance(opt.engine.plan.layout.packed, torch.Tensor) == resident
        if resident and overlap and size > 1:
            # Hooks from step 1 on (the first step makes the layout); the last bucket's pack
            # is still "running" when its own hook looks, so step() starts it.
            assert opt.stats.overlapped == 4 * (len(opt.engine.plan.layout.buckets) - 1), \
                (opt.stats.overlapped, len(opt.engine.plan.layout.buckets))
        return model, opt

    for overlap in (False, True):
        with case(f"{topology} overlap={overlap}: Signum on resident words = on host words"):
            host, hopt = train(False, overlap)
            dev, dopt = train(True, overlap)
            for (name, p), q in zip(host.named_parameters(), dev.parameters()):
                assert p.dtype == q.dtype and torch.equal(p, q), \
                    f"{topology} overlap={overlap}: {name} differs between host and resident words"
            assert dopt.stats.disagreement == hopt.stats.disagreement
            assert (dopt.stats.bytes_sent, dopt.stats.bytes_received) == \
                (hopt.stats.bytes_sent, hopt.stats.bytes_received)
            assert len(set(comm.allgather(dopt.params_digest()))) == 1
            # Exactly 0 on every rank: no step, weight decay aside (an odd number of ranks: the
            # AND of the zero masks, from device words too; an even number: the zero bits tie).
            # A vote would have moved it by lr = 0.01 a step; the decay moves it by 1e-5.
            assert (dev.still.detach() - 1).abs().max() < 1e-4, dev.still
            assert isinstance(dopt.engine.plan.zeros, torch.Tensor) == (size % 2 == 1)

comm.Barrier()
if rank == 0:
    print(f"resident_check {topology} OK on {size} ranks", flush=True)
