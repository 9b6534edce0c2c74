"""Train an image classifier, or a small transformer language model, with Signum / signSGD /
Lion majority vote over MPI, or an fp32 allreduce baseline (SGD, AdamW, global Lion).

One process per rank; every rank trains the same model on its own shard of the data and the
optimizer's majority vote keeps their parameters identical. Rank 0 alone prints and writes the
books; every rank writes its own part of a checkpoint (Signum's momentum is per worker).

On this machine, or a laptop (Fashion-MNIST from Debian's dataset-fashion-mnist, else digits)::

    mpirun -n 4 python -m mpisign.train
    mpirun -n 4 python -m mpisign.train --optimizer sgd --out runs/sgd
    mpirun -n 4 python -m mpisign.train --topology tree --epochs 5 --out runs/tree
    mpirun -n 7 python -m mpisign.train --adversaries 3 --attack invert --out runs/adv3of7
    mpirun -n 7 python -m mpisign.train --adversaries 3 --attack omniscient   # not blind
    mpirun -n 4 python -m mpisign.train --out runs/tree --resume      # continue a run
    python -m mpisign.train.plot runs/sgd runs/tree runs/adv3of7
    mpirun -n 4 python -m mpisign.train --model gpt --optimizer lion --out runs/gpt-lion
    mpirun -n 4 python -m mpisign.train --model gpt --optimizer adamw --out runs/gpt-adamw

More ranks than cores, or root in a container: ``python -m mpisign.launch -n 4 -- python -m
mpisign.train ...`` sets what Open MPI needs, or by hand::

    OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_mpi_yield_when_idle=1 \\
    OMP_NUM_THREADS=1 mpirun -n 4 --oversubscribe python -m mpisign.train

On a Slurm cluster, one GPU per rank (see slurm/train.sbatch, slurm/multinode.sbatch)::

    srun python -m mpisign.train --model resnet18 --dataset cifar10 --data-dir $DATA \\
        --device cuda --out runs/$SLURM_JOB_ID --resume

Output in ``--out``: ``metrics.jsonl`` (a record every ``--log-every`` steps, one per epoch,
and events), ``run.json`` (configuration, MPI library, ranks and nodes, versions, Slurm job),
``checkpoints/`` (see :mod:`mpisign.train.checkpoint`). SIGUSR1 or SIGTERM on any rank (Slurm's
``--signal``; Open MPI's mpirun forwards SIGUSR1 to the ranks, but ends the job on SIGTERM)
makes every rank stop after the current step, checkpoint and exit 0; ``--resume`` then
continues bit for bit on CPU. An unhandled exception on any rank aborts the whole job.

Timing: ``compute_s`` is forward + backward (+ the attack; ``omniscient``'s extra vote among
the honest ranks and its broadcast count here), ``comm_s`` the optimizer step:
packing, the vote and the update for Signum, the allreduce and the update for SGD. Bytes: what
the vote posted to MPI, exactly; for ``sgd`` the ring-allreduce volume ``8 d (M-1) / M``.

Modules: :mod:`~mpisign.train.cli` (the options, ``main``), :mod:`~mpisign.train.loop` (the run,
stage by stage), :mod:`~mpisign.train.data`, :mod:`~mpisign.train.corpus` (``--dataset
pystdlib``), :mod:`~mpisign.train.objectives` (classification or next token),
:mod:`~mpisign.train.models`, :mod:`~mpisign.train.gpt`, :mod:`~mpisign.train.updates`,
:mod:`~mpisign.train.checkpoint`, :mod:`~mpisign.train.metrics` (the books),
:mod:`~mpisign.train.baseline` (the fp32 allreduce) and :mod:`~mpisign.train.options` (what the
command line shares with ``mpisign.diagnostics``). Importing this package loads none of them:
the names below load their module on first use.
"""

import importlib

#: The names this package offers, and the module each lives in.
_EXPORTS = {
    "main": "cli", "run": "cli", "build_parser": "cli",
    "train": "loop", "learning_rate": "loop", "load_checkpoint": "checkpoint",
    "UsageError": "options", "positive_int": "options", "nonnegative_int": "options",
    "DEFAULT_LR": "options", "DEFAULT_EPOCHS": "options", "DEFAULT_EXAMPLES": "options",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
