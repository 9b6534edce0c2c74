"""The fp32 baseline that majority vote is measured against: mean of the gradients by allreduce.

Every rank's gradients are fused into one float32 buffer, summed over ranks by a single
``MPI_Allreduce`` and divided by the number of ranks; a plain ``torch.optim.SGD`` then steps on
the mean. This is what ``python -m mpisign.train --optimizer sgd`` runs. One worker sending
inf or NaN (an adversary, a bad batch) puts it into every rank's weights.

    mean = AllreduceMean(model.parameters(), comm)
    loss.backward(); mean(); sgd.step()

Bytes: a ring allreduce moves ``2 * 4d * (M - 1) / M`` bytes out of each rank (reduce-scatter
then allgather); ``bytes_sent`` counts that figure, as the MPI library does not report its own.
"""

from __future__ import annotations

import numpy as np
import torch
from mpi4py import MPI

__all__ = ["AllreduceMean"]


class AllreduceMean:
    """The fp32 baseline: every rank's gradients summed by one ``MPI_Allreduce`` over a fused
    buffer, divided by the number of ranks, handed back as ``.grad`` to a plain torch SGD."""

    def __init__(self, params, comm):
        self.params = [p for p in params if p.requires_grad]
        if any(p.dtype != torch.float32 for p in self.params):
            raise ValueError("AllreduceMean sums float32 gradients; the model has parameters "
                             "of another dtype")
        self.comm, self.world = comm, comm.Get_size()
        n = sum(p.numel() for p in self.params)
        self.host = np.zeros(n, dtype=np.float32)
        self.flat = torch.from_numpy(self.host)
        self.bytes_per_step = 8 * n * (self.world - 1) // self.world  # ring: 2 * 4d (M-1)/M
        self.bytes_sent = 0

    @torch.no_grad()
    def __call__(self) -> None:
        """Replace every ``.grad`` by its mean over the ranks (a None grad counts as zeros)."""
        off = 0
        for p in self.params:
            n = p.numel()
            if p.grad is None:
                self.flat[off: off + n].zero_()
            else:
                self.flat[off: off + n].copy_(p.grad.reshape(-1))
            off += n
        # Wait on MPI: every rank needs the sum before its step (blocking allreduce).
        self.comm.Allreduce(MPI.IN_PLACE, self.host, op=MPI.SUM)
        self.flat.div_(self.world)
        off = 0
        for p in self.params:
            n = p.numel()
            mean = self.flat[off: off + n].view_as(p).to(p.device)
            if p.grad is None:
                p.grad = mean.clone()
            else:
                p.grad.copy_(mean)
            off += n
        self.bytes_sent += self.bytes_per_step