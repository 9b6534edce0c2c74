"""``srun`` and ``sbatch`` as a user types them, on a real one-node Slurm cluster.

The cluster is Debian's ``slurm-wlm`` started by ``tests/slurm/cluster.sh`` (``.ci/run`` starts
it; by hand: ``bash tests/slurm/cluster.sh install && bash tests/slurm/cluster.sh start``). Its
``MpiDefault`` is ``none``, as Slurm ships, so a launch without ``--mpi=pmix`` gives every task
a world of its own: the silent singletons mpisign must refuse. Every command runs under a
timeout; the tests skip, saying why, when no cluster answers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
DIGITS = ["--dataset", "digits", "--batch-size", "32", "--no-progress", "--log-every", "5"]


def _cluster_env() -> tuple[dict | None, str]:
    """The environment that reaches the test cluster, or None and why not."""
    if shutil.which("srun") is None or shutil.which("sbatch") is None:
        return None, "Slurm is not installed (bash tests/slurm/cluster.sh install)"
    env = dict(os.environ)
    try:
        exports = subprocess.run(["bash", str(CLUSTER), "env"], capture_output=True, text=True,
                                 timeout=30).stdout
    except subprocess.TimeoutExpired:
        return None, "tests/slurm/cluster.sh env timed out"
    for name, value in re.findall(r"^export (\w+)=['\"]?(.*?)['\"]?$", exports, re.M):
        env[name] = value
    try:
        state = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                               env=env, timeout=30)
    except subprocess.TimeoutExpired:
        return None, "sinfo timed out: no slurmctld answers"
    if state.returncode != 0 or not re.search(r"idle|mix|alloc", state.stdout):
        return None, (f"no Slurm node is up (bash tests/slurm/cluster.sh start): "
                      f"{(state.stdout + state.stderr).strip()[:200]}")
    # What the tasks need: this interpreter's venv first on PATH, ranks that yield their core.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(OMP_NUM_THREADS="1", OMPI_MCA_mpi_yield_when_idle="1", MPISIGN_TIMEOUT="60",
               PYTHONUNBUFFERED="1")
    for name in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS", "SLURM_JOB_ID",
                 "MPISIGN_ALLOW_SINGLETON"):
        env.pop(name, None)   # nothing of an enclosing launch leaks into the tasks
    return env, ""


ENV, WHY_NOT = _cluster_env()
pytestmark = pytest.mark.skipif(ENV is None, reason=WHY_NOT)


def run(cmd: list[str], timeout: float, cwd: Path = REPO, **extra) -> subprocess.CompletedProcess:
    env = {**ENV, **extra}
    try:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"{' '.join(cmd)}: still running after {timeout:g} s\n"
                             f"{(e.stdout or b'')[-3000:]}") from None


def records(out: Path, kind: str | None = None) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if kind is None or r["type"] == kind]


def train_cmd(mpi: str, n: int, out: Path, *args: str) -> list[str]:
    return ["srun", f"--mpi={mpi}", "-n", str(n), "--kill-on-bad-exit=1", "python", "-m",
            "mpisign.train", *DIGITS, "--out", str(out), *args]


def test_srun_with_pmix_trains_on_3_ranks(tmp_path):
    out = tmp_path / "run"
    proc = run(train_cmd("pmix", 3, out, "--max-steps", "20"), timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    info = json.loads((out / "run.json").read_text())
    assert info["world_size"] == 3 and info["slurm"]["SLURM_NTASKS"] == "3", info["slurm"]
    assert [r["step"] for r in records(out, "step")] == [5, 10, 15, 20]
    assert records(out, "done")[-1]["step"] == 20
    # The summary on stdout (srun's -o), the logs on stderr (-e).
    assert proc.stdout.startswith("mpisign.train: done, 20 steps on 3 rank(s)"), proc.stdout
    assert "[rank 0] INFO" in proc.stderr and "[rank" not in proc.stdout
    assert (out / "curves.png").is_file()


def test_an_error_every_task_raises_is_printed_in_full_once(tmp_path):
    proc = run(["srun", "--mpi=pmix", "-n", "3", "python", "tests/mpi/report_check.py",
                "divergence"], timeout=120)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-3000:]
    assert text.count("Traceback (most recent call last)") == 1, text[-3000:]
    assert text.count("(raised alike on all 3 ranks; rank 0 prints it in full)") == 2, text


@pytest.mark.parametrize("mpi", ["none", "pmi2"])
def test_srun_without_pmix_is_refused_and_writes_nothing(tmp_path, mpi):
    out = tmp_path / "run"
    t0 = time.monotonic()
    proc = run(train_cmd(mpi, 3, out, "--max-steps", "20"), timeout=120)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-3000:]
    # Every task says why, and none of them ran a training of its own.
    assert text.count("the launcher started 3 tasks") == 3, text[-3000:]
    assert "srun --mpi=pmix" in text
    assert not out.exists(), sorted(p.name for p in out.rglob("*"))
    assert time.monotonic() - t0 < 60


def test_a_bad_option_ends_every_task_with_exit_2(tmp_path):
    proc = run(["srun", "--mpi=pmix", "-n", "3", "python", "-m", "mpisign.train",
                "--dataset", "digits", "--out", str(tmp_path / "run"), "--momentum", "1.5"],
               timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "--momentum must be in [0, 1)" in proc.stderr
    assert not (tmp_path / "run").exists()


# -- the shipped script, with the CPU-partition overrides its header documents ----------------
CPU_PARTITION = ["--nodes=1", "--gpus-per-node=0", "--cpus-per-task=1", "--mem=0", "--ntasks-per-node=3",
                 "--time=00:10:00"]
CPU_TRAINING = ["--device", "cpu", "--model", "cnn", *DIGITS]
#: What multinode.sbatch's header says to set on a partition without InfiniBand or GPUs.
NO_INFINIBAND = dict(DATA="-", OMPI_MCA_pml="ob1", OMPI_MCA_osc="^ucx",
                     OMPI_MCA_coll_ucc_enable="0")


SUBMITTED: list[str] = []


@pytest.fixture(autouse=True)
def cancel_leftover_jobs():
    """A failed test leaves no job behind to hold the node for the next one."""
    yield
    if SUBMITTED:
        run(["scancel", *SUBMITTED], timeout=30)
        SUBMITTED.clear()


def sbatch(out: Path, log: Path, *args: str, script: str = "train.sbatch") -> str:
    """Submit one of slurm/'s scripts with the CPU overrides; return the job id."""
    env = NO_INFINIBAND if script == "multinode.sbatch" else {}
    proc = run(["sbatch", "--parsable", *CPU_PARTITION, f"--output={log}",
                str(REPO / "slurm" / script), *CPU_TRAINING, *args],
               timeout=60, cwd=out.parent, OUT=str(out), **env)
    assert proc.returncode == 0, proc.stderr
    SUBMITTED.append(proc.stdout.strip().split(";")[0])
    return SUBMITTED[-1]


def job_state(job: str) -> tuple[str, str]:
    """``(JobState, ExitCode)`` from ``scontrol show job``; ("", "") once it is forgotten."""
    proc = run(["scontrol", "show", "job", job], timeout=30)
    state = re.search(r"JobState=(\S+)", proc.stdout)
    code = re.search(r"\bExitCode=(\S+)", proc.stdout)
    return (state.group(1) if state else "", code.group(1) if code else "")


def wait_for(what: str, done, timeout: float, log: Path, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = done()
        if result:
            return result
        time.sleep(interval)
    text = log.read_text()[-4000:] if log.exists() else "(no job output)"
    raise AssertionError(f"{what}: not after {timeout:g} s\n{text}")


def finished(job: str):
    state, code = job_state(job)
    return (state, code) if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                      "NODE_FAIL", "OUT_OF_MEMORY") else None


@pytest.mark.parametrize("script", ["train.sbatch", "multinode.sbatch"])
def test_the_shipped_sbatch_script_completes_on_a_cpu_partition(tmp_path, script):
    out, log = tmp_path / "run", tmp_path / "job.out"
    job = sbatch(out, log, "--max-steps", "15", script=script)
    state, code = wait_for("job end", lambda: finished(job), 240, log)
    text = log.read_text()
    assert (state, code) == ("COMPLETED", "0:0"), text[-4000:]
    assert "command not found" not in text, text[:2000]
    assert re.search(r"tasks: +3", text) and "python:  " + str(Path(sys.executable).parent) in text
    assert json.loads((out / "run.json").read_text())["world_size"] == 3
    assert records(out, "done")[-1]["step"] == 15


def test_usr1_checkpoints_requeues_and_resumes_without_a_lost_step(tmp_path):
    out, log = tmp_path / "run", tmp_path / "job.out"
    total = 1500   # 14 steps an epoch on 3 ranks: ~25 s, long enough to signal it mid-run
    job = sbatch(out, log, "--max-steps", str(total))
    wait_for("steps in metrics.jsonl",
             lambda: (out / "metrics.jsonl").is_file() and len(records(out, "step")) >= 3,
             180, log)
    proc = run(["scancel", "--signal=USR1", "--batch", job], timeout=30)
    assert proc.returncode == 0, proc.stderr
    wait_for("the requeued job's end",
             lambda: (out / "metrics.jsonl").is_file() and records(out, "done") and
             finished(job), 300, log)
    text = log.read_text()
    stopped, resumed = records(out, "stopped"), records(out, "resume")
    assert [s["signal"] for s in stopped] == ["SIGUSR1"], text[-4000:]
    assert [r["step"] for r in resumed] == [stopped[0]["step"]], (stopped, resumed)
    assert 0 < stopped[0]["step"] < total
    assert "requeueing" in text and "restart 1" in text, text[-4000:]
    assert json.loads((out / "run.json").read_text())["slurm"]["SLURM_RESTART_COUNT"] == "1"
    # No step lost, none twice: every --log-every multiple exactly once, across the restart.
    assert [r["step"] for r in records(out, "step")] == list(range(5, total + 1, 5))
    assert [r["epoch"] for r in records(out, "epoch")] == list(range(1, total // 14 + 1))
    assert records(out, "done")[-1]["step"] == total
    assert finished(job) == ("COMPLETED", "0:0")


def test_usr1_with_no_requeue_says_so_and_ends_completed(tmp_path):
    out, log = tmp_path / "run", tmp_path / "job.out"
    proc = run(["sbatch", "--parsable", "--no-requeue", *CPU_PARTITION, f"--output={log}",
                str(REPO / "slurm" / "train.sbatch"), *CPU_TRAINING, "--max-steps", "1500"],
               timeout=60, cwd=tmp_path, OUT=str(out))
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    SUBMITTED.append(job)
    wait_for("steps in metrics.jsonl",
             lambda: (out / "metrics.jsonl").is_file() and len(records(out, "step")) >= 2,
             180, log)
    run(["scancel", "--signal=USR1", "--batch", job], timeout=30)
    state, code = wait_for("job end", lambda: finished(job), 180, log)
    text = log.read_text()
    assert "requeue refused" in text, text[-3000:]
    assert (state, code) == ("COMPLETED", "0:0"), text[-3000:]
    assert records(out, "stopped") and not records(out, "done")
