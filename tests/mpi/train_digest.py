"""python -m mpisign.train, then each rank's parameters and optimizer state as digests.

After the run's last stage every rank prints ``@digest rank=R params=... state=...``: a SHA-256
of its model's parameters, and of its optimizer's state tensors (momenta; step counters
aside). tests/test_gpt.py compares them across ranks: after a majority vote every rank holds
the same parameters while each keeps its own momentum; after an allreduce, both are the same.
Run with ``python -m mpisign.launch -n N -- python tests/mpi/train_digest.py <train options>``.
"""

import hashlib
import sys

import torch

import mpisign.train.loop as loop
from mpisign.train.cli import run

real_finish = loop.finish


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def finish_and_report(r) -> None:
    real_finish(r)
    params = digest(r.built.model.parameters())
    state = digest(t for st in r.opt.state.values() for t in st.values()
                   if isinstance(t, torch.Tensor) and t.dim() > 0)
    print(f"@digest rank={r.rank} params={params} state={state}", flush=True)


loop.finish = finish_and_report
sys.exit(run(sys.argv[1:]))
