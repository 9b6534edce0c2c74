"""The step header's words and verdicts (mpisign.optim.header), without MPI: every rank holds
every header and reaches the same verdict."""

import math

import pytest

from mpisign.optim.header import (UNKNOWN, HyperparameterMismatch, LayoutMismatch,
                                  ParameterDivergence, StepHeader, StepMismatch,
                                  every_gradient_everywhere, verdict)


def header(step=3, layout=11, hparams=22, params=0, values=(0.01, 0.9, 0.0), absent=0,
           nonfinite=0):
    return StepHeader(step, layout, hparams, params, *values, absent, nonfinite)


def test_a_header_travels_as_nine_words_and_back():
    h = header(params=StepHeader.word(0.125), values=(1e-3, 0.99, 5e-4), absent=UNKNOWN,
               nonfinite=2**40 + 3)
    words = h.pack()
    assert words.shape == (9,)
    back = StepHeader.unpack(words)
    assert back == h and back.previous_disagreement == 0.125 and back.nonfinite == 2**40 + 3
    assert math.isnan(StepHeader.unpack(header(params=StepHeader.word(math.nan)).pack())
                      .previous_disagreement)


def test_agreeing_headers_pass_and_say_whether_every_gradient_is_everywhere():
    hs = [header() for _ in range(3)]
    verdict(hs, 1, "3 parameters")
    assert every_gradient_everywhere(hs)
    assert not every_gradient_everywhere(hs[:2] + [header(absent=1)])


@pytest.mark.parametrize("field, change, error, words", [
    ("layout", dict(layout=12), LayoutMismatch, ["rank(s) [2]", "this rank 0: 3 parameters"]),
    ("step", dict(step=4), StepMismatch, ["{0: 3, 2: 4}"]),
    ("hparams", dict(hparams=23, values=(0.02, 0.9, 0.0)), HyperparameterMismatch,
     ["rank(s) [2]", "'lr': 0.02", "'momentum': 0.9"]),
])
def test_one_rank_that_differs_is_named_in_the_same_error_on_every_rank(field, change, error,
                                                                           words):
    hs = [header(), header(), header(**change)]
    for rank in range(3):
        with pytest.raises(error) as e:
            verdict(hs, rank, "3 parameters")
        for w in words:
            assert w in str(e.value).replace(f"this rank {rank}", "this rank 0"), str(e.value)


def test_the_hyperparameters_are_named_as_the_rule_names_them():
    hs = [header(values=(1e-4, 0.9, 0.99)), header(hparams=99, values=(1e-4, 0.95, 0.99))]
    with pytest.raises(HyperparameterMismatch, match="'beta1': 0.95"):
        verdict(hs, 0, "", names=("lr", "beta1", "beta2"))


def test_parameters_that_start_apart_are_caught_at_step_0_only():
    hs = [header(step=0, params=5), header(step=0, params=6)]
    with pytest.raises(ParameterDivergence, match=r"rank\(s\) \[1\].*broadcast_parameters"):
        verdict(hs, 0, "")
    verdict([header(step=1, params=5), header(step=1, params=6)], 0, "")   # later: a figure
