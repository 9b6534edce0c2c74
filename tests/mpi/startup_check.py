"""The ranks agree on one GPU path, and prove device words on the wire, on real ranks.

CPU stand-ins: an int64 CPU tensor stands for a device word buffer (mpi4py takes both through
DLPack); levels are what each rank's device would allow. Checked: the most conservative level
wins on every rank; a faulted device stops every rank with DeviceFault; the resident path is
proven by a real transfer between ranks until it has passed once, and wrong bits on the wire put
every rank on the staged path; a rank without CUDA tensors (no opinion, numpy words) takes part.
"""

import numpy as np
import torch
from common import WORLD, case, expect_everywhere, progress

from mpisign.cuda import startup
from mpisign.cuda.startup import FAULTED, HOST, RESIDENT, STAGED

comm = WORLD
rank, size = comm.Get_rank(), comm.Get_size()
assert size >= 3, "startup_check needs 3 ranks or more"
made = []   # the word buffers each proof asked for


def device_words(w):
    made.append(w)
    return torch.zeros(w, dtype=torch.int64)


def host_words(w):
    made.append(w)
    return np.zeros(w, dtype=np.uint64)


def agree(level, proven=False, words_of=device_words):
    made.clear()
    got = startup.agree(comm, level, proven, words_of, timeout=60)
    ran = comm.allgather(bool(made))
    assert len(set(ran)) == 1, f"the proof ran on some ranks only: {ran}"
    return got, ran[0]


with case("every rank resident: proven by a transfer, then not again"):
    assert agree(RESIDENT) == (RESIDENT, True)
    assert agree(RESIDENT, proven=rank != 1) == (RESIDENT, True)   # one rank not yet proven
    assert agree(RESIDENT, proven=True) == (RESIDENT, False)
progress(1)

with case("the most conservative level wins"):
    for low in (STAGED, HOST):
        assert agree(low if rank == size - 1 else RESIDENT) == (low, False)
    assert agree(STAGED if rank == 0 else HOST) == (HOST, False)
progress(2)

with case("a rank without CUDA tensors has no opinion and joins the proof with host words"):
    mine = (None, True, host_words) if rank == 1 else (RESIDENT, False, device_words)
    assert agree(*mine) == (RESIDENT, True)
    assert agree(None, True, host_words) == (None, False)   # no GPU anywhere: nothing to agree
progress(3)

with case("wrong bits on the wire: every rank stages"):
    honest = startup._pattern
    if rank == 1:   # rank 1's words arrive at rank 2 with one bit flipped
        startup._pattern = lambda r, w: honest(r, w) ^ np.eye(1, w, 5, dtype=np.uint64)[0]
    assert agree(RESIDENT) == (STAGED, True)
    startup._pattern = honest
    assert agree(RESIDENT) == (RESIDENT, True)   # not marked proven: tried again, and passes
progress(4)

with case("a faulted device stops every rank"):
    with expect_everywhere(startup.DeviceFault, "no longer usable"):
        agree(FAULTED if rank == size - 1 else RESIDENT)
progress(5)

comm.Barrier()
if rank == 0:
    print(f"startup_check OK on {size} ranks", flush=True)
