"""Diagnostics of signSGD's theory on a real model: noise shape, SNR phases, density, the vote.

Bernstein, Zhao, Azizzadenesheli, Anandkumar, "signSGD with majority vote is communication
efficient and fault tolerant" (ICLR 2019) prove small-batch convergence under assumption 4:
each coordinate's gradient noise is unimodal and symmetric about its mean. Then a worker's
sign is wrong with probability at most ``2 / (9 S_i^2)`` for a high signal-to-noise ratio
``S_i = |g_i| / sigma_i > 2/sqrt(3)`` (Lemma 1), and a majority of M independent workers is
wrong far less often, as a batch M times larger would be. This measures all of it::

    python -m mpisign.diagnostics --out diag/init                      # the initial model
    python -m mpisign.diagnostics --checkpoint runs/signum --init --out diag/run
    python -m mpisign.diagnostics --checkpoint runs/a/checkpoints/step-000000468 \\
        --batch-sizes 1,32,256 --vote-workers 1,3,5,9,15,31 --coords 1000 --draws 1000

Model and data options are those of ``python -m mpisign.train`` and default to the
checkpoint's. ``--checkpoint`` takes a run's ``--out`` (every ``step-*`` in its
``checkpoints/``: train keeps the newest only, so copy them aside during a run to follow it),
a checkpoint directory, or a ``common.pt``. What lands in ``--out``:

* ``noise-<point>.png``: histograms of the noise at each batch size (example coordinates, all
  coordinates standardized, per-coordinate skewness);
* ``snr.png``: H (fraction of coordinates with S_i > 2/sqrt(3)) over the points, per batch size,
  and the distribution of S_i;
* ``vote-<point>.png``: P(sign wrong) against M: measured vote, binomial prediction, and the
  sign of the mean of the same M draws (batch M*B: what an fp32 allreduce would get);
* ``summary.json``, ``verdict.txt`` (printed too), ``coordinates-<point>.npz`` (per-coordinate
  mean, sigma, S_i, skewness, unimodality statistic, sign error, per batch size).

Modules: :mod:`.stats` (the statistics, on arrays), :mod:`.gradients` (drawing gradients from
the model), :mod:`.measure` (one point), :mod:`.report` (verdicts), :mod:`.figures`,
:mod:`.cli`.
"""

from .cli import main
from .measure import Options, measure_point
from .stats import (HIGH_SNR, binomial_majority_error, density, high_snr_fraction, majority_error,
                    sign_error, skewness, snr, unimodality)

__all__ = ["main", "Options", "measure_point", "HIGH_SNR", "skewness", "unimodality", "snr",
           "high_snr_fraction", "sign_error", "majority_error", "binomial_majority_error",
           "density"]
