"""``python -m mpisign.diagnostics``: the command line, top to bottom.

Config (options, the checkpoints to measure), init (data, model, coordinate sample, pool),
then per point: load the weights, measure, draw its figures; at the end the SNR figure across
points, ``summary.json`` and ``verdict.txt``. One process, no MPI needed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

import mpisign

from ..train import checkpoint
from ..train.data import DATASETS, DataNotFound, load_data
from ..train.models import MODELS, build_model, count_parameters
from ..train.options import nonnegative_int, positive_int
from . import figures, report, stats
from .gradients import sample_coordinates, supports_per_example
from .measure import Options, measure_point

__all__ = ["build_parser", "find_checkpoints", "main"]

log = logging.getLogger("mpisign.diagnostics")


def _int_list(text: str) -> tuple:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return tuple(sorted(set(values)))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mpisign.diagnostics",
        description="Check signSGD's assumptions on a real model: gradient noise shape "
                    "(assumption 4), SNR phases, density, and the majority vote's error "
                    "against the binomial prediction (Bernstein et al., ICLR 2019).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    g = p.add_argument_group("model and data (as python -m mpisign.train; default: the "
                             "checkpoint's)")
    g.add_argument("--model", choices=MODELS, default=None, help="default: cnn")
    g.add_argument("--dataset", choices=DATASETS, default=None,
                   help="default: fashion-mnist if installed, else digits")
    g.add_argument("--data-dir", default=None)
    g.add_argument("--workers", type=nonnegative_int, default=0,
                   help="DataLoader workers (0: in the main process)")
    g.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    g.add_argument("--seed", type=int, default=None,
                   help="model init (as in train) and sampling (default: the run's, else 0)")
    g = p.add_argument_group("points to measure")
    g.add_argument("--checkpoint", nargs="+", action="extend", default=[], metavar="PATH",
                   help="a common.pt, a checkpoint directory step-N/, or a train --out "
                        "(every step-*/ under its checkpoints/)")
    g.add_argument("--init", action="store_true",
                   help="also the initial model (always, when no --checkpoint is given)")
    g = p.add_argument_group("sampling")
    g.add_argument("--coords", type=positive_int, default=1000, metavar="K",
                   help="coordinates sampled uniformly from all parameters")
    g.add_argument("--examples", type=positive_int, default=20000, metavar="P",
                   help="training examples in the pool whose mean gradient is 'the' gradient "
                        "(all, if fewer)")
    g.add_argument("--draws", type=positive_int, default=1000, metavar="N",
                   help="minibatch gradients per batch size")
    g.add_argument("--batch-sizes", type=_int_list, default=(1, 32, 256), metavar="B,B,...")
    g.add_argument("--vote-workers", type=_int_list, default=(1, 3, 5, 9, 15, 31),
                   metavar="M,M,...", help="numbers of workers M for the vote-error curve")
    g.add_argument("--vote-trials", type=positive_int, default=2000,
                   help="simulated votes per M")
    g.add_argument("--method", choices=("auto", "per-example", "minibatch"), default="auto",
                   help="per-example: exact and fast, for Linear/Conv2d models without batch "
                        "norm or dropout; minibatch: a backward pass per draw, any model")
    g.add_argument("--unimodality", choices=("auto", "dip", "bc"), default="auto",
                   help="dip: Hartigan's dip test (package diptest); bc: bimodality "
                        "coefficient; auto: dip if installed")
    g.add_argument("--hessian-probes", type=nonnegative_int, default=4,
                   help="Hutchinson probes for the curvature proxy (0: skip)")
    g.add_argument("--hessian-examples", type=positive_int, default=512)
    g.add_argument("--density-draws", type=nonnegative_int, default=2,
                   help="whole-vector noise draws per batch size for its density")
    g.add_argument("--chunk", type=positive_int, default=256,
                   help="examples per pass over the pool")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="default: diagnostics/<date>")
    g.add_argument("--reference-batch", type=positive_int, default=None,
                   help="batch size of the SNR-phase verdict and CDF (default: of --batch-sizes "
                        "the nearest to the run's --batch-size, else the middle one)")
    return p


# -- points ----------------------------------------------------------------------------------------
def find_checkpoints(path) -> list[Path]:
    """The ``common.pt`` files that ``path`` names (see ``--checkpoint``), oldest first."""
    path = Path(path)
    if path.is_file():
        return [path]
    if (path / "common.pt").is_file():
        return [path / "common.pt"]
    for d in (path / "checkpoints", path):
        steps = sorted(s / "common.pt" for s in d.glob("step-*") if (s / "common.pt").is_file())
        if steps:
            return steps
    raise FileNotFoundError(f"--checkpoint {path}: no common.pt there, nor step-*/common.pt in "
                            f"it or in its checkpoints/ (expected a python -m mpisign.train "
                            f"--out, a checkpoint directory, or a common.pt)")


def _load_common(path: Path) -> dict:
    # Data only: a file that asks to run anything is refused (CheckpointError), never run.
    common = checkpoint.load_file(path)
    if not isinstance(common, dict) or "model" not in common:
        raise ValueError(f"{path} is not a checkpoint of python -m mpisign.train (no 'model')")
    return common


def _resolve(args, parser) -> list[dict]:
    """The points (init and checkpoints), and the model/data/seed options filled in."""
    points, seen = [], {}
    for spec in args.checkpoint:
        for f in find_checkpoints(spec):
            common = _load_common(f)
            cfg = dict(common.get("config", {}))
            cfg["dataset"] = common.get("dataset", cfg.get("dataset"))
            for key in ("model", "dataset", "seed"):
                want = getattr(args, key)
                have = cfg.get(key)
                if have is None:
                    continue
                if key in seen and seen[key] != have:
                    parser.error(f"{f}: {key}={have!r}, but another checkpoint has "
                                 f"{seen[key]!r}: measure one run's model at a time")
                seen[key] = have
                if want is not None and want != have and key != "seed":
                    parser.error(f"--{key} {want} contradicts {f}, written with {key}={have}")
            step = int(common.get("step", 0))
            label = f.parent.name if f.parent.name.startswith("step-") else f"step-{step:09d}"
            points.append(dict(label=label, step=step, source=str(f), state=common["model"],
                               batch_size=cfg.get("batch_size")))
    args.model = args.model or seen.get("model", "cnn")
    if args.model not in MODELS:
        parser.error(f"the checkpoints are of --model {args.model}: the diagnostics measure the "
                     f"image classifiers ({', '.join(MODELS)})")
    args.dataset = args.dataset or seen.get("dataset")
    args.seed = args.seed if args.seed is not None else seen.get("seed", 0)
    points.sort(key=lambda p: p["step"])
    if args.init or not points:
        points.insert(0, dict(label="init", step=0, source=f"initial model, seed {args.seed}",
                              state=None, batch_size=None))
    labels = [p["label"] for p in points]
    for i, p in enumerate(points):
        if labels.count(p["label"]) > 1:
            p["label"] += f"-{i}"
    return points


def _reference_batch(args, points, parser) -> int:
    if args.reference_batch is not None:
        if args.reference_batch not in args.batch_sizes:
            parser.error(f"--reference-batch {args.reference_batch} is not one of "
                             f"--batch-sizes {args.batch_sizes}")
        return args.reference_batch
    trained = [p["batch_size"] for p in points if p["batch_size"]]
    if trained:
        return min(args.batch_sizes, key=lambda b: abs(math.log(b / trained[-1])))
    return args.batch_sizes[len(args.batch_sizes) // 2]


def _clean(x):
    """JSON: non-finite floats as null, numpy scalars as Python numbers."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


# -- the run ---------------------------------------------------------------------------------------
def run(args, parser) -> dict:
    # Config: points, then what they imply. ------------------------------------------------------
    try:
        points = _resolve(args, parser)
    except checkpoint.CheckpointError as e:   # not plain data: named, never run
        parser.error(str(e))
    if max(args.vote_workers) > args.draws:
        parser.error(f"--vote-workers up to {max(args.vote_workers)} needs --draws at least "
                     f"that large (got {args.draws})")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    out = Path(args.out or f"diagnostics/{datetime.datetime.now():%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=True)
    opt = Options(batch_sizes=args.batch_sizes, draws=args.draws,
                  vote_workers=args.vote_workers, vote_trials=args.vote_trials,
                  method=args.method, unimodality=args.unimodality, chunk=args.chunk,
                  density_draws=args.density_draws, hessian_probes=args.hessian_probes,
                  hessian_examples=args.hessian_examples, loader_workers=args.workers,
                  device=args.device)
    if opt.unimodality == "dip" and not stats.have_diptest():
        parser.error("--unimodality dip needs the diptest package: pip install diptest")
    if opt.unimodality == "auto" and not stats.have_diptest():
        log.warning("diptest is not installed: unimodality by the bimodality coefficient, a "
                    "proxy (pip install diptest for Hartigan's dip test)")

    # Init: data, the initial model (as train builds it), the coordinates and the pool. -------
    try:
        data = load_data(args.dataset, args.data_dir)
    except DataNotFound as e:
        parser.error(str(e))
    torch.manual_seed(args.seed)
    model = build_model(args.model, data.in_channels, data.num_classes, data.image_size)
    init_state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = np.random.default_rng([args.seed, 7])
    coords = sample_coordinates(model, args.coords, rng)
    pool = np.sort(rng.permutation(len(data.train))[: args.examples])
    if max(args.batch_sizes) > len(pool):
        parser.error(f"--batch-sizes up to {max(args.batch_sizes)} but the pool holds "
                     f"{len(pool)} examples")
    if args.method == "per-example" and not supports_per_example(model)[0]:
        parser.error(f"--method per-example is not exact for --model {args.model}: "
                     f"{supports_per_example(model)[1]}; use --method minibatch or auto")
    if min(args.batch_sizes) < 2 and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                                         for m in model.modules()):
        parser.error(f"--model {args.model} has batch norm, which needs at least 2 examples "
                     f"per batch in training: leave batch size 1 out of --batch-sizes")
    reference = _reference_batch(args, points, parser)
    log.info("%s on %s: %d parameters, %d sampled coordinates, pool of %d examples, "
             "%d draws at B=%s, %d point(s), out: %s", args.model, data.name,
             count_parameters(model), len(coords), len(pool), args.draws,
             ",".join(map(str, args.batch_sizes)), len(points), out)

    # Per point: weights, measurement, figures. -----------------------------------------------
    summaries, all_arrays = _measure_points(args, points, model, init_state, data, coords,
                                            pool, opt, out)

    # End: SNR across points, summary.json, verdict.txt. -----------------------------------------
    figures.snr_figure(summaries, all_arrays, out / "snr.png", reference)
    text, verdict_record = report.verdicts(summaries, reference)
    record = _record(args, data, model, reference, summaries, verdict_record)
    (out / "summary.json").write_text(json.dumps(_clean(record), indent=1) + "\n")
    (out / "verdict.txt").write_text(text)
    print(text)
    log.info("wrote %s", out)
    return record


def _measure_points(args, points, model, init_state, data, coords, pool, opt, out):
    """Each point's measurement and figures: ``(summaries, arrays)``, one of each a point."""
    summaries, all_arrays = [], []
    for pt in points:
        t0 = time.perf_counter()
        model.load_state_dict(pt["state"] if pt["state"] is not None else init_state)
        summary, arrays = measure_point(model, data.train, coords, pool, opt,
                                        np.random.default_rng([args.seed, 11, pt["step"]]))
        summary = dict(label=pt["label"], step=pt["step"], source=pt["source"], **summary)
        figures_rng = np.random.default_rng([args.seed, 13])   # same examples at every point
        files = [figures.noise_figure(arrays, summary, out / f"noise-{pt['label']}.png",
                                      figures_rng),
                 figures.vote_figure(summary, out / f"vote-{pt['label']}.png")]
        np.savez_compressed(out / f"coordinates-{pt['label']}.npz",
                            **{k: v for k, v in arrays.items() if not k.startswith("noise_")})
        summary["seconds"] = time.perf_counter() - t0
        summary["files"] = [f.name for f in files] + [f"coordinates-{pt['label']}.npz"]
        log.info("%s measured in %.1f s", pt["label"], summary["seconds"])
        summaries.append(summary)
        all_arrays.append(arrays)
    return summaries, all_arrays


def _record(args, data, model, reference, summaries, verdict_record) -> dict:
    """summary.json's record: the command, the configuration, the versions, every point."""
    now = datetime.datetime.now().astimezone()
    return dict(
        command=sys.argv, created=now.isoformat(timespec="seconds"), config=vars(args),
        data=data.describe(),
        model=dict(name=args.model, parameters=count_parameters(model)),
        reference_batch=reference, thresholds=dict(
            high_snr=stats.HIGH_SNR, skew_symmetric=stats.SKEW_SYMMETRIC,
            skew_large=stats.SKEW_LARGE, unimodal_alpha=stats.UNIMODAL_ALPHA,
            bimodality_coefficient=stats.BC_BIMODAL),
        versions=dict(mpisign=mpisign.__version__, torch=torch.__version__,
                      numpy=np.__version__, diptest=_version("diptest")),
        points=summaries, verdicts=verdict_record)


def _version(package: str):
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run(args, parser)
    except FileNotFoundError as e:   # a missing checkpoint or data set: usage, not a bug
        parser.error(str(e))
    return 0
