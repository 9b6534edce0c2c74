"""Figures of the diagnostics (matplotlib, Agg backend): noise histograms, SNR phases, vote.

* ``noise_figure``: one row per batch size; four example coordinates, then every sampled
  coordinate's noise standardized by its own sigma (against N(0, 1)), then the distribution of
  the per-coordinate skewness.
* ``snr_figure``: H (fraction with S_i > 2/sqrt(3)) against the training step, one line per
  batch size; and the distribution of S_i at each point for one batch size.
* ``vote_figure``: P(sign wrong) against the number of workers M: the measured vote, the
  binomial prediction, and the sign of the mean of the same M draws; plain and |g|-weighted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import stats

__all__ = ["noise_figure", "snr_figure", "vote_figure", "example_coordinates"]

DPI = 80


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def example_coordinates(arrays: dict, batch_sizes, count: int, rng) -> list[int]:
    """``count`` coordinates with noise at every batch size, from distinct layers if possible."""
    ok = np.ones(len(arrays["mean"]), dtype=bool)
    for b in batch_sizes:
        ok &= np.isfinite(arrays[f"skew_b{b}"])
    candidates = rng.permutation(np.flatnonzero(ok))
    chosen, layers = [], set()
    for k in candidates:
        if arrays["name"][k] not in layers:
            chosen.append(int(k))
            layers.add(arrays["name"][k])
        if len(chosen) == count:
            return chosen
    rest = [int(k) for k in candidates if k not in chosen]
    return chosen + rest[: count - len(chosen)]


def noise_figure(arrays: dict, point: dict, path: Path, rng) -> Path:
    plt = _pyplot()
    sizes = list(point["batch_sizes"])
    examples = example_coordinates(arrays, sizes, 4, rng)
    cols = len(examples) + 2
    fig, axes = plt.subplots(len(sizes), cols, figsize=(2.6 * cols, 2.2 * len(sizes)),
                             squeeze=False)
    test = point["batch_sizes"][sizes[0]]["noise"].get("unimodality_test", "dip")
    for row, b in enumerate(sizes):
        noise, skew = arrays[f"noise_b{b}"], arrays[f"skew_b{b}"]
        pvals = arrays.get(f"dip_pvalue_b{b}")
        for col, k in enumerate(examples):
            ax = axes[row, col]
            ax.hist(noise[:, k], bins=40, color="C0", alpha=0.8)
            ax.axvline(0, color="k", lw=0.6)
            uni = (f"dip p {pvals[k]:.2f}" if pvals is not None
                   else f"BC {arrays[f'unimodal_stat_b{b}'][k]:.2f}")
            ax.set_title(f"skew {skew[k]:.2f}, {uni}", fontsize=8)
            ax.tick_params(labelsize=6)
            ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3))
            ax.xaxis.get_offset_text().set_fontsize(6)
            ax.locator_params(axis="x", nbins=4)
            ax.set_yticks([])
            if row == 0:
                ax.text(0.5, 1.25, f"{arrays['name'][k]}[{arrays['coordinate'][k]}]",
                        transform=ax.transAxes, ha="center", fontsize=8)
            if col == 0:
                ax.set_ylabel(f"B = {b}", fontsize=10)
        # Every coordinate, standardized by its own sigma.
        sigma = arrays[f"sigma_b{b}"]
        ok = np.isfinite(skew) & (sigma > 0)
        z = (noise[:, ok] / sigma[ok]).ravel()
        ax = axes[row, -2]
        grid = np.linspace(-6, 6, 200)
        ax.hist(np.clip(z, -6, 6), bins=80, density=True, color="C2", alpha=0.8)
        ax.plot(grid, np.exp(-grid ** 2 / 2) / np.sqrt(2 * np.pi), "k--", lw=0.8, label="N(0,1)")
        ax.set_yscale("log")
        ax.set_ylim(1e-5, None)
        ax.tick_params(labelsize=6)
        n = point["batch_sizes"][b]["noise"]
        ax.set_title(f"all {int(ok.sum())}, noise/sigma_i", fontsize=8)
        if row == 0:
            ax.legend(fontsize=6, loc="lower center")
        ax = axes[row, -1]
        ax.hist(np.clip(skew[ok], -5, 5), bins=50, color="C3", alpha=0.8)
        for x in (-stats.SKEW_SYMMETRIC, stats.SKEW_SYMMETRIC):
            ax.axvline(x, color="k", lw=0.6, ls=":")
        ax.set_title(f"skewness per coordinate: {n['verdict']}", fontsize=8)
        ax.set_xlabel("clipped to [-5, 5]", fontsize=6)
        ax.tick_params(labelsize=6)
        ax.set_yticks([])
    fig.suptitle(f"{point['label']}: gradient noise (minibatch - mean) at sampled coordinates; "
                 f"unimodality by {'Hartigan dip test' if test == 'dip' else 'bimodality coeff.'}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def snr_figure(points: list, arrays: list, path: Path, reference_batch: int) -> Path:
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    steps = [p["step"] for p in points]
    for i, b in enumerate(points[0]["batch_sizes"]):
        h = [p["batch_sizes"][b]["snr"]["high_fraction"] for p in points]
        left.plot(steps, h, "o-", color=f"C{i}", label=f"B = {b}")
    left.set_xscale("symlog", linthresh=max(1, min([s for s in steps if s > 0], default=1)))
    left.set_xlabel("training step")
    left.set_ylabel("H: fraction with S_i > 2/sqrt(3)")
    left.set_ylim(0, 1)
    left.grid(True, alpha=0.3)
    left.legend(fontsize=8)
    left.set_title("high-SNR coordinates over training")
    cmap = plt.get_cmap("viridis")
    for i, (p, a) in enumerate(zip(points, arrays)):
        s = a[f"snr_b{reference_batch}"]
        s = np.sort(s[np.isfinite(s) & (s > 0)])
        if s.size:
            right.plot(s, np.arange(1, s.size + 1) / s.size,
                       color=cmap(i / max(1, len(points) - 1)), label=p["label"])
    right.axvline(stats.HIGH_SNR, color="k", ls="--", lw=0.8, label="2/sqrt(3)")
    right.set_xscale("log")
    right.set_xlabel(f"S_i = |g_i| / sigma_i at B = {reference_batch}")
    right.set_ylabel("fraction of coordinates below")
    right.grid(True, alpha=0.3)
    right.legend(fontsize=7)
    right.set_title("per-coordinate SNR")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def vote_figure(point: dict, path: Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=False)
    for ax, suffix, title in ((axes[0], "", "mean over coordinates"),
                              (axes[1], "_weighted", "weighted by |g_i|")):
        for i, (b, r) in enumerate(point["batch_sizes"].items()):
            ms = sorted(r["vote"], key=int)
            x = [int(m) for m in ms]
            get = lambda key: [r["vote"][m][key + suffix] for m in ms]  # noqa: E731
            ax.plot(x, get("measured"), "o-", color=f"C{i}", label=f"B = {b}")
            ax.plot(x, get("binomial"), "--", color=f"C{i}", lw=1)
            ax.plot(x, get("mean_of_workers"), ":", color=f"C{i}", lw=1.5)
        ax.set_xlabel("workers M")
        ax.set_ylabel("P(sign wrong)")
        ax.set_title(f"{point['label']}: {title}", fontsize=10)
        ax.grid(True, alpha=0.3)
    from matplotlib.lines import Line2D

    styles = [Line2D([], [], color="gray", marker="o", ls="-", label="majority vote (measured)"),
              Line2D([], [], color="gray", ls="--", label="binomial from 1 worker's error"),
              Line2D([], [], color="gray", ls=":", label="sign of mean of M (batch M*B)")]
    axes[0].legend(fontsize=7, loc="upper right")
    axes[1].legend(handles=styles, fontsize=7, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
