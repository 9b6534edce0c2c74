"""Plot runs of ``python -m mpisign.train``: loss and accuracy against steps and wall time.

    python -m mpisign.train.plot runs/signum runs/sgd runs/adv2 -o curves.png
    python -m mpisign.train.plot runs/gpt-lion runs/gpt-adamw -o lm.png

One figure, four panels (training loss and test accuracy, each against steps and against wall
time), one line per run, labelled from its run.json (optimizer, topology, adversaries) unless
``--labels`` are given. Language models (``--model gpt``) have no accuracy: their second row is
the validation perplexity, on a log scale (the loss in nats per token is its logarithm). Runs of
the two kinds do not share a figure.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["read_metrics", "run_label", "held_out_figure", "plot_runs", "main"]

#: What the second row shows, by the figure the evaluation records carry: (key, axis label).
HELD_OUT = {"acc": ("test_acc", "test accuracy"),
            "ppl": ("test_ppl", "validation perplexity (log)")}


def read_metrics(out_dir) -> list[dict]:
    """The records of ``OUT_DIR/metrics.jsonl`` (a record cut short by a kill is skipped)."""
    path = Path(out_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {out_dir} the --out of a training run?")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def run_label(out_dir) -> str:
    """E.g. 'signum/tree, 4 ranks, 1 invert' from run.json, else the directory name."""
    try:
        run = json.loads((Path(out_dir) / "run.json").read_text())
    except (OSError, json.JSONDecodeError):
        return Path(out_dir).name
    c = run["config"]
    allreduce = c["optimizer"] in ("sgd", "adamw", "lion-allreduce")
    how = "allreduce" if allreduce else c["topology"]
    label = f"{c['optimizer']}/{how}, {run['world_size']} ranks"
    if c.get("adversaries"):
        label += f", {c['adversaries']} {c['attack']}"
    return label


def held_out_figure(records: list[dict]) -> str:
    """"ppl" for a language model's records, "acc" for a classifier's."""
    return "ppl" if any("test_ppl" in r or "ppl" in r for r in records) else "acc"


def plot_runs(out_dirs, output, labels=None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or [run_label(d) for d in out_dirs]
    runs = [read_metrics(d) for d in out_dirs]
    kinds = {held_out_figure(records) for records in runs}
    if len(kinds) > 1:
        raise ValueError("these runs mix image classifiers (test accuracy) and language models "
                         "(validation perplexity): plot each kind on its own")
    key, ylabel = HELD_OUT[kinds.pop()]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharey="row")
    for records, label in zip(runs, labels):
        steps = [r for r in records if r.get("type") == "step"]
        evals = [r for r in records if r.get("type") in ("epoch", "final")]
        for col, x in enumerate(("step", "time")):
            line, = axes[0, col].plot([r[x] for r in steps], [r["loss"] for r in steps],
                                      label=label, lw=1)
            axes[1, col].plot([r[x] for r in evals], [r[key] for r in evals], "o-",
                              color=line.get_color(), label=label)
    for col, xlabel in enumerate(("step", "wall time (s)")):
        axes[0, col].set_ylabel("training loss")
        axes[0, col].set_yscale("log")
        axes[1, col].set_ylabel(ylabel)
        if key == "test_ppl":
            axes[1, col].set_yscale("log")
        axes[1, col].set_xlabel(xlabel)
        for row in (0, 1):
            axes[row, col].grid(True, alpha=0.3)
    axes[0, 0].legend(fontsize="small")
    fig.tight_layout()
    output = Path(output)
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return output


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mpisign.train.plot", description=__doc__.split("\n")[0],
                                allow_abbrev=False)
    p.add_argument("out_dirs", nargs="+", metavar="OUT_DIR", help="--out of training runs")
    p.add_argument("-o", "--output", default=None,
                   help="PNG to write (default: OUT_DIR/curves.png for one run, curves.png "
                        "for several)")
    p.add_argument("--labels", nargs="+", default=None, help="one legend label per run")
    args = p.parse_args(argv)
    if args.labels and len(args.labels) != len(args.out_dirs):
        p.error(f"{len(args.labels)} labels for {len(args.out_dirs)} runs")
    output = args.output or (Path(args.out_dirs[0]) / "curves.png" if len(args.out_dirs) == 1
                             else "curves.png")
    try:
        path = plot_runs(args.out_dirs, output, args.labels)
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
