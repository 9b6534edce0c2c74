"""The verdicts: one short paragraph per assumption, from the summaries of measured points.

Each ``verdict_*`` returns ``(lines, record)``: text for ``verdict.txt`` and the console, and
the same conclusions as JSON for ``summary.json["verdicts"]``.
"""

from __future__ import annotations

import math

from . import stats

__all__ = ["verdict_noise", "verdict_snr", "verdict_density", "verdict_vote", "verdicts"]


def _pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _num(x, fmt=".3g") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def verdict_noise(points: list) -> tuple[list, dict]:
    lines = ["Assumption 4 - each coordinate's gradient noise is unimodal and symmetric "
             f"(holds: median |skew| <= {stats.SKEW_SYMMETRIC}, <= 10% of coordinates with "
             f"|skew| > {stats.SKEW_LARGE} and <= 10% rejected as multimodal):"]
    record = {}
    for pt in points:
        record[pt["label"]] = {}
        for b, r in pt["batch_sizes"].items():
            n = r["noise"]
            test = "dip p<0.05" if n.get("unimodality_test") == "dip" else "BC>5/9"
            record[pt["label"]][b] = dict(verdict=n["verdict"],
                                          lemma1_violations=r["sign_error"]["lemma1_violations"])
            if n["verdict"] == "undefined":
                lines.append(f"  {pt['label']:>16} B={b:<4} undefined (no coordinate has noise)")
                continue
            lines.append(
                f"  {pt['label']:>16} B={b:<4} {n['verdict'].upper():<13} median |skew| "
                f"{n['median_abs_skew']:.2f}, |skew|>{stats.SKEW_LARGE:g} on "
                f"{_pct(n['frac_abs_skew_gt_large'])}, multimodal ({test}) on "
                f"{_pct(n['frac_multimodal'])} of {n['coordinates']}; sign error above "
                f"Lemma 1's bound on {_pct(r['sign_error']['lemma1_violations'])}")
    return lines, record


def verdict_snr(points: list, reference_batch: int) -> tuple[list, dict]:
    lines = ["SNR phases - H = fraction of coordinates with S_i = |g_i|/sigma_i > 2/sqrt(3) "
             "(sigma_i of a worker's minibatch gradient):"]
    record = {}
    for pt in points:
        h = {b: r["snr"]["high_fraction"] for b, r in pt["batch_sizes"].items()}
        ref = h.get(str(reference_batch))
        phase = "n/a" if ref is None or math.isnan(ref) else (
            "high-SNR phase (most coordinates above the threshold)" if ref > 0.5 else
            "low-SNR phase (most coordinates below the threshold)")
        zero = pt["zero_mean_coordinates"] / max(1, pt["coordinates"])
        record[pt["label"]] = dict(step=pt["step"], high_fraction=h, phase=phase,
                                   zero_gradient=zero)
        lines.append(f"  {pt['label']:>16} " + ", ".join(f"B={b}: {_pct(v)}" for b, v in h.items())
                     + f" -> at B={reference_batch}: {phase}; gradient exactly 0 on the whole "
                       f"pool (dead units, left out): {_pct(zero)}")
    return lines, record


def verdict_density(points: list) -> tuple[list, dict]:
    lines = ["Density - phi(v) = ||v||_1^2 / (d ||v||_2^2) (1: dense, 1/d: one coordinate); "
             "curvature phi(L) = ||L||_1 / (d ||L||_inf), L = |Hutchinson diag(H)|. signSGD's "
             "bound is the tighter one when phi(L) <= phi(g) and phi(sigma) <= phi(g) "
             "(Bernstein et al., ICML 2018, Sec. 3; sigma over the sampled coordinates):"]
    record = {}
    for pt in points:
        d = pt["density"]
        noise = ", ".join(f"B={b}: {_num(v)}" for b, v in d["noise"].items())
        curv = d.get("curvature_l1_over_d_linf")
        g, s = d["gradient"], d["sigma_sampled"]
        favours = None
        if curv is not None and not math.isnan(curv) and not math.isnan(g):
            favours = bool(curv <= g and s <= g)
        record[pt["label"]] = dict(gradient=g, sigma=s, noise=d["noise"], curvature=curv,
                                   sign_favoured=favours)
        tail = "" if favours is None else (" -> sign descent favoured" if favours else
                                           " -> SGD's bound is the tighter one")
        lines.append(f"  {pt['label']:>16} phi(g) {_num(g)}, phi(sigma) {_num(s)}, phi(noise) "
                     f"{noise}, phi(L) {_num(curv)}{tail}")
    return lines, record


def verdict_vote(points: list) -> tuple[list, dict]:
    lines = ["The vote - P(sign wrong), mean over sampled coordinates [|g_i|-weighted]: one "
             "worker; majority of M measured on independent draws; binomial prediction from "
             "each coordinate's single-worker error; sign of the mean of the same M draws "
             "(batch M*B, what an fp32 allreduce gets). Coordinates on which one worker is "
             "wrong more often than right (skewed noise) go the wrong way under the vote:"]
    record = {}
    for pt in points:
        record[pt["label"]] = {}
        for b, r in pt["batch_sizes"].items():
            v = r["vote"]
            ms = sorted(v, key=int)
            one, top = v[ms[0]], v[ms[-1]]
            gap = max(abs(x["measured"] - x["binomial"]) for x in v.values())
            independent = gap <= 0.02
            record[pt["label"]][b] = dict(single=one["measured"], workers=int(ms[-1]),
                                          majority=top["measured"], binomial=top["binomial"],
                                          mean_of_workers=top["mean_of_workers"],
                                          max_gap_to_binomial=gap,
                                          matches_binomial=independent,
                                          wrong_more_often=r["sign_error"]["wrong_more_often"])
            lines.append(
                f"  {pt['label']:>16} B={b:<4} M={ms[0]}: {_pct(one['measured'])} "
                f"[{_pct(one['measured_weighted'])}]; M={ms[-1]}: vote "
                f"{_pct(top['measured'])} [{_pct(top['measured_weighted'])}], binomial "
                f"{_pct(top['binomial'])} [{_pct(top['binomial_weighted'])}], mean of M "
                f"{_pct(top['mean_of_workers'])} [{_pct(top['mean_of_workers_weighted'])}]; "
                f"{'matches' if independent else 'DEVIATES from'} the binomial "
                f"(max gap {gap:.3f}); wrong more often than right on "
                f"{_pct(r['sign_error']['wrong_more_often'])} "
                f"[{_pct(r['sign_error']['wrong_more_often_weighted'])}]")
    return lines, record


def verdicts(points: list, reference_batch: int) -> tuple[str, dict]:
    """All four paragraphs as one text, and their records."""
    text, record = [], {}
    for key, (lines, rec) in (("assumption4", verdict_noise(points)),
                              ("snr", verdict_snr(points, reference_batch)),
                              ("density", verdict_density(points)),
                              ("vote", verdict_vote(points))):
        text += lines + [""]
        record[key] = rec
    return "\n".join(text), record
