"""Where packed sign words live and what works on them: the wire format and its numpy reference
(:mod:`.packing`), the compiled CPU kernels (:mod:`.native`), and the backend interface with its
host implementations and selection (:mod:`.signs`); the CUDA kernels are in :mod:`mpisign.cuda`,
the same layer. Nothing here knows of MPI."""
