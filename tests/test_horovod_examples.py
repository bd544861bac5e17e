"""Horovod's own TensorFlow 2 example programs (v0.28.1) through hvdllm's drop-ins.

The programs come from a Horovod v0.28.1 checkout named by
``HVDLLM_HOROVOD_EXAMPLES`` (its ``examples`` directory; ``make
test-horovod-examples HOROVOD_EXAMPLES=...``).  Without it the
``horovod_examples`` tests are deselected, never counted as passed; they are
``slow`` too, so ``make test`` leaves them out either way.

* each program is changed only by its listed edits (the import line; Keras 3's
  ``opt.variables``; no ``experimental_run_tf_function``), and the diff shows
  exactly those lines;
* at 2 ranks under horovodrun, on synthetic data (tests/horovod_examples/run_example.py):
  both ranks finish with the same finite trainable weights, though each rank
  drew its own data; the benchmarks print their img/sec lines; ``fit``'s
  averaged metrics agree across ranks; the MNIST program's learning rate
  follows Horovod's warmup formula, its loss falls and its rank-0 checkpoints
  hold the final weights.
"""
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import HOROVOD_EXAMPLES_ENV, REPO, base_env, horovodrun_prefix, run_ok

RUNNER = Path(__file__).parent / "horovod_examples" / "run_example.py"
_spec = importlib.util.spec_from_file_location("run_example", RUNNER)
run_example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_example)



def tier(test):
    """Needs the checkout: deselected without it, and never in ``make test``."""
    return pytest.mark.horovod_examples(pytest.mark.slow(test))


@pytest.fixture(scope="module")
def examples_dir() -> Path:
    value = os.environ.get(HOROVOD_EXAMPLES_ENV, "")
    path = Path(value)
    if not value or not (path / "tensorflow2").is_dir():
        pytest.fail(f"{HOROVOD_EXAMPLES_ENV}={value!r} is not a Horovod examples/ directory",
                    pytrace=False)
    return path.resolve()


def run_program(examples_dir: Path, name: str, args: list[str], cwd: Path,
                env_extra: dict[str, str] | None = None) -> tuple[str, dict[int, dict]]:
    env = base_env()
    env.update(env_extra or {})
    cmd = horovodrun_prefix(2) + [sys.executable, str(RUNNER), str(examples_dir), name, *args]
    res = run_ok(cmd, timeout=360, env=env, cwd=cwd)
    results = [json.loads(m) for m in re.findall(r"EXAMPLE-RESULT (\{.*\})", res.stdout)]
    by_rank = {r["rank"]: r for r in results}
    assert sorted(by_rank) == [0, 1] and len(results) == 2, res.stdout[-3000:]
    assert {r["size"] for r in results} == {2}
    for r in results:
        assert r["finite"], r
    # Each rank drew its own random data: equal weights mean averaged gradients.
    w0, w1 = by_rank[0], by_rank[1]
    assert math.isclose(w0["weights_sum"], w1["weights_sum"], rel_tol=1e-6, abs_tol=1e-6), (w0, w1)
    assert math.isclose(w0["weights_sumsq"], w1["weights_sumsq"], rel_tol=1e-6), (w0, w1)
    return res.stdout, by_rank


def rank0_lines(stdout: str) -> list[str]:
    return re.findall(r"^\[\d+,0\]<stdout>:\s?(.*)$", stdout, re.M)


def assert_benchmark_output(stdout: str, iters: int) -> None:
    lines = rank0_lines(stdout)
    assert "Number of CPUs: 2" in lines, lines
    iter_lines = [line for line in lines if re.fullmatch(r"Iter #\d+: [0-9.]+ img/sec per CPU", line)]
    assert [int(line.split("#")[1].split(":")[0]) for line in iter_lines] == list(range(iters))
    assert all(float(line.split()[2]) > 0 for line in iter_lines), iter_lines
    assert any(re.fullmatch(r"Total img/sec on 2 CPU\(s\): [0-9.]+ \+-[0-9.]+", line)
               for line in lines), lines


def test_runner_fails_in_one_line_without_the_v0_28_1_programs(tmp_path):
    """Runs in the default tier: the runner refuses a missing or different program."""
    name = "tensorflow2_synthetic_benchmark.py"
    for setup, message in [(lambda: None, "not found"),
                           (lambda: (tmp_path / "tensorflow2" / name).write_text("print(1)\n"),
                            "is not Horovod v0.28.1's file")]:
        (tmp_path / "tensorflow2").mkdir(exist_ok=True)
        setup()
        res = subprocess.run([sys.executable, str(RUNNER), str(tmp_path), name],
                             capture_output=True, text=True, env=base_env(), cwd=REPO, timeout=60)
        assert res.returncode != 0
        assert res.stderr.strip().count("\n") == 0 and message in res.stderr, res.stderr


@tier
@pytest.mark.parametrize("name", sorted(run_example.EDITS))
def test_only_the_listed_edits_change_the_program(examples_dir, name):
    edits = run_example.EDITS[name]
    allowed = {run_example.IMPORT_TF, run_example.IMPORT_KERAS, run_example.OPT_VARIABLES,
               run_example.NO_RUN_TF_FUNCTION}
    assert set(edits) <= allowed
    assert sum(edit.why == "the import line" for edit in edits) == 1
    path = run_example.program_path(examples_dir, name)
    source = path.read_text()
    edited = run_example.transform(source, edits)
    diff = run_example.changed_lines(source, edited)
    removed = [line[1:] for line in diff if line.startswith("-")]
    added = [line[1:] for line in diff if line.startswith("+")]
    assert len(removed) == len(added) == len(edits), diff
    for edit, old, new in zip(edits, removed, added):
        assert edit.old in old and old.replace(edit.old, edit.new) == new, (edit, old, new)
    assert len(edited.splitlines()) == len(source.splitlines())
    code = [line for line in edited.splitlines() if not line.lstrip().startswith("#")]
    assert not any("horovod.tensorflow" in line for line in code)
    compile(edited, name, "exec")


@tier
@pytest.mark.multirank
@pytest.mark.parametrize("name", ["tensorflow2_synthetic_benchmark.py",
                                  "tensorflow2_keras_synthetic_benchmark.py"])
def test_synthetic_benchmark(examples_dir, tmp_path, name):
    iters = 3
    args = ["--model", "MobileNetV2", "--batch-size", "4", "--num-batches-per-iter", "2",
            "--num-iters", str(iters), "--no-cuda"]
    if name == "tensorflow2_synthetic_benchmark.py":
        args += ["--num-warmup-batches", "1"]
    stdout, by_rank = run_program(examples_dir, name, args, tmp_path)
    assert_benchmark_output(stdout, iters)
    if name == "tensorflow2_keras_synthetic_benchmark.py":
        losses = [by_rank[r]["history"]["loss"] for r in (0, 1)]
        assert len(losses[0]) == iters and all(map(math.isfinite, losses[0])), losses
        # MetricAverageCallback: each rank's own loss differs, the logged one is the mean.
        assert losses[0] == pytest.approx(losses[1], rel=1e-6), losses
        assert by_rank[0]["fit_args"] == [[iters, 2]]


@tier
@pytest.mark.multirank
def test_keras_mnist(examples_dir, tmp_path):
    epochs, steps, size, warmup = 4, 8, 2, 3
    stdout, by_rank = run_program(
        examples_dir, "tensorflow2_keras_mnist.py", [], tmp_path,
        {"HVDLLM_EXAMPLE_MAX_EPOCHS": str(epochs), "HVDLLM_EXAMPLE_MAX_STEPS": str(steps)})
    r0, r1 = by_rank[0], by_rank[1]
    assert r0["fit_args"] == r1["fit_args"] == [[epochs, steps]]  # capped from 24 and 500 // 2
    lines = rank0_lines(stdout)
    assert [line for line in lines if re.fullmatch(r"Epoch \d+/\d+", line.strip())] == [
        f"Epoch {e}/{epochs}" for e in range(1, epochs + 1)], lines
    scaled_lr = 0.001 * size
    assert f"Epoch {warmup}: finished gradual learning rate warmup to {scaled_lr:g}." in lines
    # Horovod's warmup: lr0 / size * (e' * (size - 1) / warmup + 1), e' = epoch + (batch + 1) / steps.
    def warm(e: float) -> float:
        return scaled_lr / size * (min(e, warmup) * (size - 1) / warmup + 1)
    want = [[e, warm(e + 1 / steps), warm(e + 1)] for e in range(epochs)]
    for r in (r0, r1):
        assert [row[0] for row in r["lr"]] == list(range(epochs))
        for got, exp in zip(r["lr"], want):
            assert got[1:] == pytest.approx(exp[1:], rel=1e-5), (r["lr"], want)
    loss, acc = r0["history"]["loss"], r0["history"]["accuracy"]
    assert len(loss) == epochs and all(map(math.isfinite, loss)), loss
    assert loss == pytest.approx(r1["history"]["loss"], rel=1e-6)  # MetricAverageCallback
    assert acc == pytest.approx(r1["history"]["accuracy"], rel=1e-6)
    assert loss[-1] < 0.5 * loss[0] and acc[-1] > acc[0], (loss, acc)
    # Rank 0's ModelCheckpoint wrote one file per epoch; the last holds the final weights.
    assert r0["checkpoints"] == [f"checkpoint-{e}.h5" for e in range(1, epochs + 1)]
    assert r0["checkpoint_max_abs_diff"] == 0.0
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == r0["checkpoints"]
