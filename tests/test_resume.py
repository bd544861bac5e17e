"""Runs that survive: kill -9 and exact resume, resharding, SIGTERM saves, damaged checkpoints.

Every run here is a real ``hvdllm train`` under mpirun (or one process), with
hard deadlines (see conftest).  Exact resume compares a run that was killed
with SIGKILL on every rank at a random moment, then rerun with the same
command, against an uninterrupted run: the ``metrics.jsonl`` losses from the
checkpointed step on, and the final parameters, must be bitwise equal.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, base_env, hvdllm_cmd, mpirun_prefix, read_metrics, run, run_ok
from hvdllm.common.train_checkpoint import consolidated_parameters, list_checkpoints

TIMEOUT = 240
STEPS = 12
TORCH_DP2 = ["parallel.dp=2"]
TORCH_TP2_PP2_ZERO = ["parallel.tp=2", "parallel.pp=2", "train.zero=1", "train.micro_batch_size=1",
                      "train.grad_clip=1.0"]
TORCH_DP2_POWERSGD = ["parallel.dp=2", "train.compression=powersgd", "train.powersgd_rank=2"]
TF_DP2 = ["parallel.dp=2", "train.framework=tensorflow"]
TF_TP2_PP2_SP = ["train.framework=tensorflow", "parallel.tp=2", "parallel.pp=2",
                 "parallel.sequence_parallel=true", "train.micro_batch_size=1",
                 "train.grad_clip=1.0"]
TF_DP2_TP2_ZERO = ["train.framework=tensorflow", "parallel.dp=2", "parallel.tp=2",
                   "train.zero=1", "output.keep_checkpoints=10"]


def _sets(out: Path, extra: list[str], steps: int = STEPS) -> list[str]:
    base = [f"output.dir={out}", f"train.steps={steps}", "output.checkpoint_every=2",
            "output.keep_checkpoints=3", "model.n_layer=2", "model.d_model=32",
            "model.n_head=4", "model.seq_len=32", "train.global_batch_size=8"]
    args = []
    for item in base + extra:
        args += ["--set", item]
    return args


def _cmd(np_: int, out: Path, extra: list[str], steps: int = STEPS) -> list[str]:
    prefix = mpirun_prefix(np_) if np_ > 1 else []
    return prefix + hvdllm_cmd("train", *_sets(out, extra, steps))


def _world(extra: list[str]) -> int:
    n = 1
    for item in extra:
        key, _, value = item.partition("=")
        if key in ("parallel.dp", "parallel.tp", "parallel.pp"):
            n *= int(value)
    return n


def _rank_pids(marker: str) -> list[int]:
    """The training processes (not the launcher) whose command line contains ``marker``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(marker.encode() in a for a in argv) and b"hvdllm" in argv and \
                Path(argv[0].decode()).name.startswith("python"):
            pids.append(int(entry.name))
    return pids


def _last_step(out: Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError, KeyError, IndexError):
        return 0


def _committed(out: Path) -> list[int]:
    return [s for s, d in list_checkpoints(out / "checkpoints") if (d / "manifest.json").exists()]


def _kill_all_at(cmd: list[str], out: Path, kill_step: int, world: int) -> int:
    """Start ``cmd``, SIGKILL every rank once the run passes ``kill_step``; returns the step seen."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=base_env(), cwd=REPO, start_new_session=True)
    deadline = time.monotonic() + TIMEOUT
    seen = 0
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            seen = _last_step(out)
            if seen >= kill_step and _committed(out):
                break
            time.sleep(0.005)
        else:
            out_text = proc.communicate(timeout=30)[0] if proc.poll() is not None else ""
            pytest.fail(f"the run ended or stalled before step {kill_step} (saw {seen}):\n"
                        f"{out_text[-3000:]}")
        pids = _rank_pids(str(out))
        assert len(pids) == world, f"expected {world} rank processes, found {pids}"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
    finally:
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0, "the killed run claims success"
    return seen


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out)}


def _final_params(out: Path) -> dict[str, np.ndarray]:
    return consolidated_parameters(out)[1]


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory):
    """Uninterrupted runs, one per layout, shared by the tests of this module."""
    cache: dict[str, Path] = {}

    def get(name: str, extra: list[str]) -> Path:
        if name not in cache:
            out = tmp_path_factory.mktemp(f"ref-{name}")
            run_ok(_cmd(_world(extra), out, extra), TIMEOUT)
            cache[name] = out
        return cache[name]
    return get


@pytest.mark.parametrize("name,extra", [
    ("torch-dp2", TORCH_DP2),
    ("torch-tp2-pp2-zero1", TORCH_TP2_PP2_ZERO),
    ("torch-dp2-powersgd", TORCH_DP2_POWERSGD),
    ("tensorflow-dp2", TF_DP2),
    ("tensorflow-tp2-pp2-sp", TF_TP2_PP2_SP),
    pytest.param("tensorflow-dp2-tp2-zero1", TF_DP2_TP2_ZERO, marks=pytest.mark.slow),
    pytest.param("torch-dp2-tp2-pp2-zero1", ["parallel.dp=2"] + TORCH_TP2_PP2_ZERO,
                 marks=pytest.mark.slow),
])
def test_kill9_then_rerun_is_bitwise_exact(name, extra, tmp_path, reference_runs):
    ref = reference_runs(name, extra)
    world = _world(extra)
    kill_step = random.Random().randint(3, STEPS - 2)
    out = tmp_path / "run"
    cmd = _cmd(world, out, extra)
    seen = _kill_all_at(cmd, out, kill_step, world)
    saved = max(_committed(out))
    res = run_ok(cmd, TIMEOUT)  # the same command again
    assert f"resuming from {out / 'checkpoints'}" in res.stdout, res.stdout[-2000:]
    resumed_at = int(res.stdout.split("resuming from ")[1].split(" at step ")[1].split()[0])
    assert resumed_at == saved, (resumed_at, saved)
    want, got = _losses(ref), _losses(out)
    assert sorted(got) == list(range(1, STEPS + 1)), f"steps logged: {sorted(got)}"
    diff = {s: (want[s], got[s]) for s in range(resumed_at + 1, STEPS + 1) if want[s] != got[s]}
    assert not diff, f"killed at step {seen}, resumed at {resumed_at}: losses differ {diff}"
    ref_params, params = _final_params(ref), _final_params(out)
    assert sorted(ref_params) == sorted(params)
    bad = [k for k in params if not np.array_equal(ref_params[k], params[k])]
    assert not bad, f"final parameters differ (killed at {seen}): {bad}"


@pytest.mark.parametrize("target", [
    ["parallel.dp=2", "parallel.pp=2", "train.micro_batch_size=1"],
    ["parallel.dp=1"],
    pytest.param(["parallel.dp=4", "train.micro_batch_size=1"], marks=pytest.mark.slow),
    pytest.param(["parallel.tp=2", "parallel.pp=2", "train.micro_batch_size=1"],
                 marks=pytest.mark.slow),
], ids=["dp2xpp2", "world1", "dp4", "tp2xpp2"])
def test_resume_under_another_layout(target, tmp_path, reference_runs):
    source = ["parallel.dp=2", "parallel.tp=2", "train.zero=1", "output.keep_checkpoints=10"]
    ref = reference_runs("torch-dp2-tp2-zero1", source)
    start = 6
    out = tmp_path / "resharded"
    args = target + [f"train.resume={ref / 'checkpoints' / f'step-{start:08d}'}"]
    if start not in _committed(ref):
        shutil.copytree(ref / "checkpoints", out / "unused")  # keep the failure readable
        pytest.fail(f"reference run kept checkpoints {_committed(ref)}, not step {start}")
    res = run_ok(_cmd(_world(target), out, args), TIMEOUT)
    assert "resharded" in res.stdout, res.stdout[-2000:]
    want, got = _losses(ref), _losses(out)
    assert sorted(got) == list(range(start + 1, STEPS + 1))
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-4), (step, got[step], want[step])
    # Rerunning the same command continues this run from its own newest checkpoint.
    res = run_ok(_cmd(_world(target), out, args, steps=STEPS + 1), TIMEOUT)
    assert "continuing from the newest" in res.stdout and f"at step {STEPS}" in res.stdout


@pytest.mark.parametrize("target", [
    ["train.framework=tensorflow"],
    pytest.param(["train.framework=torch", "parallel.pp=2", "train.micro_batch_size=1"],
                 marks=pytest.mark.slow),
    pytest.param(["train.framework=tensorflow", "parallel.tp=2", "parallel.pp=2",
                  "train.micro_batch_size=1"], marks=pytest.mark.slow),
], ids=["tf-world1", "torch-pp2", "tf-tp2xpp2"])
def test_tensorflow_resume_under_another_layout(target, tmp_path, reference_runs):
    """A TensorFlow dp=2 x tp=2 ZeRO-1 run continues at another layout (or in torch)."""
    ref = reference_runs("tensorflow-dp2-tp2-zero1", TF_DP2_TP2_ZERO)
    start = 6
    if start not in _committed(ref):
        pytest.fail(f"reference run kept checkpoints {_committed(ref)}, not step {start}")
    out = tmp_path / "resharded"
    args = target + [f"train.resume={ref / 'checkpoints' / f'step-{start:08d}'}"]
    res = run_ok(_cmd(_world(target), out, args), TIMEOUT)
    assert "resharded" in res.stdout or "continued in torch" in res.stdout, res.stdout[-2000:]
    want, got = _losses(ref), _losses(out)
    assert sorted(got) == list(range(start + 1, STEPS + 1))
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-4), (step, got[step], want[step])


def _start_long_run(out: Path, extra: list[str], steps: int) -> subprocess.Popen:
    return subprocess.Popen(_cmd(_world(extra), out, extra + ["output.checkpoint_every=0"],
                                 steps), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=base_env(), cwd=REPO, start_new_session=True)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])
def test_signal_to_one_rank_saves_and_stops_every_rank(sig, tmp_path):
    out = tmp_path / "run"
    extra = ["parallel.dp=2"]
    proc = _start_long_run(out, extra, steps=100000)
    try:
        deadline = time.monotonic() + TIMEOUT
        while _last_step(out) < 5 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        pids = _rank_pids(str(out))
        assert len(pids) == 2, pids
        sent = time.monotonic()
        os.kill(pids[-1], getattr(signal, sig))
        stdout, stderr = proc.communicate(timeout=120)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 75, (proc.returncode, stdout[-2000:], stderr[-2000:])
    assert "rerun the same command to continue" in stderr, stderr[-2000:]
    steps = _committed(out)
    assert len(steps) == 1 and steps[0] == _last_step(out), (steps, _last_step(out))
    assert took < 30, f"stopping took {took:.1f}s"
    # The rerun continues from there (and is told so).
    res = run_ok(_cmd(2, out, extra + ["output.checkpoint_every=0"], steps[0] + 2), TIMEOUT)
    assert f"at step {steps[0]}" in res.stdout
    assert sorted(_losses(out))[-1] == steps[0] + 2


def test_damaged_checkpoints_fall_back_then_fail_clearly(tmp_path):
    out = tmp_path / "run"
    run_ok(_cmd(1, out, [], steps=6), TIMEOUT)
    assert _committed(out) == [6, 4, 2]
    ckpt = out / "checkpoints"
    # step 6: a corrupted byte; step 4: truncated; step 2 intact.
    f6 = ckpt / "step-00000006" / "rank-00000.safetensors"
    data = bytearray(f6.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f6.write_bytes(bytes(data))
    f4 = ckpt / "step-00000004" / "rank-00000.safetensors"
    f4.write_bytes(f4.read_bytes()[:-100])
    res = run_ok(_cmd(1, out, [], steps=7), TIMEOUT)
    assert f"{f6} fails its checksum" in res.stderr, res.stderr[-2000:]
    assert f"{f4} has" in res.stderr and "truncated" in res.stderr
    assert "at step 2" in res.stdout
    assert sorted(_losses(out)) == list(range(1, 8))
    # Nothing usable at all: one line, non-zero exit.
    for _, d in list_checkpoints(ckpt):
        (d / "manifest.json").unlink()
    res = run(_cmd(1, out, [], steps=9), TIMEOUT)
    assert res.returncode == 2
    errors = [line for line in res.stderr.splitlines() if line.startswith("hvdllm: error:")]
    assert len(errors) == 1 and "no usable checkpoint" in errors[0], res.stderr[-2000:]
    assert "Traceback" not in res.stderr


def test_bad_resume_inputs_get_one_line_errors(tmp_path):
    out = tmp_path / "run"
    run_ok(_cmd(1, out, [], steps=2), TIMEOUT)
    cases = {
        "model.d_model=64": "model.d_model: checkpoint 32, config 64",
        f"train.resume={tmp_path / 'nowhere'}": "train.resume: no checkpoint at",
    }
    for override, message in cases.items():
        res = run(_cmd(1, out, [override], steps=4), TIMEOUT)
        assert res.returncode == 2, (override, res.stdout[-1000:], res.stderr[-2000:])
        assert message in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    res = run(_cmd(1, blocker / "sub", [], steps=2), TIMEOUT)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert f"output.dir {blocker / 'sub'} cannot be used" in res.stderr


def test_finished_run_says_so_and_exits_zero(tmp_path):
    out = tmp_path / "run"
    run_ok(_cmd(1, out, [], steps=2), TIMEOUT)
    res = run_ok(_cmd(1, out, [], steps=2), TIMEOUT)
    assert "already finished" in res.stdout and "at step 2" in res.stdout


@pytest.mark.parametrize("extra", [
    ["model.family=llama", "train.optimizer=sgd", "model.n_kv_head=2"],
    ["train.precision=fp16", "train.grad_clip=0.5"],
    ["train.compression=topk", "train.topk_ratio=0.1"],
    ["train.compression=topk", "train.topk_ratio=0.1", "train.compression_target=momentum",
     "train.compression_warmup_steps=3"],
    ["model.dropout=0.1"],
    ["train.framework=tensorflow", "model.dropout=0.1"],
], ids=["llama-sgd", "fp16-clip", "topk", "topk-momentum", "dropout-rng",
        "tensorflow-dropout-rng"])
def test_stop_and_continue_is_bitwise_exact_in_one_process(extra, tmp_path):
    """Optimizer kinds, the fp16 loss scaler, error feedback and dropout's RNG carry over exactly."""
    ref, out = tmp_path / "ref", tmp_path / "run"
    run_ok(_cmd(1, ref, extra, steps=8), TIMEOUT)
    run_ok(_cmd(1, out, extra, steps=5), TIMEOUT)
    res = run_ok(_cmd(1, out, extra, steps=8), TIMEOUT)
    assert "at step 5" in res.stdout, res.stdout[-2000:]
    assert _losses(ref) == _losses(out)
    # Counters that steps read later (the loss scaler's clean-step count, the
    # optimizer's step count) continue, rather than restart, after a resume.
    shared = [json.loads((max(list_checkpoints(d / "checkpoints"))[1] / "manifest.json")
                         .read_text())["shared"] for d in (ref, out)]
    for key in ("loss_scale", "optimizer_steps", "data"):
        assert shared[0].get(key) == shared[1].get(key), (key, shared)
    ref_params, params = _final_params(ref), _final_params(out)
    assert all(np.array_equal(ref_params[k], params[k]) for k in ref_params)


@pytest.mark.parametrize("name,extra", [
    ("torch-tp2-pp2-zero1", TORCH_TP2_PP2_ZERO),
    ("tensorflow-dp2", TF_DP2),
    ("tensorflow-tp2-pp2-sp", TF_TP2_PP2_SP),
])
def test_convert_consolidates_a_training_checkpoint(name, extra, tmp_path, reference_runs):
    """``hvdllm convert --to-hf`` takes a run's output.dir and assembles the shards itself."""
    from hvdllm.common.hf import load_hf_checkpoint

    ref = reference_runs(name, extra)
    hf_dir = tmp_path / "hf"
    res = run_ok(hvdllm_cmd("convert", "--to-hf", str(ref), "--out", str(hf_dir)), TIMEOUT)
    assert "wrote Hugging Face checkpoint" in res.stdout
    _, hf_tensors = load_hf_checkpoint(hf_dir)
    params = _final_params(ref)
    assert sorted(hf_tensors) == sorted(params)
    for key, value in params.items():
        np.testing.assert_array_equal(hf_tensors[key], value, err_msg=key)
