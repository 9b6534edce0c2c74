"""One report of an error that every rank raises alike (mpisign.mpi.report), on real ranks
launched as users launch them (python -m mpi4py, as mpisign.launch does)."""

from __future__ import annotations

import pytest

import mpirun
import mpisign
from mpisign.mpi import report

DIGITS = ["--dataset", "digits", "--batch-size", "32", "--no-progress", "--max-steps", "2"]


def test_an_agreed_error_is_printed_in_full_once():
    out = mpirun.run(3, "report_check.py", "divergence", expect_fail=True, timeout=90)
    assert out.count("Traceback (most recent call last)") == 1, out
    assert "[rank 0] Traceback" in out
    assert "broadcast_parameters" in out   # the full message, by rank 0
    for r in (1, 2):
        line = f"[rank {r}] ParameterDivergence: at step 0"
        assert line in out, out
        assert "(raised alike on all 3 ranks; rank 0 prints it in full)" in out
    assert out.count("(raised alike on all 3 ranks") <= 2


def test_an_error_of_one_rank_keeps_its_traceback():
    out = mpirun.run(3, "report_check.py", "own", expect_fail=True, timeout=90)
    assert "Traceback (most recent call last)" in out and "a mistake of rank 1 alone" in out
    assert "raised alike" not in out


def test_the_training_command_reports_an_agreed_error_once(tmp_path):
    out = mpirun.run(3, "report_check.py", "train", *DIGITS, "--out", str(tmp_path),
                     expect_fail=True, timeout=120)
    assert out.count("Traceback (most recent call last)") == 1, out
    assert "[rank 0] unhandled exception, aborting all 3 ranks" in out
    assert "[rank 1] StepMismatch: injected on every rank alike (raised alike" in out
    assert "[rank 1] unhandled exception" not in out


def test_which_errors_are_agreed():
    assert report.agreed(mpisign.ParameterDivergence("x"))
    assert report.agreed(mpisign.LayoutMismatch("x"))
    assert not report.agreed(mpisign.VoteTimeout("x"))   # the ranks may time out on different ones
    try:
        try:
            raise mpisign.StepMismatch("inner")
        except mpisign.StepMismatch as e:
            raise RuntimeError("outer") from e
    except RuntimeError as e:
        assert report.agreed(e)   # raised from an agreed error
    text = report.describe(mpisign.HyperparameterMismatch("lr differs\nmore"), 2, 4)
    assert text == ("[rank 2] HyperparameterMismatch: lr differs (raised alike on all 4 ranks; "
                    "rank 0 prints it in full)\n")
    assert "Traceback" in report.describe(_raised(mpisign.HyperparameterMismatch("x")), 0, 4)
    assert "Traceback" in report.describe(_raised(ValueError("x")), 2, 4)


def _raised(error):
    try:
        raise error
    except Exception as e:
        return e
