"""The vote engine and the optimizers built on it: the layout of a step's packed message
(:mod:`.layout`), the step header (:mod:`.header`), overlap's hooks (:mod:`.overlap`), elastic
recovery (:mod:`.recovery`), the monitor (:mod:`.detection`), state across ranks (:mod:`.state`),
and the optimizers (:mod:`.signum`, :mod:`.lion`)."""

from .signum import (HyperparameterMismatch, LayoutMismatch, ParameterDivergence, SignSGD,
                     Signum, StepMismatch, TooFewRanks, VoteStats)
from .lion import Lion

__all__ = ["Signum", "SignSGD", "Lion", "LayoutMismatch", "ParameterDivergence",
           "HyperparameterMismatch", "StepMismatch", "TooFewRanks", "VoteStats"]
