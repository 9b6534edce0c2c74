"""mpisign: signSGD, Signum and Lion with majority vote over MPI.

Bernstein, Zhao, Azizzadenesheli, Anandkumar, "signSGD with majority vote is communication
efficient and fault tolerant", ICLR 2019. Every worker sends one bit per coordinate, the sign of
its gradient (or momentum); every worker steps by the majority of the signs.

    from mpisign import Signum
    opt = Signum(model.parameters(), lr=1e-4, momentum=0.9)   # comm defaults to COMM_WORLD

Lion (Chen et al., 2023) votes the same way (Distributed Lion, Liu et al., NeurIPS 2024):
``mpisign.Lion(model.parameters(), lr=1e-4, betas=(0.9, 0.99), weight_decay=0.1)``.
"""

from .collectives import TOPOLOGIES, VoteTimeout
from .optim.detection import DisagreementMonitor
from .optim.guidance import LearningRateWarning
from .optim.recovery import RanksLost
from .mpi.elastic import ElasticUnavailable
from .optim import (HyperparameterMismatch, LayoutMismatch, Lion, ParameterDivergence, SignSGD, Signum,
                    StepMismatch, TooFewRanks, VoteStats)
from .backends.packing import n_words, pack_signs, unpack_signs
from .vote import drain_votes, majority_vote
from .script import ShardSampler, on_root, shard
from .optim.state import broadcast_parameters, gather_state_dict, scatter_state_dict
from .mpi.world import SingletonWorld
from .mpi import report as _report

_report.install()   # an error every rank raises alike: one full report, by rank 0

__version__ = "0.1.0"

__all__ = [
    "Signum",
    "SignSGD",
    "Lion",
    "majority_vote",
    "drain_votes",
    "pack_signs",
    "unpack_signs",
    "n_words",
    "TOPOLOGIES",
    "VoteTimeout",
    "LayoutMismatch",
    "ParameterDivergence",
    "HyperparameterMismatch",
    "StepMismatch",
    "VoteStats",
    "SingletonWorld",
    "ElasticUnavailable",
    "TooFewRanks",
    "broadcast_parameters",
    "gather_state_dict",
    "scatter_state_dict",
    "DisagreementMonitor",
    "LearningRateWarning",
    "RanksLost",
    "shard",
    "ShardSampler",
    "on_root",
]
