"""``--model gpt`` on ``--dataset pystdlib``: the corpus and its split by file, the training and
validation windows, the transformer, and short runs: one rank in this process, two ranks
through ``python -m mpisign.launch`` with the vote (lion) and the allreduce baselines (adamw,
lion-allreduce).

The runs use a tiny transformer (2 layers, width 32, 34k parameters) on windows of 32 bytes:
a few seconds each.
"""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import mpirun
import mpisign
from mpisign.train import main
from mpisign.train.corpus import (FILE_BYTES, SKIPPED_FOLDERS, VAL_BYTES, TRAIN_BYTES,
                                  is_validation, load_pystdlib)
from mpisign.train.gpt import GPT
from mpisign.train.models import count_parameters
from mpisign.train.objectives import NextToken

REPO = Path(__file__).resolve().parent.parent
CONTEXT = 32
TINY = ["--model", "gpt", "--layers", "2", "--width", "32", "--heads", "2", "--context",
        str(CONTEXT), "--batch-size", "8", "--no-progress"]
LN_256 = math.log(256)
needs_lion = pytest.mark.skipif(not hasattr(mpisign, "Lion"), reason="mpisign.Lion not there yet")


@pytest.fixture(scope="module")
def corpus():
    return load_pystdlib(CONTEXT)


def records(out: Path, kind: str | None = None) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if kind is None or r["type"] == kind]


def run_here(argv: list[str]) -> None:
    """``python -m mpisign.train argv`` in this process (one rank), its signal handlers undone."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        assert main(argv) == 0
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


# -- the corpus ---------------------------------------------------------------------------------
def _fake_stdlib(root: Path, n: int) -> dict[str, bytes]:
    """``n`` modules with distinct text under ``root``, and files that are not the library's."""
    files = {f"pkg{i % 7}/mod{i}.py" if i % 3 else f"mod{i}.py": f"# module {i:04d}\n".encode() * 5
             for i in range(n)}
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(text)
    for skipped in SKIPPED_FOLDERS:
        (root / skipped).mkdir(exist_ok=True)
        (root / skipped / "x.py").write_bytes(b"# not the library's own\n")
    (root / "notes.txt").write_bytes(b"not python\n")
    return files


def test_the_split_is_by_file_fixed_by_path_and_disjoint(tmp_path):
    files = _fake_stdlib(tmp_path, 300)
    c = load_pystdlib(8, train_bytes=10**6, val_bytes=10**6, root=tmp_path)
    train, val = c.files["train"], c.files["val"]
    assert set(train) | set(val) == set(files) and not set(train) & set(val)
    assert all(is_validation(f) for f in val) and not any(is_validation(f) for f in train)
    assert 10 <= len(val) <= 60, len(val)   # about 1 in 10
    # Each side is its own files' text, and nothing of the other's.
    text = {k: bytes(w.text.numpy()) for k, w in (("train", c.train), ("val", c.test))}
    assert text["train"] == b"".join(files[f] for f in train)
    assert text["val"] == b"".join(files[f] for f in val)
    assert not any(files[f][:13] in text["train"] for f in val)
    assert b"not the library" not in text["train"] + text["val"]
    # A file's side depends on its path alone: with a third of the files gone, the others stay.
    for name in list(files)[::3]:
        (tmp_path / name).unlink()
    again = load_pystdlib(8, train_bytes=10**6, val_bytes=10**6, root=tmp_path)
    assert set(again.files["val"]) == set(val) - set(list(files)[::3])
    # The caps cut the text; the same files, the same text.
    capped = load_pystdlib(8, train_bytes=1000, val_bytes=300, root=tmp_path)
    assert (len(capped.train.text), len(capped.test.text)) == (1000, 300)
    assert capped.describe()["sha256"] == \
        load_pystdlib(8, train_bytes=1000, val_bytes=300, root=tmp_path).describe()["sha256"]


def test_the_standard_library_corpus(corpus):
    train, val = corpus.files["train"], corpus.files["val"]
    assert not set(train) & set(val) and len(val) >= 4
    assert len(corpus.train.text) == TRAIN_BYTES and len(corpus.test.text) == VAL_BYTES
    assert not any(part in SKIPPED_FOLDERS for f in train + val for part in f.split("/")[:-1])
    assert max(len(corpus.train.text) // len(train), 1) <= FILE_BYTES
    d = corpus.describe()
    assert (d["name"], d["vocab_size"], d["context"]) == ("pystdlib", 256, CONTEXT)


# -- batches ------------------------------------------------------------------------------------
def test_training_windows_are_deterministic_and_disjoint_across_ranks(corpus):
    w = corpus.train
    shards = [w.epoch_shard(seed=0, epoch=0, rank=r, world=3) for r in range(3)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == w.per_epoch // 3
    starts = np.concatenate(shards)
    assert len(set(starts.tolist())) == len(starts), "a window on two ranks"
    assert len(set((starts % CONTEXT).tolist())) == 1   # one tiling: inputs never overlap
    assert np.array_equal(shards[1], w.epoch_shard(seed=0, epoch=0, rank=1, world=3))
    assert not np.array_equal(shards[1], w.epoch_shard(seed=0, epoch=1, rank=1, world=3))
    assert not np.array_equal(shards[1], w.epoch_shard(seed=1, epoch=0, rank=1, world=3))
    # The batches are those windows, the targets the inputs shifted by one byte.
    kw = dict(rank=1, world=3, batch_size=8, seed=0, epoch=0)
    batches = list(corpus.train_batches(**kw, count=5))
    x, y = batches[0]
    s = int(shards[1][0])
    assert x.shape == y.shape == (8, CONTEXT) and x.dtype == torch.int64
    assert torch.equal(x[0], w.text[s: s + CONTEXT].long())
    assert torch.equal(y[0], w.text[s + 1: s + CONTEXT + 1].long())
    # Resuming mid-epoch gives the same batches; past the epoch's end, the next epoch's.
    later = list(corpus.train_batches(**kw, start=2, count=5))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches[2:], later)) and len(later) == 3
    spe = corpus.steps_per_epoch(3, 8)
    assert spe == w.per_epoch // 3 // 8
    over = list(corpus.train_batches(**kw, start=spe, count=spe + 2))
    rounds = np.concatenate([shards[1], w.epoch_shard(seed=0, epoch=1, rank=1, world=3)])
    nxt = int(rounds[8 * (spe + 1)])   # the epoch's leftover windows, then the next epoch's
    assert len(over) == 2 and 8 * (spe + 1) >= len(shards[1])
    assert torch.equal(over[1][0][0], w.text[nxt: nxt + CONTEXT].long())


def test_evaluation_scores_every_validation_window_once(corpus):
    world, n = 3, len(corpus.test)
    parts = [torch.cat([x for x, _ in corpus.eval_batches(rank=r, world=world, batch_size=64)])
             for r in range(world)]
    assert sum(len(p) for p in parts) == n
    for r, part in enumerate(parts):
        for i in (0, len(part) - 1):   # rank r's i-th window is window r + i * world
            start = (r + i * world) * CONTEXT
            assert torch.equal(part[i], corpus.test.text[start: start + CONTEXT].long())


# -- the model ----------------------------------------------------------------------------------
def test_gpt_starts_at_ln_256_is_causal_and_ties_its_embedding(corpus):
    assert count_parameters(GPT()) == 842_496
    torch.manual_seed(0)
    model = GPT(256, CONTEXT, 2, 32, 2)
    assert model.head.weight is model.tok.weight
    x, y = next(corpus.train_batches(rank=0, world=1, batch_size=64, seed=0, epoch=0))
    with torch.no_grad():
        out = model(x)
        loss = NextToken().loss(out, y).item()
        assert out.shape == (64, CONTEXT, 256)
        assert abs(loss - LN_256) < 0.1, loss
        # Changing the byte at position 10 changes no prediction before it, and its own.
        x2 = x.clone()
        x2[:, 10] = (x2[:, 10] + 1) % 256
        out2 = model(x2)
    assert torch.equal(out[:, :10], out2[:, :10]) and not torch.equal(out[:, 10], out2[:, 10])
    with pytest.raises(ValueError, match="longer than the context"):
        model(torch.zeros(1, CONTEXT + 1, dtype=torch.long))


def _initial_validation_loss(corpus) -> float:
    torch.manual_seed(0)   # the run's initialization: --seed 0
    model = GPT(256, CONTEXT, 2, 32, 2)
    tally = NextToken().tally
    sums = np.zeros(3)
    with torch.no_grad():
        for x, y in corpus.eval_batches(rank=0, world=1, batch_size=256):
            t = tally(model(x), y)
            sums += (t.loss_sum, t.correct, t.count)
    return sums[0] / sums[2]


# -- runs ---------------------------------------------------------------------------------------
@needs_lion
def test_one_rank_run_lowers_the_validation_loss_and_writes_loss_and_perplexity(
        corpus, tmp_path):
    from mpisign.train.plot import main as plot_main

    out = tmp_path / "lion"
    run_here([*TINY, "--optimizer", "lion", "--max-steps", "30", "--log-every", "10",
              "--out", str(out)])
    steps = records(out, "step")
    assert [s["step"] for s in steps] == [10, 20, 30]
    for s in steps:
        assert "acc" not in s and s["ppl"] == pytest.approx(math.exp(s["loss"]))
        assert s["tokens"] == s["step"] * 8 * CONTEXT
    (final,) = records(out, "final")
    assert "test_acc" not in final
    assert final["test_ppl"] == pytest.approx(math.exp(final["test_loss"]))
    initial = _initial_validation_loss(corpus)
    assert abs(initial - LN_256) < 0.1
    assert final["test_loss"] < initial - 0.5, (initial, final)
    run = json.loads((out / "run.json").read_text())
    assert run["data"]["name"] == run["config"]["dataset"] == "pystdlib"
    assert run["model"] == {"name": "gpt",
                            "parameters": count_parameters(GPT(256, CONTEXT, 2, 32, 2))}
    assert run["config"]["betas"] == [0.9, 0.99] and run["config"]["momentum"] is None
    assert run["per_step"] == {"tokens": 8 * CONTEXT}
    assert run["ended"]["tokens"] == 30 * 8 * CONTEXT and run["ended"]["step"] == 30
    # The plot: validation perplexity where a classifier's has accuracy; not both in one figure.
    assert plot_main([str(out), "-o", str(tmp_path / "lm.png")]) == 0
    assert (tmp_path / "lm.png").read_bytes()[:4] == b"\x89PNG"
    images = tmp_path / "images"
    images.mkdir()
    (images / "metrics.jsonl").write_text(json.dumps({"type": "epoch", "step": 1, "time": 1,
                                                      "test_acc": 0.5}) + "\n")
    with pytest.raises(SystemExit):
        plot_main([str(out), str(images), "-o", str(tmp_path / "mixed.png")])


@needs_lion
def test_global_lion_on_one_rank_is_lion(tmp_path):
    """On one rank the allreduce mean is the gradient and the vote is the rank's own sign:
    lion-allreduce and lion take the same steps (their default lrs differ: one is given)."""
    for optimizer in ("lion", "lion-allreduce"):
        run_here([*TINY, "--optimizer", optimizer, "--lr", "1e-3", "--weight-decay", "0.3",
                  "--max-steps", "8", "--log-every", "4", "--out", str(tmp_path / optimizer)])
    a, b = (records(tmp_path / o, "final")[0]["test_loss"] for o in ("lion", "lion-allreduce"))
    assert a == b


@needs_lion
def test_a_resumed_run_is_bit_identical(tmp_path, capsys):
    """Stopped at step 6 and resumed to 12: the same weights and Lion momentum as 12 steps in
    one go (the windows resume mid-epoch; betas and the model's size must match)."""
    from mpisign.train import checkpoint

    args = [*TINY, "--optimizer", "lion", "--log-every", "3"]
    run_here([*args, "--max-steps", "12", "--out", str(tmp_path / "whole")])
    run_here([*args, "--max-steps", "6", "--out", str(tmp_path / "split")])
    run_here([*args, "--max-steps", "12", "--out", str(tmp_path / "split"), "--resume"])
    (a, a_own), (b, b_own) = (checkpoint.load(checkpoint.latest(tmp_path / d), 0)
                              for d in ("whole", "split"))
    assert a["step"] == b["step"] == 12
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a_own["optimizer"]["state"][k]["exp_avg"],
                           b_own["optimizer"]["state"][k]["exp_avg"])
               for k in a_own["optimizer"]["state"])
    with pytest.raises(SystemExit):   # another width is another model
        main([*args, "--width", "64", "--max-steps", "14", "--out", str(tmp_path / "split"),
              "--resume"])
    assert "--resume: width differ from the run" in capsys.readouterr().err


def launch(n: int, *args: str, timeout: float = 150) -> str:
    """``python -m mpisign.launch -n n -- python tests/mpi/train_digest.py args``; its output."""
    cmd = [sys.executable, "-m", "mpisign.launch", "-n", str(n), "--", "python",
           str(REPO / "tests" / "mpi" / "train_digest.py"), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=mpirun.mpi_env(), cwd=REPO, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        mpirun.kill_job(proc)   # the ranks too, not only the launcher's group
        out, _ = proc.communicate()
        raise AssertionError(f"{' '.join(args)}: killed after {timeout:g} s\n{out[-4000:]}")
    assert proc.returncode == 0, f"exit status {proc.returncode}\n{out[-4000:]}"
    return out


@pytest.mark.parametrize("optimizer, own_state", [
    pytest.param("lion", True, marks=needs_lion),   # the vote: each rank its own momentum
    pytest.param("adamw", False),                    # the mean: the same state everywhere
    pytest.param("lion-allreduce", False, marks=needs_lion),
])
def test_two_ranks_end_with_identical_parameters(tmp_path, optimizer, own_state):
    out = launch(2, *TINY, "--optimizer", optimizer, "--max-steps", "20", "--log-every", "10",
                 "--out", str(tmp_path))
    digests = dict(re.findall(r"@digest rank=(\d) (params=\w+ state=\w+)", out))
    assert sorted(digests) == ["0", "1"], out[-3000:]
    (p0, s0), (p1, s1) = (digests[r].split() for r in ("0", "1"))
    assert p0 == p1, "the ranks' parameters differ"
    assert (s0 != s1) == own_state, (s0, s1)
    (final,) = records(tmp_path, "final")
    assert final["test_loss"] < LN_256 - 0.3, final
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["world_size"] == 2 and run["ended"]["tokens"] == 20 * 2 * 8 * CONTEXT
    if optimizer == "lion":   # one bit a coordinate, each way
        sent = records(tmp_path, "step")[-1]["bytes_sent"][1]
        assert run["model"]["parameters"] / 8 <= sent <= run["model"]["parameters"] / 8 + 256


# -- usage errors -------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["--model", "gpt", "--dataset", "digits"], "--model gpt is a language model"),
    (["--dataset", "pystdlib"], "--dataset pystdlib is text: it needs a language model"),
    (["--optimizer", "lion", "--momentum", "0.9"],
     "--momentum does not apply to --optimizer lion: it takes --betas B1 B2 (default 0.9 0.99)"),
    (["--optimizer", "adamw", "--momentum", "0.9"],
     "--momentum does not apply to --optimizer adamw"),
    (["--betas", "0.9", "0.99"], "--optimizer signum takes --momentum"),
    (["--optimizer", "lion", "--betas", "0.9", "1.0"], "--betas must each be in [0, 1)"),
    (["--model", "gpt", "--width", "30", "--heads", "4"],
     "--width 30 must be a multiple of --heads 4"),
    (["--layers", "2"], "--layers size the transformer (--model gpt), not --model cnn"),
    (["--model", "gpt", "--data-dir", "/tmp"], "--data-dir does not apply to --dataset pystdlib"),
    (["--optimizer", "adamw", "--elastic"], "--elastic needs a voting optimizer"),
    (["--optimizer", "lion", "--adversaries", "1", "--attack", "omniscient"],
     "not --optimizer lion: use a blind --attack"),
    (["--optimizer", "lion-allreduce", "--weight-decay", "-1"], "weight-decay must be"),
    ([*TINY, "--batch-size", "200000"], "--batch-size 200000 is larger than each rank's share"),
])
def test_bad_combinations_exit_2_with_a_clear_message(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
