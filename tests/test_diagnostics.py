"""Tests of mpisign.diagnostics: the statistics on synthetic gradients whose law is known, the
per-example gradients against autograd one example at a time, and the CLI end to end."""

import json
import math

import numpy as np
import pytest
import torch

from mpisign.diagnostics import stats
from mpisign.diagnostics.cli import find_checkpoints, main
from mpisign.diagnostics.gradients import (PerExampleGradients, _conv_patches, flat_gradient,
                                           minibatch_draws, per_example_draws, sample_coordinates,
                                           supports_per_example)
from mpisign.train.models import build_model

N, K = 2000, 40
needs_diptest = pytest.mark.skipif(not stats.have_diptest(), reason="pip install diptest")


def _phi(x):
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# -- shape of the noise --------------------------------------------------------------------------
@needs_diptest
def test_symmetric_unimodal_noise_passes(rng):
    x = rng.normal(size=(N, K))
    skew = stats.skewness(x)
    assert np.median(np.abs(skew)) < 0.1            # SE of the skewness ~ sqrt(6/N) = 0.055
    uni = stats.unimodality(x, "dip")
    assert uni["reject"].mean() <= 0.15              # a 5% test: a few by chance at most
    assert stats.noise_verdict(skew, uni["reject"], uni["defined"])["verdict"] == "holds"
    assert (stats.bimodality_coefficient(x) < stats.BC_BIMODAL).all()   # normal: BC = 1/3
    assert np.abs(np.median(stats.excess_kurtosis(x))) < 0.2


@needs_diptest
def test_skewed_noise_is_called_skewed(rng):
    x = rng.exponential(size=(N, K)) - 1             # skewness 2, unimodal
    skew = stats.skewness(x)
    assert np.median(skew) == pytest.approx(2, abs=0.4)
    uni = stats.unimodality(x, "dip")
    assert uni["reject"].mean() <= 0.15              # skewed, but one mode
    verdict = stats.noise_verdict(skew, uni["reject"], uni["defined"])
    assert verdict["verdict"] == "fails" and verdict["frac_abs_skew_gt_large"] > 0.9


@pytest.mark.parametrize("method", [pytest.param("dip", marks=needs_diptest), "bc"])
def test_bimodal_noise_rejects_unimodality(rng, method):
    side = rng.integers(0, 2, size=(N, K)) * 6 - 3   # modes at -3 and +3, sd 1: symmetric
    x = side + rng.normal(size=(N, K))
    skew = stats.skewness(x)
    assert np.median(np.abs(skew)) < 0.15
    uni = stats.unimodality(x, method)
    assert uni["method"] == method and uni["reject"].all()
    if method == "dip":
        assert (uni["pvalue"] < 0.01).all()
    assert stats.noise_verdict(skew, uni["reject"], uni["defined"])["verdict"] == "fails"


@needs_diptest
def test_constant_coordinates_are_undefined_not_errors():
    x = np.zeros((50, 3))
    x[:, 1] = np.arange(50)
    assert np.isnan(stats.skewness(x)[[0, 2]]).all() and np.isfinite(stats.skewness(x)[1])
    uni = stats.unimodality(x, "dip")
    assert list(uni["defined"]) == [False, True, False] and not uni["reject"][[0, 2]].any()


# -- SNR and the sign ----------------------------------------------------------------------------
def test_snr_fraction_matches_hand_computation(rng):
    ratios = np.array([0.5, 1.0, 1.15, 1.16, 2.0, 10.0])    # 2/sqrt(3) = 1.1547
    sigma = np.array([1.0, 2.0, 0.5, 3.0, 0.1, 1e-3])
    z = rng.normal(size=(100, len(ratios)))
    z = (z - z.mean(0)) / z.std(0, ddof=1)                  # sample sd exactly 1
    mean = ratios * sigma * np.array([1, -1, 1, -1, 1, -1])
    s, sd = stats.snr(mean + sigma * z, mean)
    np.testing.assert_allclose(sd, sigma)
    np.testing.assert_allclose(s, ratios)
    assert stats.high_snr_fraction(s) == pytest.approx(3 / 6)
    assert stats.high_snr_fraction(np.array([np.nan, 0.1, np.inf])) == pytest.approx(1 / 2)
    assert stats.HIGH_SNR == pytest.approx(2 / math.sqrt(3))


def test_sign_error_counts_zero_as_half():
    draws = np.array([[1.0, -2.0, 0.0], [3.0, 2.0, 0.0], [-1.0, 0.0, 1.0], [2.0, 5.0, 4.0]])
    mean = np.array([1.0, 1.0, 0.0])
    p = stats.sign_error(draws, mean)
    np.testing.assert_allclose(p[:2], [1 / 4, (1 + 0.5) / 4])
    assert np.isnan(p[2])                                   # no true sign to be wrong about


def test_lemma1_bound_and_gaussian_noise():
    s = np.array([0.0, 2 / math.sqrt(3), 3.0])
    np.testing.assert_allclose(stats.lemma1_bound(s), [0.5, 1 / 6, 2 / 81])
    # Gaussian noise is unimodal and symmetric: its sign error Phi(-S) obeys the bound.
    grid = np.linspace(0.01, 10, 500)
    assert all(_phi(-x) <= b + 1e-12 for x, b in zip(grid, stats.lemma1_bound(grid)))


# -- the vote ------------------------------------------------------------------------------------
def test_binomial_formula():
    p = np.array([0.1, 0.3, 0.5])
    np.testing.assert_allclose(stats.binomial_majority_error(p, 1), p)
    np.testing.assert_allclose(stats.binomial_majority_error(p, 3), 3 * p ** 2 * (1 - p) + p ** 3)
    np.testing.assert_allclose(stats.binomial_majority_error(p, 2), p)   # tie counts half
    assert stats.binomial_majority_error(np.array([0.3]), 31)[0] < 0.02


def test_vote_error_matches_binomial_for_independent_workers(rng):
    p = np.linspace(0.05, 0.48, 12)
    truth = np.where(np.arange(12) % 2, 1.0, -1.0)
    wrong = rng.random((N, 12)) < p
    draws = np.where(wrong, -truth, truth) * rng.exponential(size=(N, 12))
    trials = 4000
    for m in (1, 3, 5, 9, 15):
        measured, _ = stats.majority_error(draws, truth, m, trials, rng)
        expected = stats.binomial_majority_error(p, m)
        se = np.sqrt(expected * (1 - expected) / trials) + np.sqrt(p * (1 - p) / N) * m ** 0.5
        assert (np.abs(measured - expected) < 4 * se + 0.01).all(), m
        # ... and from the measured single-worker error, as the diagnostics predict it.
        predicted = stats.binomial_majority_error(stats.sign_error(draws, truth), m)
        assert np.abs(measured.mean() - predicted.mean()) < 0.01


def test_mean_of_workers_is_a_bigger_batch(rng):
    snr = np.array([0.1, 0.3, 0.6])
    draws = snr + rng.normal(size=(N, 3))                    # sigma 1
    measured, mean_of = stats.majority_error(draws, snr, 9, 4000, rng)
    np.testing.assert_allclose(mean_of, [_phi(-3 * s) for s in snr], atol=0.03)  # sqrt(9) S
    assert (measured > mean_of).all()    # the vote throws the magnitudes away: it pays a little
    with pytest.raises(ValueError, match="--draws"):
        stats.majority_error(draws[:5], snr, 9, 10, rng)


def test_density():
    assert stats.density(np.ones(100)) == pytest.approx(1)
    assert stats.density(np.eye(1, 100)[0]) == pytest.approx(1 / 100)
    assert stats.density(np.array([3.0, -3.0, 0.0, 0.0])) == pytest.approx(0.5)
    assert math.isnan(stats.density(np.zeros(5)))
    assert stats.curvature_density(np.array([1.0, -1.0, 2.0, 0.0])) == pytest.approx(4 / 8)


# -- gradients of a real model -------------------------------------------------------------------
def _tiny_model_and_data(n=12):
    torch.manual_seed(0)
    model = build_model("cnn", 1, 10, 8)
    x = torch.randn(n, 1, 8, 8)
    y = torch.randint(0, 10, (n,))
    return model, x, y


def test_per_example_gradients_match_autograd():
    model, x, y = _tiny_model_and_data()
    coords = sample_coordinates(model, 10 ** 9, np.random.default_rng(0))   # every coordinate
    assert len(coords) == coords.d == sum(p.numel() for p in model.parameters())
    G, grad_sum, _ = PerExampleGradients(model, coords)(x, y)
    ref = []
    for i in range(len(y)):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i: i + 1]), y[i: i + 1]).backward()
        ref.append(flat_gradient(model).numpy())
    ref = np.array(ref)
    np.testing.assert_allclose(G, ref, atol=1e-6 * np.abs(ref).max())
    np.testing.assert_allclose(grad_sum.numpy(), ref.sum(0), atol=1e-5)


@pytest.mark.parametrize("conv", [dict(kernel_size=3, padding=1),
                                  dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0),
                                       dilation=(1, 2)),
                                  dict(kernel_size=5, stride=2)])
def test_conv_patches_are_rows_of_unfold(conv):
    m = torch.nn.Conv2d(3, 4, **conv)
    x = torch.randn(2, 3, 11, 9)
    full = torch.nn.functional.unfold(x, m.kernel_size, m.dilation, m.padding, m.stride)
    some = torch.tensor([0, 5, full.shape[1] - 1, 7])
    torch.testing.assert_close(_conv_patches(m, x, some), full[:, some])


def test_both_ways_of_drawing_agree():
    """Same random batches: per-example rows averaged == a backward pass on the batch."""
    model, x, y = _tiny_model_and_data(40)

    class Tensors:
        def __init__(self):
            self.items = list(zip(x, y))

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]

    coords = sample_coordinates(model, 300, np.random.default_rng(1))
    G, _, _ = PerExampleGradients(model, coords)(x, y)
    pool = np.arange(40)
    a = per_example_draws(G, 8, 5, np.random.default_rng(7))
    b, whole = minibatch_draws(model, Tensors(), pool, 8, 5, coords, np.random.default_rng(7),
                               "cpu", full=2)
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert len(whole) == 2 and whole[0].shape == (coords.d,)
    resnet = build_model("resnet18", 1, 10, 8)
    assert not supports_per_example(resnet)[0] and supports_per_example(model)[0]


# -- the command line ----------------------------------------------------------------------------
def test_cli_end_to_end_on_digits(tmp_path, capsys):
    # A checkpoint as mpisign.train writes it (only what diagnostics reads): a trained-ish point.
    torch.manual_seed(3)
    model = build_model("cnn", 1, 10, 8)
    step_dir = tmp_path / "run" / "checkpoints" / "step-000000007"
    step_dir.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "step": 7, "dataset": "digits",
                "config": {"model": "cnn", "dataset": "digits", "seed": 5, "batch_size": 16}},
               step_dir / "common.pt")
    assert find_checkpoints(tmp_path / "run") == [step_dir / "common.pt"]
    out = tmp_path / "diag"
    assert main(["--checkpoint", str(tmp_path / "run"), "--init", "--out", str(out),
                 "--coords", "150", "--examples", "400", "--draws", "60",
                 "--batch-sizes", "1,16", "--vote-workers", "1,3,5", "--vote-trials", "200",
                 "--hessian-examples", "64", "--hessian-probes", "2"]) == 0
    for name in ("noise-init.png", "noise-step-000000007.png", "vote-init.png",
                 "vote-step-000000007.png", "snr.png", "summary.json", "verdict.txt",
                 "coordinates-init.npz"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["name"] == "digits" and summary["config"]["seed"] == 5
    assert [p["label"] for p in summary["points"]] == ["init", "step-000000007"]
    assert summary["reference_batch"] == 16
    point = summary["points"][1]
    assert point["method"] == "per-example" and point["coordinates"] == 150
    b16 = point["batch_sizes"]["16"]
    assert 0 <= b16["snr"]["high_fraction"] <= 1
    assert b16["noise"]["verdict"] in ("holds", "approximately", "fails")
    assert 0 < b16["vote"]["3"]["measured"] < 0.5 + 1e-9
    assert 0 < point["density"]["gradient"] <= 1
    assert set(summary["verdicts"]) == {"assumption4", "snr", "density", "vote"}
    printed = capsys.readouterr().out
    assert "Assumption 4" in printed and printed == (out / "verdict.txt").read_text() + "\n"
    coords = np.load(out / "coordinates-init.npz")
    assert coords["snr_b16"].shape == (150,)


def test_cli_rejects_bad_options(tmp_path):
    with pytest.raises(SystemExit):
        main(["--batch-sizes", "0,3", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["--dataset", "digits", "--draws", "4", "--vote-workers", "1,9",
              "--out", str(tmp_path)])


def test_skewed_noise_sends_the_vote_the_wrong_way(rng):
    """Mean +0.1 but median -0.21 (exponential noise): one worker is wrong 59% of the time,
    and the majority of more workers is wrong more often still, unlike the mean of their
    gradients. This is what assumption 4 (symmetry) rules out."""
    draws = rng.exponential(size=(N, 1)) - 0.9
    truth = np.array([0.1])
    p = stats.sign_error(draws, truth)[0]
    assert p == pytest.approx(1 - math.exp(-0.9), abs=0.03)
    vote = [stats.majority_error(draws, truth, m, 3000, rng) for m in (1, 9, 31)]
    assert vote[0][0][0] < vote[1][0][0] < vote[2][0][0]          # the vote: worse with M
    assert vote[2][1][0] < vote[0][1][0]                           # the mean: better with M
