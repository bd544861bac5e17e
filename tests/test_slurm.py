"""The example sbatch scripts (examples/slurm/) on a real Slurm.

A one-node cluster (munged, slurmctld, slurmd from Debian's slurm-wlm, all
files in a temporary directory) is started by tests/slurm/start_cluster.sh.
Jobs are submitted with sbatch exactly as a user would, at 2 ranks:

* a run to completion under ``srun --mpi=pmix`` (train_cpu.sbatch);
* preemption and requeue: once a checkpoint exists the batch script gets
  SIGUSR1 (what ``--signal=B:USR1@120`` sends), the ranks checkpoint and
  exit 75, the script requeues the job, and the requeued job resumes from
  that checkpoint and finishes, for srun (train_cpu.sbatch) and for mpirun
  inside the allocation (train_mpirun.sbatch); and a requeue ordered from
  outside (``scontrol requeue``, as preemption does: SIGTERM to every
  process of the job).

Root only (the daemons); opt-in: `make test-slurm` (HVDLLM_SLURM=1).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, base_env, read_metrics, run, run_ok

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

HERE = Path(__file__).resolve().parent / "slurm"
EXAMPLES = REPO / "examples" / "slurm"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.fail("the slurm tier needs root (it starts munged, slurmctld and slurmd)")
    missing = [t for t in ("munged", "slurmctld", "slurmd", "sbatch") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: apt-get install slurm-wlm munge libpmix2 libpmix-dev")
    root = tmp_path_factory.mktemp("slurm")
    env = base_env()
    try:
        run_ok(["bash", str(HERE / "start_cluster.sh"), str(root / "cluster"), "2"], timeout=120, env=env)
        env["SLURM_CONF"] = str(root / "cluster" / "slurm.conf")
        # One node, reached as 127.0.0.1: keep MPI's TCP traffic on loopback
        # (the interface selection docs/clusters.md describes for real networks).
        env["OMPI_MCA_btl_tcp_if_include"] = "lo"
        yield env, root
    finally:
        run(["bash", str(HERE / "stop_cluster.sh"), str(root / "cluster")], timeout=60, env=env)


def job_fields(env, jid: str) -> dict[str, str]:
    res = run_ok(["scontrol", "show", "job", "-o", jid], timeout=20, env=env)
    return dict(re.findall(r"(\w+)=(\S*)", res.stdout))


def submit(env, root: Path, script: str, name: str, *args: str) -> tuple[str, Path]:
    log = root / f"{name}.out"
    res = run_ok(["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1",
                  "--time=20", f"--output={log}", f"--job-name={name}", str(EXAMPLES / script),
                  "--config", "configs/example.toml", *args], timeout=30, env=env)
    return res.stdout.strip().split(";")[0], log


def wait_final(env, jid: str, log: Path, timeout: float) -> dict[str, str]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        fields = job_fields(env, jid)
        if fields.get("JobState") in FINAL_STATES:
            return fields
        time.sleep(1)
    subprocess.run(["scancel", jid], env=env, timeout=20)
    text = log.read_text() if log.exists() else "(no log)"
    pytest.fail(f"job {jid} not finished after {timeout}s: {fields}\n--- log\n{text[-4000:]}")


def wait_checkpoint(out: Path, jid: str, env, log: Path, timeout: float = 300) -> None:
    """Wait for the job's first checkpoint, ``timeout`` seconds from submission.

    Generous: on a loaded 2-core machine the step launch alone has taken 75 s.
    """
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if any((out / "checkpoints").glob("step-*")):
            return
        state = job_fields(env, jid).get("JobState")
        if state in FINAL_STATES:
            text = log.read_text() if log.exists() else "(no log)"
            pytest.fail(f"job {jid} ended ({state}) without a checkpoint\n--- log\n{text[-4000:]}")
        time.sleep(0.5)
    subprocess.run(["scancel", jid], env=env, timeout=20)
    pytest.fail(f"job {jid}: no checkpoint in {out} within {timeout}s of its submission")


def steps_logged(out: Path) -> list[int]:
    return [m["step"] for m in read_metrics(out)]


def test_srun_pmix_job_runs_to_completion(cluster):
    env, root = cluster
    out = root / "run-complete"
    jid, log = submit(env, root, "train_cpu.sbatch", "complete", "--set", "train.steps=8",
                      "--set", f"output.dir={out}")
    fields = wait_final(env, jid, log, timeout=300)
    text = log.read_text()
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", (fields, text)
    assert "world 2 = dp 2 x tp 1 x pp 1" in text, text
    assert "done steps 1-8" in text, text
    assert steps_logged(out) == list(range(1, 9))
    assert (out / "checkpoints" / "step-00000008" / "manifest.json").is_file()


@pytest.mark.parametrize("script,how", [("train_cpu.sbatch", "signal"),
                                        ("train_mpirun.sbatch", "signal"),
                                        ("train_cpu.sbatch", "scontrol")])
def test_preempted_job_requeues_and_resumes(cluster, script, how):
    env, root = cluster
    steps = 600
    name = f"{script.split('.')[0]}-{how}"
    out = root / f"run-{name}"
    jid, log = submit(env, root, script, name, "--set", f"train.steps={steps}",
                      "--set", "output.checkpoint_every=25", "--set", f"output.dir={out}")
    wait_checkpoint(out, jid, env, log)
    if how == "signal":   # what Slurm's --signal=B:USR1@120 does before the time limit
        run_ok(["scancel", "--signal=USR1", "--batch", jid], timeout=20, env=env)
        signame = "SIGUSR1"
    else:                 # what preemption with PreemptMode=REQUEUE does: SIGTERM to the job
        run_ok(["scontrol", "requeue", jid], timeout=20, env=env)
        signame = "SIGTERM"
    fields = wait_final(env, jid, log, timeout=600)
    text = log.read_text()
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", (fields, text)
    assert fields["Restarts"] == "1", (fields, text)
    stopped = re.search(rf"stopped by {signame} after step (\d+); checkpoint in (\S+);", text)
    assert stopped, text
    step = int(stopped.group(1))
    assert 0 < step < steps, text
    assert "restart 1, dp=2" in text, text
    assert f"resuming from {stopped.group(2)} at step {step}" in text, text
    assert f"done steps {step + 1}-{steps}" in text, text
    # Every step once: metrics.jsonl was cut back to the checkpoint and continued.
    assert steps_logged(out) == list(range(1, steps + 1))
    assert (out / "checkpoints" / f"step-{steps:08d}" / "manifest.json").is_file()
