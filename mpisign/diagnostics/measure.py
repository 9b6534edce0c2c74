"""Measure one point of training: noise shape, SNR, sign and vote errors, densities.

:func:`measure_point` returns a JSON-ready summary and the per-coordinate arrays behind it
(for the figures and ``<label>-coordinates.npz``). The steps, numbered as in the code:

1. The gradient of the pool's mean loss g (all d coordinates), and for the per-example method
   every pool example's gradient at the K sampled coordinates.
2. For each batch size B: N draws of a worker's minibatch gradient at the K coordinates; the
   noise is draw - g. Its skewness and a unimodality test per coordinate (assumption 4), the
   SNR S_i = |g_i| / sigma_i and the fraction above 2/sqrt(3), the sign error per coordinate
   against Lemma 1's bound, and the vote: measured P(majority of M wrong) against the binomial
   prediction and against the sign of the mean of the same M draws (batch M*B).
3. Densities: of g, of whole-vector noise draws at each B, of sigma over the sampled
   coordinates, and of a curvature proxy (Hutchinson's diagonal of the Hessian).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from . import stats
from .gradients import (Coordinates, PerExampleGradients, hessian_diagonal, minibatch_draws,
                        per_example_draws, pool_gradient, supports_per_example)
from ..train.data import _loader

__all__ = ["Options", "measure_point", "choose_method"]

log = logging.getLogger(__name__)


@dataclass
class Options:
    """What :func:`measure_point` draws and how much of it."""

    batch_sizes: tuple = (1, 32, 256)
    draws: int = 1000               # minibatch gradients per batch size
    vote_workers: tuple = (1, 3, 5, 9, 15, 31)
    vote_trials: int = 2000         # M-worker votes simulated per M (from the N draws)
    method: str = "auto"            # per-example | minibatch | auto
    unimodality: str = "auto"       # dip | bc | auto
    chunk: int = 256                # examples per pass over the pool
    density_draws: int = 2          # whole-vector noise draws per batch size
    hessian_probes: int = 4         # Hutchinson probes (0: no curvature proxy)
    hessian_examples: int = 512
    loader_workers: int = 0
    device: str = "cpu"


def choose_method(model, method: str) -> str:
    ok, why = supports_per_example(model)
    if method == "auto":
        if not ok:
            log.info("per-example gradients not exact here (%s): one backward pass per draw",
                     why)
        return "per-example" if ok else "minibatch"
    if method == "per-example" and not ok:
        raise ValueError(f"--method per-example is not exact for this model: {why}")
    return method


def _weighted(err: np.ndarray, weight: np.ndarray) -> float:
    ok = ~np.isnan(err)
    w = weight[ok]
    return float((err[ok] * w).sum() / w.sum()) if w.sum() > 0 else float("nan")


def _mean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


def _by_layer(names: list, values: np.ndarray, fn) -> dict:
    names = np.asarray(names)
    return {n: dict(coordinates=int((names == n).sum()), value=fn(values[names == n]))
            for n in dict.fromkeys(names)}


def measure_point(model, dataset, coords: Coordinates, pool: np.ndarray, opt: Options,
                  rng: np.random.Generator) -> tuple[dict, dict]:
    """Measure ``model`` as it stands (train mode); returns ``(summary, arrays)``."""
    device = torch.device(opt.device)
    model.to(device).train()
    method = choose_method(model, opt.method)
    for b in opt.batch_sizes:
        if b > len(pool):
            raise ValueError(f"batch size {b} is larger than the pool of {len(pool)} examples")
    if max(opt.vote_workers) > opt.draws:
        raise ValueError(f"a vote of {max(opt.vote_workers)} workers needs at least that many "
                         f"draws, --draws is {opt.draws}")

    # Step 1: the pool's gradient g, and per-example gradients at the sampled coordinates. ------
    if method == "per-example":
        per_example, g, loss = PerExampleGradients(model, coords).over_pool(
            dataset, pool, opt.chunk, device, opt.loader_workers)
    else:
        per_example = None
        g, loss = pool_gradient(model, dataset, pool, opt.chunk, device, opt.loader_workers)
    g = g.cpu()
    mu = g[torch.as_tensor(coords.flat)].numpy()
    pool_variance = per_example.var(axis=0, dtype=np.float64) if per_example is not None else None
    summary = dict(method=method, pool_examples=len(pool), pool_loss=loss,
                   sigma=("exact over the pool" if per_example is not None
                          else "sample standard deviation of the draws"),
                   coordinates=len(coords), parameters=coords.d,
                   zero_mean_coordinates=int((mu == 0).sum()), batch_sizes={})
    arrays = dict(coordinate=coords.flat, name=np.asarray(coords.names), mean=mu)

    # Step 2: per batch size, draws of a worker's gradient and what they say. --------------------
    noise_density = {}
    for b in opt.batch_sizes:
        if method == "per-example":
            draws = per_example_draws(per_example, b, opt.draws, rng)
            _, whole = minibatch_draws(model, dataset, pool, b, opt.density_draws, coords, rng,
                                       device, opt.loader_workers, full=opt.density_draws)
        else:
            draws, whole = minibatch_draws(model, dataset, pool, b, opt.draws, coords, rng,
                                           device, opt.loader_workers, full=opt.density_draws)
        noise_density[str(b)] = _mean(np.array([stats.density((w - g).numpy())
                                                for w in whole])) if whole else None
        exact = None
        if per_example is not None:
            # sigma of a mean of B of the pool's P examples, drawn without replacement.
            exact = np.sqrt(pool_variance * (len(pool) - b) / (b * max(1, len(pool) - 1)))
        record, found = _one_batch_size(draws, mu, exact, coords.names, opt, rng)
        summary["batch_sizes"][str(b)] = record
        arrays.update({f"{k}_b{b}": v for k, v in found.items()})
        verdict = record["noise"]
        log.info("B=%d: median |skew| %.2f, multimodal %.1f%%, H %.1f%%, sign error %.3f",
                 b, verdict.get("median_abs_skew", math.nan),
                 100 * verdict.get("frac_multimodal", math.nan),
                 100 * record["snr"]["high_fraction"], record["sign_error"]["mean"])

    # Step 3: densities. -------------------------------------------------------------------------
    b0 = min(opt.batch_sizes)
    dens = dict(gradient=stats.density(g.numpy()), noise=noise_density,
                sigma_sampled=stats.density(arrays[f"sigma_b{b0}"]), sigma_batch_size=b0)
    if opt.hessian_probes > 0:
        n = min(opt.hessian_examples, len(pool))
        x, y = next(iter(_loader(dataset, [pool[:n].tolist()], opt.loader_workers)))
        gen = torch.Generator().manual_seed(int(rng.integers(2 ** 31)))
        h = hessian_diagonal(model, x.to(device), y.to(device), opt.hessian_probes, gen)
        h = h.cpu().numpy()
        dens.update(curvature=stats.density(h), curvature_l1_over_d_linf=stats.curvature_density(h),
                    curvature_examples=n, curvature_probes=opt.hessian_probes)
    summary["density"] = dens
    model.zero_grad(set_to_none=True)
    return summary, arrays


def _one_batch_size(draws: np.ndarray, mu: np.ndarray, exact_sigma, names: list, opt: Options,
                    rng: np.random.Generator) -> tuple[dict, dict]:
    """Step 2 at one batch size: the summary record and per-coordinate arrays of the draws."""
    weight = np.abs(mu)
    noise = draws - mu
    # Assumption 4: symmetric (skewness) and unimodal (dip test or BC).
    skew = stats.skewness(noise)
    uni = stats.unimodality(noise, opt.unimodality)
    verdict = stats.noise_verdict(skew, uni["reject"], uni["defined"])
    verdict["unimodality_test"] = uni["method"]
    # SNR and the paper's H: sigma exact when given (per-example), else the draws' sample sd.
    s, sigma = stats.snr(draws, mu)
    if exact_sigma is not None:
        sigma = exact_sigma
        with np.errstate(divide="ignore", invalid="ignore"):
            s = np.abs(mu) / sigma
    # The sign: per-coordinate error, and where it breaks Lemma 1's bound (beyond 3 SE).
    p = stats.sign_error(draws, mu)
    defined = ~np.isnan(p)
    se = np.sqrt(np.clip(p * (1 - p), 1 / len(draws), None) / len(draws))
    ok = defined & ~np.isnan(s)
    over = ok & (p > stats.lemma1_bound(s) + 3 * se)
    # Wrong more often than right (median and mean of opposite signs: skewed noise): the vote
    # of many workers drives such a coordinate to the wrong sign.
    backwards = defined & (p > 0.5 + 3 * se)
    # The vote.
    vote = {}
    for m in opt.vote_workers:
        measured, mean_of_m = stats.majority_error(draws, mu, m, opt.vote_trials, rng)
        predicted = stats.binomial_majority_error(p, m)
        vote[str(m)] = dict(
            measured=_mean(measured), binomial=_mean(predicted), mean_of_workers=_mean(mean_of_m),
            measured_weighted=_weighted(measured, weight),
            binomial_weighted=_weighted(predicted, weight),
            mean_of_workers_weighted=_weighted(mean_of_m, weight))
    record = dict(
        noise=verdict,
        snr=dict(high_fraction=stats.high_snr_fraction(s),
                 median=float(np.nanmedian(s)) if np.any(~np.isnan(s)) else None,
                 high_fraction_by_layer=_by_layer(names, s, stats.high_snr_fraction)),
        sign_error=dict(mean=_mean(p), weighted=_weighted(p, weight),
                        lemma1_violations=float(over.sum() / max(1, ok.sum())),
                        wrong_more_often=float(backwards.sum() / max(1, defined.sum())),
                        wrong_more_often_weighted=_weighted(np.where(defined, backwards, np.nan),
                                                            weight)),
        vote=vote)
    found = dict(noise=noise.astype(np.float32), sigma=sigma, snr=s, skew=skew,
                 unimodal_stat=uni["stat"], sign_error=p)
    if uni["pvalue"] is not None:
        found["dip_pvalue"] = uni["pvalue"]
    return record, found
