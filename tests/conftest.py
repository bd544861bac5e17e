"""Shared helpers: launching the CLI and multi-rank scripts with hard deadlines.

Every launch runs in its own process group with a timeout; on expiry the
whole group is killed and the test fails, so a hang on any rank becomes a
failure in bounded time.  mpirun's exit status is non-zero when any rank
fails, so a failure on any rank fails the test.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Horovod v0.28.1's examples/ directory, for the horovod_examples tier.
HOROVOD_EXAMPLES_ENV = "HVDLLM_HOROVOD_EXAMPLES"
# Set to run the multinode tier (root; network namespaces): `make test-multinode`.
MULTINODE_ENV = "HVDLLM_MULTINODE"
# Set to run the slurm tier (root; a one-node Slurm): `make test-slurm`.
SLURM_ENV = "HVDLLM_SLURM"


# Settings hvdllm writes into its own process's environment before Horovod
# starts (``configure_horovod_env``).  Every later subprocess of the suite
# would inherit what a test leaves there: a leaked
# HOROVOD_STALL_CHECK_TIME_SECONDS=30 once made a stall test take 95 s.
LAUNCH_ENV_PREFIXES = ("HOROVOD_", "HVDLLM_")


def launch_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(LAUNCH_ENV_PREFIXES)}


def restore_launch_env(saved: dict[str, str]) -> None:
    for key in set(launch_env()) - set(saved):
        del os.environ[key]
    os.environ.update(saved)


@contextlib.contextmanager
def preserved_launch_env():
    """Undo, on exit, what the body sets in the launch environment (module fixtures)."""
    saved = launch_env()
    try:
        yield
    finally:
        restore_launch_env(saved)


@pytest.fixture(autouse=True)
def launch_env_unchanged():
    """Fail a test that leaves Horovod or hvdllm settings in this process's environment."""
    saved = launch_env()
    yield
    now = launch_env()
    if now != saved:
        restore_launch_env(saved)
        changed = sorted(k for k in set(now) | set(saved) if now.get(k) != saved.get(k))
        pytest.fail(f"the test left {', '.join(changed)} changed in the environment that "
                    "later subprocesses inherit; restore it (monkeypatch.setenv/delenv, "
                    "preserved_launch_env)")


def pytest_configure(config):
    config.addinivalue_line("markers", "horovod_examples: runs Horovod's own TensorFlow 2 "
                            f"examples; deselected unless {HOROVOD_EXAMPLES_ENV} is set")
    config.addinivalue_line("markers", "multinode: two simulated hosts in network namespaces "
                            f"(root); deselected unless {MULTINODE_ENV} is set")
    config.addinivalue_line("markers", "slurm: sbatch jobs on a one-node Slurm started by the "
                            f"test (root); deselected unless {SLURM_ENV} is set")


# Matrix entries that run in `make test-all` only, to keep `make test` (setup
# included) under 30 minutes on a 2-core CI machine.  Most are further
# layouts, frameworks or settings of a test that keeps an entry in the default
# tier.  Seven TensorFlow tests move whole: the executor and TP-layer unit
# checks (the default tier still trains TensorFlow tp and pp layouts against
# one process in test_tf_equality.py), the tape example, the eager drop-in at
# two ranks, the one-allreduce-per-step check, the metric fields, the
# validation loss at dp2 and resume under another layout.
SLOW_ENTRIES = frozenset({
    "test_resume.py::test_kill9_then_rerun_is_bitwise_exact[tensorflow-tp2-pp2-sp-extra4]",
    "test_resume.py::test_kill9_then_rerun_is_bitwise_exact[torch-tp2-pp2-zero1-extra1]",
    "test_resume.py::test_kill9_then_rerun_is_bitwise_exact[tensorflow-dp2-extra3]",
    "test_resume.py::test_kill9_then_rerun_is_bitwise_exact[torch-dp2-powersgd-extra2]",
    "test_resume.py::test_stop_and_continue_is_bitwise_exact_in_one_process[fp16-clip]",
    "test_resume.py::test_stop_and_continue_is_bitwise_exact_in_one_process[topk]",
    "test_resume.py::test_stop_and_continue_is_bitwise_exact_in_one_process[llama-sgd]",
    "test_resume.py::test_stop_and_continue_is_bitwise_exact_in_one_process[topk-momentum]",
    "test_tf_equality.py::test_tensorflow_layout_matches_one_process[gpt-dp2_tp2_pp2]",
    "test_tf_equality.py::test_tensorflow_layout_matches_one_process[llama-dp2_tp2]",
    "test_tf_equality.py::test_tensorflow_layout_matches_one_process[gpt-clip_tp2_pp2]",
    "test_tf_tensor_parallel.py::test_tf_tp_layers_match_dense[2]",
    "test_tf_pipeline.py::test_tf_executor_matches_one_process",
    "test_pipeline.py::test_pipeline_training_matches_single_process[gpt-dp2_tp2_pp2-1f1b-extra4]",
    "test_pipeline.py::test_pipeline_training_matches_single_process[llama-pp2-1f1b-extra1]",
    "test_pipeline.py::test_pipeline_training_matches_single_process[llama-pp4-gpipe-extra3]",
    "test_pipeline.py::test_executor_matches_one_process[4-llama]",
    "test_multirank.py::test_stalled_peer_becomes_an_error[tensorflow]",
    "test_multirank.py::test_horovod_process_sets_match_groups[layout0-tensorflow]",
    "test_multirank.py::test_torch_allreduce_overlaps_backward_and_skips_accumulation[horovod]",
    "test_multirank.py::test_one_failing_rank_ends_the_job[tensorflow-horovodrun]",
    "test_hangs.py::test_frozen_rank_ends_the_job_with_a_report[torch-dp2xpp2-zero1]",
    "test_hangs.py::test_frozen_rank_ends_the_job_with_a_report[torch-tp2]",
    "test_hangs.py::test_torch_dropin_gets_the_same_protection[horovodrun-arg]",
    "test_dp_depth.py::test_global_clipping_matches_single_process[layout0]",
    "test_dp_depth.py::test_global_clipping_matches_single_process[layout1]",
    "test_dp_depth.py::test_zero1_matches_unsharded_adamw[layout2]",
    "test_equality.py::test_loss_matches_single_process[dp4-tensorflow]",
    "test_equality.py::test_loss_matches_single_process[dp1_accum4-tensorflow]",
    "test_cross_framework.py::test_a_run_continues_in_the_other_framework[tensorflow-torch-llama]",
    "test_tensor_parallel.py::test_hf_checkpoint_trains_identically_under_tp[llama]",
    "test_tensor_parallel.py::test_tp_training_matches_single_process[tp2-llama]",
    "test_trainer_eval.py::test_evaluation_does_not_change_training[tensorflow]",
    "test_tf_dropin.py::test_frozen_rank_is_reported[tf_keras_fit_hang.py-DistributedOptimizer gradient reduction]",
    "test_cli.py::test_horovodrun_launch[tensorflow]",
    "test_resume.py::test_tensorflow_resume_under_another_layout[tf-world1]",
    "test_resume.py::test_signal_to_one_rank_saves_and_stops_every_rank[SIGUSR1]",
    "test_tf_equality.py::test_tensorflow_layout_matches_one_process[llama-zero1_dp2]",
    "test_tf_examples.py::test_tape_example_under_horovodrun",
    "test_multirank.py::test_tensorflow_single_allreduce_outside_accumulation_loop",
    "test_tf_dp_depth.py::test_training_metrics_carry_the_torch_fields",
    "test_trainer_eval.py::test_tensorflow_val_loss_matches_one_process_and_dp2",
    "test_tf_dropin.py::test_dropin_at_two_ranks",
    "test_dp_multirank.py::test_compressors_against_exact_average[4]",
    "test_resume.py::test_resume_under_another_layout[dp2xpp2]",
    "test_pipeline.py::test_pipeline_training_matches_single_process[gpt-pp2-interleaved-extra2]",
    "test_hangs.py::test_frozen_rank_ends_the_job_with_a_report[torch-pp2]",
})


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Mark :data:`SLOW_ENTRIES` slow; deselect (not skip) the opt-in tiers whose
    environment variable is not set."""
    for item in items:
        if item.nodeid.split("/")[-1] in SLOW_ENTRIES:
            item.add_marker(pytest.mark.slow)
    for marker, env in (("horovod_examples", HOROVOD_EXAMPLES_ENV), ("multinode", MULTINODE_ENV),
                        ("slurm", SLURM_ENV)):
        if os.environ.get(env):
            continue
        dropped = [item for item in items if item.get_closest_marker(marker)]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = [item for item in items if not item.get_closest_marker(marker)]


def base_env(extra_pythonpath: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(REPO)] + ([extra_pythonpath] if extra_pythonpath else [])
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("PYTHONUNBUFFERED", "1")
    if os.geteuid() == 0:
        env["OMPI_ALLOW_RUN_AS_ROOT"] = "1"
        env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1"
    return env


def mpirun_prefix(np: int) -> list[str]:
    mpirun = shutil.which("mpirun", path=str(BIN)) or shutil.which("mpirun")
    if mpirun is None:
        pytest.fail("mpirun not found; run `make setup`")
    return [mpirun, "-np", str(np), "--oversubscribe"]


def horovodrun_prefix(np: int) -> list[str]:
    return [str(BIN / "horovodrun"), "-np", str(np), "-H", f"localhost:{np}"]


def run(cmd: list[str], timeout: float, env: dict[str, str] | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` in a new process group; kill the group and fail on timeout."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env or base_env(), cwd=cwd or REPO, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\n--- stdout\n{out[-3000:]}"
                    f"\n--- stderr\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_ok(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    res = run(cmd, timeout, **kw)
    if res.returncode != 0:
        pytest.fail(f"exit {res.returncode}: {' '.join(cmd)}\n--- stdout\n{res.stdout[-4000:]}"
                    f"\n--- stderr\n{res.stderr[-4000:]}")
    return res


def hvdllm_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "hvdllm", *args]


def read_metrics(out_dir: Path) -> list[dict]:
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]
