"""``python -m mpisign.train`` end to end: real ranks, the digits data set, short runs.

Every launch is ``mpiexec -n N python -m mpisign.train ...`` (plain ``python``, so an abort on
failure is the module's own doing) under a timeout, with tests/mpirun.py's environment. The
3-rank reference run is shared by the tests that read its output.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import mpirun
import mpisign
from mpisign.train import checkpoint
from mpisign.train import (DEFAULT_LR, UsageError, build_parser, learning_rate, load_checkpoint,
                           main)
from mpisign.train.options import DEFAULT_LR_BY_MODEL

REPO = Path(__file__).resolve().parent.parent
DIGITS = ["--dataset", "digits", "--batch-size", "32", "--no-progress", "--log-every", "7"]
RANKS = 3
EPOCHS = 6             # 14 steps an epoch on 3 ranks: 84 steps, a few seconds of training
TARGET_ACCURACY = 0.90  # signum/server reaches 0.95-0.99 on digits' 360 test images


# -- launching --------------------------------------------------------------------------------
def launch(n: int, *args: str, script: str | None = None, timeout: float = 120,
           expect: int | None = 0) -> str:
    """Run ``python -m mpisign.train args`` (or ``python tests/mpi/<script> args``) on ``n``
    ranks; return the output. Fails on a timeout, or on an exit status other than ``expect``
    (None: any non-zero status)."""
    proc = start(n, *args, script=script)
    return finish(proc, timeout, expect, f"{script or 'mpisign.train'} {' '.join(args)}")


def start(n: int, *args: str, script: str | None = None, elastic: bool = False) -> subprocess.Popen:
    target = [str(REPO / "tests" / "mpi" / script)] if script else ["-m", "mpisign.train"]
    cmd = mpirun.mpiexec_command(n, [sys.executable, *target, *args], elastic=elastic)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=mpirun.mpi_env(), cwd=REPO, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float, expect: int | None, what: str) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        mpirun.kill_job(proc)   # the ranks too, not only the launcher's group
        out, _ = proc.communicate()
        raise AssertionError(f"{what}: killed after {timeout:g} s\n{out[-4000:]}")
    ok = proc.returncode != 0 if expect is None else proc.returncode == expect
    assert ok, f"{what}: exit status {proc.returncode}, expected {expect}\n{out[-4000:]}"
    return out


def records(out_dir: Path, kind: str | None = None) -> list[dict]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if kind is None or r["type"] == kind]


def load_state(out_dir: Path, ranks: int = RANKS) -> tuple[dict, list[dict]]:
    where = checkpoint.latest(out_dir)
    assert where is not None, f"no checkpoint in {out_dir}"
    parts = [checkpoint.load(where, r) for r in range(ranks)]
    return parts[0][0], [own for _, own in parts]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """3 ranks, signum/server, digits, 6 epochs, uninterrupted."""
    out = tmp_path_factory.mktemp("reference")
    launch(RANKS, *DIGITS, "--epochs", str(EPOCHS), "--out", str(out))
    return out


# -- a real run -------------------------------------------------------------------------------
def test_short_run_on_digits_reaches_target_accuracy(reference):
    epochs = records(reference, "epoch")
    assert [e["epoch"] for e in epochs] == list(range(1, EPOCHS + 1))
    assert epochs[-1]["test_acc"] >= TARGET_ACCURACY, epochs
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert records(reference, "done")[-1]["step"] == EPOCHS * 14


def test_metrics_and_run_record(reference):
    steps = records(reference, "step")
    assert [s["step"] for s in steps] == list(range(7, EPOCHS * 14 + 1, 7))
    last = steps[-1]
    assert len(last["disagreement"]) == RANKS and all(0 <= d < 0.5 for d in last["disagreement"])
    # A worker sends its packed signs once a step: one bit for each of the small CNN's 53002
    # coordinates on 8x8 images, plus at most a padding word for each of its 8 tensors.
    assert 53002 / 8 <= last["bytes_sent"][1] <= 53002 / 8 + 8 * 8, last["bytes_sent"]
    assert last["comm_s"]["max"] >= last["comm_s"]["mean"] > 0
    run = json.loads((reference / "run.json").read_text())
    assert run["world_size"] == RANKS and len(run["pids"]) == RANKS
    assert run["config"]["topology"] == "server" and run["data"]["name"] == "digits"
    assert "MPI" in run["mpi"]["library"] and run["versions"]["torch"] == torch.__version__
    assert "\x00" not in run["mpi"]["library"], run["mpi"]["library"]
    assert run["model"]["parameters"] == 53002


def test_resume_is_bit_identical_to_an_uninterrupted_run(reference, tmp_path):
    # Stop mid-epoch (step 30 of 84), then continue to the end with --resume.
    launch(RANKS, *DIGITS, "--max-steps", "30", "--out", str(tmp_path))
    assert records(tmp_path, "checkpoint")[-1]["step"] == 30
    out = launch(RANKS, *DIGITS, "--epochs", str(EPOCHS), "--out", str(tmp_path), "--resume")
    assert "resuming from" in out and "at step 30" in out
    resumed = records(tmp_path, "resume")
    assert [(r["step"], r["world_size"]) for r in resumed] == [(30, RANKS)], resumed
    assert resumed[0]["path"].endswith("step-000000030")
    steps = [r["step"] for r in records(tmp_path, "step")]
    assert steps == sorted(set(steps)), "a step recorded twice across the resume"
    (ref, ref_ranks), (got, got_ranks) = load_state(reference), load_state(tmp_path)
    assert got["step"] == ref["step"] == EPOCHS * 14
    for name, tensor in ref["model"].items():
        assert torch.equal(tensor, got["model"][name]), name
    for r, (a, b) in enumerate(zip(ref_ranks, got_ranks)):
        sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
        assert sa.keys() == sb.keys()
        for k in sa:   # each rank's own momentum, restored from its own file
            assert torch.equal(sa[k]["momentum_buffer"], sb[k]["momentum_buffer"]), (r, k)
        assert a["optimizer"]["param_groups"][0]["step"] == EPOCHS * 14
    assert [e["test_acc"] for e in records(reference, "epoch")][-3:] == \
        [e["test_acc"] for e in records(tmp_path, "epoch")][-3:]


# -- signals (with the sgd baseline and an adversary along, to spare launches) -------------------
def _wait_for_steps(out_dir: Path, proc: subprocess.Popen, timeout: float = 120,
                    count: int = 3) -> None:
    """Wait for ``count`` step records, so the run has trained a while before the signal."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if (out_dir / "metrics.jsonl").is_file() and len(records(out_dir, "step")) >= count:
            return
        time.sleep(0.2)
    raise AssertionError(f"no step record in {out_dir} (exit status {proc.poll()})")


def _check_stopped(out_dir: Path, signame: str) -> int:
    stopped = records(out_dir, "stopped")
    assert stopped and stopped[-1]["signal"] == signame
    step = stopped[-1]["step"]
    assert 0 < step < 1000 * 14
    common, _ = load_state(out_dir)
    assert common["step"] == step, "the checkpoint is not the one taken at the signal"
    assert not records(out_dir, "done")
    return step


def rank_pid(out_dir: Path, rank: int) -> int | None:
    """The process of launch rank ``rank`` of the run writing to ``out_dir``: not a child it
    forked, which has the same command line and environment (and killing one of those, as a
    first version of this test did now and then, kills no rank)."""
    def is_rank(pid) -> bool:
        proc = Path("/proc") / str(pid)
        try:
            cmdline = (proc / "cmdline").read_bytes()
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            return False
        return (b"mpisign.train" in cmdline and str(out_dir).encode() in cmdline
                and f"OMPI_COMM_WORLD_RANK={rank}".encode() in env)
    for proc in Path("/proc").iterdir():
        try:
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if is_rank(proc.name) and not is_rank(parent):
            return int(proc.name)
    return None


def last_step(out_dir: Path) -> int:
    try:
        return max((r.get("step", 0) for r in records(out_dir)), default=0)
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def kill_at(proc: subprocess.Popen, out_dir: Path, step: int, victim: int) -> None:
    """SIGKILL launch rank ``victim`` of the run writing to ``out_dir`` once its metrics have
    reached ``step``."""
    deadline = time.monotonic() + 120
    while last_step(out_dir) < step and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    pid = rank_pid(out_dir, victim)
    assert pid is not None and proc.poll() is None, "the run ended before the kill"
    os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("victim", [2, 0])
def test_elastic_run_survives_a_rank_killed_mid_epoch(reference, tmp_path, victim):
    """--elastic on 4 ranks; one rank (rank 0 too: it writes the metrics) is SIGKILLed from
    outside in the second epoch. The run completes on 3, says so in metrics.jsonl, checkpoints
    3 ranks' state, and ends about as accurate as a clean 3-rank run."""
    proc = start(4, *DIGITS, "--epochs", "8", "--log-every", "1", "--elastic", "--out",
                 str(tmp_path), elastic=True)
    kill_at(proc, tmp_path, 15, victim)
    finish(proc, 180, 0, f"--elastic with rank {victim} killed")
    (event,) = records(tmp_path, "elastic")
    assert event["lost_ranks"] == [victim] and event["world_size"] == 3, event
    assert 15 <= event["step"] <= 22   # while the second epoch ran
    assert records(tmp_path, "done")
    final = records(tmp_path, "epoch")[-1]
    clean = records(reference, "epoch")[-1]
    assert final["epoch"] == 8 and final["test_acc"] >= clean["test_acc"] - 0.05, (final, clean)
    common, owns = load_state(tmp_path, 3)
    assert common["world_size"] == 3 and [own["rank"] for own in owns] == [0, 1, 2]
    assert not (checkpoint.latest(tmp_path) / "rank-00003.pt").exists()
    if victim == 2:   # a requeue on the 3 survivors keeps the first launch's 11 steps an epoch
        launch(3, *DIGITS, "--epochs", "9", "--out", str(tmp_path), "--resume")
        last = records(tmp_path, "epoch")[-1]
        assert (last["epoch"], last["step"]) == (9, 99), last


@pytest.mark.parametrize("victim, after", [(1, 18), (0, 30)])
def test_elastic_quorum_run_brings_a_late_survivor_forward(reference, tmp_path, victim, after):
    """--elastic with --quorum 3 of 4, rank 3 slow at every step (so it runs steps behind),
    and another rank SIGKILLed: at an epoch's end (after 18) or within an epoch (after 30).
    The survivors, steps apart, carry on from the same place: the run completes on 3, every
    survivor's optimizer at the run's step in the last checkpoint, an epoch record for every
    epoch, and about as accurate as a clean run."""
    proc = start(4, *DIGITS, "--epochs", "8", "--quorum", "3", "--straggle", "3:0.15",
                 "--elastic", "--out", str(tmp_path), elastic=True)
    kill_at(proc, tmp_path, after, victim)
    finish(proc, 180, 0, f"--elastic --quorum with rank {victim} killed")
    (event,) = records(tmp_path, "elastic")
    assert event["lost_ranks"] == [victim] and event["world_size"] == 3, event
    assert all(b["step"] <= event["step"] and b["rank"] not in (victim,)
               for b in event["brought_forward"]), event
    epochs = records(tmp_path, "epoch")
    assert [(e["epoch"], e["step"]) for e in epochs] == [(e, 11 * e) for e in range(1, 9)]
    clean = records(reference, "epoch")[-1]
    assert epochs[-1]["test_acc"] >= clean["test_acc"] - 0.05, (epochs[-1], clean)
    common, owns = load_state(tmp_path, 3)
    assert common["step"] == 88 and common["world_size"] == 3
    assert [own["optimizer"]["param_groups"][0]["step"] for own in owns] == [88] * 3
    assert records(tmp_path, "done")


@pytest.mark.parametrize("n", [3, 5])
def test_elastic_resume_on_another_number_of_ranks(tmp_path, n):
    """A 4-rank checkpoint resumed on n ranks: the ranks it has load their own momentum, a new
    one starts from zero, every rank at the checkpoint's step; then the run goes on."""
    first, moved = tmp_path / "four", tmp_path / f"on{n}"
    launch(4, *DIGITS, "--max-steps", "22", "--out", str(first))
    shutil.copytree(first, moved)
    # Resume at the step the checkpoint holds: no step runs, and the end's checkpoint holds
    # exactly what each rank loaded.
    launch(n, *DIGITS, "--max-steps", "22", "--out", str(moved), "--resume")
    _, before = load_state(first, 4)
    common, after = load_state(moved, n)
    assert common["world_size"] == n
    for rank, own in enumerate(after):
        state = own["optimizer"]["state"]
        assert own["optimizer"]["param_groups"][0]["step"] == 22
        if rank < 4:
            assert all(torch.equal(buf["momentum_buffer"],
                                   before[rank]["optimizer"]["state"][k]["momentum_buffer"])
                       for k, buf in state.items()) and len(state) > 0
        else:
            assert state == {}   # zero momentum, made at its first step
    launch(n, *DIGITS, "--max-steps", "44", "--out", str(moved), "--resume")
    resumed = records(moved, "resume")
    assert [r["world_size"] for r in resumed] == [n, n]
    assert records(moved, "done")[-1]["step"] == 44
    assert records(moved, "epoch")[-1]["test_acc"] > 0.8


def test_sigusr1_to_mpiexec_checkpoints_the_sgd_baseline(tmp_path):
    # Open MPI's mpiexec forwards SIGUSR1 to every rank, as srun does under --signal.
    proc = start(RANKS, *DIGITS, "--optimizer", "sgd", "--epochs", "1000",
                 "--out", str(tmp_path))
    _wait_for_steps(tmp_path, proc)
    proc.send_signal(signal.SIGUSR1)
    out = finish(proc, 60, 0, "SIGUSR1")
    assert "SIGUSR1: checkpointing at step" in out
    _check_stopped(tmp_path, "SIGUSR1")
    steps = records(tmp_path, "step")
    # fp32 ring allreduce: 2 * 4 bytes * d * (M - 1) / M out of each rank per step.
    assert "disagreement" not in steps[-1] and steps[-1]["bytes_sent"] == [8 * 53002 * 2 // 3] * 3
    assert steps[-1]["loss"] < steps[0]["loss"]


def test_sigterm_to_one_rank_stops_every_rank_and_the_inverter_is_seen(tmp_path):
    # A signal seen by one rank only: the ranks agree on it after the step and all stop.
    proc = start(RANKS, *DIGITS, "--adversaries", "1", "--attack", "invert",
                 "--epochs", "1000", "--out", str(tmp_path))
    _wait_for_steps(tmp_path, proc, count=4)  # 28 steps: the monitor's 20-step window is full
    pids = json.loads((tmp_path / "run.json").read_text())["pids"]
    os.kill(pids[2], signal.SIGTERM)
    out = finish(proc, 60, 0, "SIGTERM to rank 2")
    _check_stopped(tmp_path, "SIGTERM")
    # Rank 0 inverts: it votes against the majority on most coordinates, the others rarely, in
    # every record from the full window (step 28) to step 56. Not in whichever record the stop
    # lands on: later in training single steps come near 1/2 (this run's step 77: 0.4947), and
    # where the stop lands depends on the machine's speed.
    early = [r["disagreement"] for r in records(tmp_path, "step") if 28 <= r["step"] <= 56]
    assert early
    for d in early:
        assert d[0] > 0.5 > max(d[1:]), d
    # The monitor (on by default) names it, and only it, once its window is full.
    assert records(tmp_path, "step")[-1]["suspects"] == [0]
    assert "rank 0 voted against the majority" in out
    assert "rank 1 voted" not in out and "rank 2 voted" not in out


# -- failures ---------------------------------------------------------------------------------
def test_exception_on_one_rank_aborts_the_job(tmp_path):
    start_time = time.monotonic()
    out = launch(RANKS, *DIGITS, "--out", str(tmp_path), script="train_abort.py", expect=None,
                 timeout=90)
    assert "injected failure on rank 1" in out
    assert "[rank 1] unhandled exception, aborting all 3 ranks" in out
    assert time.monotonic() - start_time < 60


def test_a_stalled_rank_ends_the_job_with_what_was_waited_for(tmp_path):
    # Not only the vote is bounded: the evaluation, metrics, checkpoint and stop-signal waits too.
    start_time = time.monotonic()
    out = launch(RANKS, *DIGITS, "--out", str(tmp_path), "--vote-timeout", "5",
                 script="train_stall.py", expect=None, timeout=90)
    assert "[rank 1] stalling in evaluation" in out
    assert "VoteTimeout" in out and "not every rank joined" in out and "after 5 s" in out, \
        out[-3000:]
    assert "evaluation sums on rank 0" in out or "broadcast of rank 0's tensors" in out, out[-3000:]
    assert "unhandled exception, aborting all 3 ranks" in out
    assert time.monotonic() - start_time < 60


def test_missing_data_directory_gives_one_clear_error(tmp_path):
    # Every rank fails to find the data; rank 0 alone says so, and no rank waits for another.
    # (The messages for each data set are checked in tests/test_data.py.)
    out = launch(2, "--dataset", "cifar10", "--data-dir", "/nonexistent/cifar",
                 "--out", str(tmp_path), expect=2, timeout=90)
    message = "/nonexistent/cifar is not a directory"
    assert message in out and "cifar-10-batches-py" in out, out
    assert out.count(message) == 1, "every rank printed the error, not rank 0 alone"
    assert "Traceback" not in out


def test_the_fallback_is_announced_once_and_runs_long_enough_to_learn(tmp_path):
    """No Fashion-MNIST in --data-dir: the banner and --resume's note come from rank 0 alone,
    and the default --epochs covers as many examples as the Fashion-MNIST default does."""
    from mpisign.train.data import load_digits
    from mpisign.train import DEFAULT_EXAMPLES

    empty, out_dir = tmp_path / "no-data", tmp_path / "run"
    empty.mkdir()
    out = launch(RANKS, "--data-dir", str(empty), "--max-steps", "2", "--no-progress",
                 "--out", str(out_dir), "--resume")
    assert out.count("FELL BACK") == 1, out
    assert out.count("--resume: no checkpoint") == 1, out
    run = json.loads((out_dir / "run.json").read_text())
    n_train = len(load_digits().train)
    assert run["data"]["name"] == "digits"
    assert run["config"]["epochs"] == -(-DEFAULT_EXAMPLES // n_train) > 2


def test_help_shows_each_default_once_in_words(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "(default: None)" not in out and "{'" not in out, out
    flat = " ".join(out.split())   # as argparse wraps it to the terminal's width
    assert "0.001 for signum, signsgd, lion" in flat and "0.05 for sgd" in flat
    for option in ("--lr-decay ", "--seed ", "--weight-decay", "--eval-batch-size"):
        text = out.split(option, 1)[1].split("\n  --", 1)[0]
        assert len(text.split()) > 3, f"{option} has no help: {text!r}"
    parser = build_parser()
    assert parser.parse_args([]).device == "auto"


def test_the_end_of_a_run_goes_to_stdout_and_a_bad_lr_is_warned_once(tmp_path):
    """stdout: the summary alone; stderr: progress and logs, the lr warning once (rank 0)."""
    cmd = mpirun.mpiexec_command(2, [sys.executable, "-m", "mpisign.train", *DIGITS,
                                     "--max-steps", "6", "--lr", "1.0", "--out", str(tmp_path)])
    done = subprocess.run(cmd, capture_output=True, text=True, env=mpirun.mpi_env(), cwd=REPO,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("mpisign.train: done, 6 steps on 2 rank(s)"), done.stdout
    assert "evaluation (held-out split): loss" in done.stdout and "acc" in done.stdout
    assert "against" in done.stdout and "for an fp32 allreduce" in done.stdout
    assert f"results: {tmp_path}/" in done.stdout and "curves.png" in done.stdout
    assert "[rank" not in done.stdout, "logs belong on stderr"
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert done.stderr.count("LearningRateWarning: Signum: lr=1 moves every coordinate") == 1
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["command"][1:5] == ["-m", "mpi4py", "-m", "mpisign.train"], run["command"]
    assert run["command"][5:7] == ["--dataset", "digits"]
    assert run["config"]["dataset"] == "digits" and run["config"]["device"] == "cpu"


def test_one_process_without_a_launcher_says_so_and_the_default_lr_is_not_warned(tmp_path):
    env = {k: v for k, v in mpirun.mpi_env().items()
           if not k.startswith(("OMPI_COMM_WORLD", "PMI", "SLURM", "PMIX"))}
    done = subprocess.run([sys.executable, "-m", "mpisign.train", *DIGITS, "--max-steps", "3",
                           "--out", str(tmp_path)], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "1 rank: no MPI launcher" in done.stderr
    assert "LearningRateWarning" not in done.stderr
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["config"]["dataset"] == "digits"   # the default's choice, recorded


def test_a_quorum_vote_leaves_a_straggler_behind_and_it_catches_up(tmp_path):
    """--quorum 3 of 4 with rank 3 stalling 0.5 s on a third of its steps: the run ends, every
    epoch's consistency check passes (the ranks hold the same parameters), and the records
    count rank 3's missed votes, each written in order."""
    out = launch(4, *DIGITS, "--max-steps", "42", "--quorum", "3", "--straggle", "3:0.5@0.3",
                 "--out", str(tmp_path), timeout=180)
    assert "mpisign.train: done, 42 steps on 4 rank(s)" in out
    steps = records(tmp_path, "step")
    assert steps[-1]["abstentions"][3] >= 3, steps[-1]
    assert steps[-1]["abstentions"][0] == 0   # the root closes the votes: never late
    # The step records' gathers finish --lag steps on: every one written, in order.
    assert [r["step"] for r in steps] == list(range(7, 43, 7))
    written = [r["step"] for r in records(tmp_path) if "step" in r]
    assert written == sorted(written), written
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["config"]["quorum"] == 3 and run["config"]["straggle"] == ["3:0.5@0.3"]


def test_a_rank_late_at_every_step_is_named_once(tmp_path):
    """Rank 3 sleeps 0.2 s every step, long beside a digits step whatever the load (x4 of a
    few milliseconds of compute was not, under a loaded CI run): late at every vote."""
    out = launch(4, *DIGITS, "--max-steps", "42", "--quorum", "3", "--straggle", "3:0.2",
                 "--out", str(tmp_path), timeout=180)
    assert out.count("rank 3 was late for each of the last 20 votes") == 1, out[-3000:]
    assert "rank 1 was late" not in out and "rank 2 was late" not in out


def test_help_lists_every_choice(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for word in ["--model", "--dataset", "--optimizer", "--adversaries", "--resume", "--device",
                 *mpisign.TOPOLOGIES, "fashion-mnist", "imagefolder", "resnet50", "signsgd",
                 "gpt", "pystdlib", "lion-allreduce", "adamw", "--betas", "--layers", "--width",
                 "--heads", "--context"]:
        assert word in out, word


@pytest.mark.parametrize("argv, message", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--optimizer", "adam"], "invalid choice: 'adam'"),
    (["--topology", "ring-of-fire"], "--topology: invalid choice"),
    (["--batch-size", "0"], "--batch-size: must be > 0"),
    (["--lr", "nan"], "--lr: must be a finite number"),
    (["--momentum", "1.5"], "--momentum must be in [0, 1)"),
    (["--optimizer", "signsgd", "--momentum", "0.9"], "signsgd has no momentum"),
    (["--adversaries", "2"], "--adversaries 2 is more than the 1 ranks"),
    (["--resume"], "--resume needs --out"),
    (["--vote-timeout", "0"], "--vote-timeout must be > 0"),
    (["--attack", "flip"], "--attack: invalid choice"),
    (["--elastic", "--optimizer", "sgd"], "--elastic needs a voting optimizer (signum, signsgd, "
                                          "lion): the allreduce of --optimizer sgd"),
    (["--elastic"], "mpirun --with-ft ulfm"),   # this process was not launched with ULFM
    (["--quorum", "2"], "between 1 and the 1 ranks"),
    (["--quorum", "1", "--optimizer", "sgd"], "--quorum needs a voting optimizer"),
    (["--quorum", "1", "--topology", "allgather"], "topology='server'"),
    (["--quorum", "1.5"], "a fraction in (0, 1]"),
    (["--grace", "1"], "--grace is the wait after a --quorum"),
    (["--straggle", "1:0.5"], "this job has ranks 0..0"),
    (["--straggle", "1:x0.5"], "a compute factor must be >= 1"),
    (["--straggle", "one"], "expected RANK:SECONDS"),
])
def test_bad_options_exit_2_with_a_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_existing_run_is_not_overwritten(reference, capsys):
    handlers = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    try:   # in this process: a 1-rank run that stops before training
        with pytest.raises(SystemExit) as exc:
            main([*DIGITS, "--out", str(reference)])
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "already holds a checkpoint" in err and "--resume" in err


def test_resume_checks_ranks_and_fixed_options(reference):
    from mpi4py import MPI

    where = checkpoint.latest(reference)
    args = build_parser().parse_args([*DIGITS, "--out", str(reference), "--resume"])
    args.momentum, args.lr = 0.9, DEFAULT_LR["signum"]
    data = type("D", (), {"name": "digits"})()
    # Signum resumes 3 ranks' checkpoint on 1 (see test_elastic_resume_...); the SGD baseline
    # cannot, and no optimizer resumes with options that cannot change.
    common, own = load_checkpoint(where, args, data, MPI.COMM_WORLD)
    assert common["world_size"] == 3 and own["rank"] == 0
    args.optimizer = "sgd"
    with pytest.raises(UsageError, match="sgd resumes on as many ranks"):
        load_checkpoint(where, args, data, MPI.COMM_WORLD)
    args.optimizer, args.batch_size = "signum", 16
    with pytest.raises(UsageError, match="batch_size differ from the run"):
        load_checkpoint(where, args, data, MPI.COMM_WORLD)


# -- small pieces ------------------------------------------------------------------------------
def test_learning_rate_warmup_and_step_decay():
    args = build_parser().parse_args(["--lr", "0.1", "--warmup-epochs", "1",
                                      "--lr-decay-epochs", "2", "3", "--lr-decay", "0.5"])
    assert learning_rate(args, 0, 10) == pytest.approx(0.01)
    assert learning_rate(args, 9, 10) == pytest.approx(0.1)
    assert learning_rate(args, 19, 10) == pytest.approx(0.1)
    assert learning_rate(args, 20, 10) == pytest.approx(0.05)
    assert learning_rate(args, 35, 10) == pytest.approx(0.025)
    assert set(DEFAULT_LR) == {"signum", "signsgd", "sgd", "lion", "lion-allreduce", "adamw"}
    # Lion's lr is 3-10x below AdamW's (Chen et al. 2023), on every model.
    for lrs in (DEFAULT_LR, *DEFAULT_LR_BY_MODEL.values()):
        for lion in ("lion", "lion-allreduce"):
            assert 3 <= round(lrs["adamw"] / lrs[lion], 9) <= 10, (lion, lrs)


def test_plot_draws_a_png(reference, tmp_path):
    from mpisign.train.plot import main as plot_main, run_label

    png = tmp_path / "curves.png"
    assert plot_main([str(reference), str(reference), "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert run_label(reference) == "signum/server, 3 ranks"


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
@pytest.mark.parametrize("script", [*sorted(f"slurm/{p.name}" for p in
                                             (REPO / "slurm").glob("*.sbatch")),
                                     "tests/slurm/cluster.sh", ".ci/run"])
def test_slurm_scripts_pass_shellcheck(script):
    out = subprocess.run(["shellcheck", str(REPO / script)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_keep_checkpoints_leaves_a_sequence_for_the_diagnostics(tmp_path):
    main(["--dataset", "digits", "--max-steps", "12", "--checkpoint-every", "4",
          "--keep-checkpoints", "2", "--no-progress", "--out", str(tmp_path)])
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert kept == ["step-000000008", "step-000000012"]
